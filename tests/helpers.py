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


def help_text(args_cls) -> str:
    """What `python algorithms/<algo>.py --help` prints (tyro's help of its Args), in this process:
    a subprocess costs ~3.5 s of imports, and each algorithm's CLI run is tested from a subprocess."""
    import contextlib
    import io

    import tyro

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            tyro.cli(args_cls, args=["--help"])
        except SystemExit as stop:
            assert stop.code == 0, stop.code
    return out.getvalue()
