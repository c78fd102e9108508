"""Helpers shared by the algorithm tests."""


def as_cli(config: dict) -> list:
    """An Args-like dict as tyro command-line flags."""
    out = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, tuple):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out
