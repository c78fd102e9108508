"""Shared by the envs: `EnvParams` from keyword overrides with clear errors, and the base class
of the two DAM driving tasks."""

import dataclasses

import jax
import jax.numpy as jnp
from gymnax.environments import environment, spaces


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


class FixedHorizonDiscreteEnv(environment.Environment):
    """Base of the DAM driving tasks: 3 discrete actions, `EnvParams` built from keyword overrides
    (`params_cls` and `param_checks` given by the subclass), and, unless the subclass says
    otherwise (Intersection's crash), episodes that end only by the time limit."""

    params_cls = environment.EnvParams

    def __init__(self, **param_overrides):
        super().__init__()
        self._params = with_overrides(self.name, self.params_cls(), param_overrides, self.param_checks)

    @staticmethod
    def param_checks(params):
        return ()

    @property
    def default_params(self):
        return self._params

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def num_actions(self) -> int:
        return 3

    def action_space(self, params=None) -> spaces.Discrete:
        return spaces.Discrete(3)

    def is_terminated(self, state, params) -> jax.Array:
        """Never: the episode ends only by the time limit (truncation)."""
        return jnp.zeros(jnp.shape(state.time), dtype=bool)

    def termination_fn(self, obs, action, next_obs, params=None):
        """All False (fixed-horizon task), shaped like the batch."""
        return jnp.zeros(jnp.shape(next_obs)[:-1], dtype=bool)
