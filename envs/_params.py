"""Building an env's `EnvParams` from keyword overrides, with clear errors (shared by all envs)."""

import dataclasses


def with_overrides(env_name, params, overrides, checks=lambda p: ()):
    """`params.replace(**overrides)` after rejecting unknown keys; then every `(ok, message)` of
    `checks(new_params)` (and a positive integer episode length) must hold."""
    valid = [field.name for field in dataclasses.fields(params)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown {env_name} parameter(s) {unknown}; valid: {valid}")
    params = params.replace(**overrides)
    steps = params.max_steps_in_episode
    for ok, message in [
        (isinstance(steps, int) and steps >= 1, "max_steps_in_episode must be a positive int"),
        *checks(params),
    ]:
        if not ok:
            raise ValueError(f"{env_name}: {message} (got {params})")
    return params
