"""Shared by the envs: `EnvParams` from keyword overrides with clear errors, the base class of
the continuous-control physics tasks (Gymnasium's MuJoCo tasks on MJX, Brax's variants), and the
base class of the two DAM driving tasks."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import struct
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


@struct.dataclass
class PhysicsParams(environment.EnvParams):
    max_steps_in_episode: int = 1000


class PhysicsTask(environment.Environment):
    """Base of the continuous-control tasks (MuJoCo and Brax): actions in [-1, 1], the gymnax 1.0
    `step` with a cheaper auto-reset, and hashing by configuration. A subclass sets `task`,
    `backend`, `action_size`, `obs_size` and `_params`, and implements `reset_env`/`step_env`."""

    # Hash/equality by configuration, so that gymnax's `jit(static_argnames="self")` shares one
    # compiled `step`/`reset` between equal envs made by separate `envs.make` calls.
    def _key(self):
        return (type(self), self.task, self.backend, self._params)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, PhysicsTask) and self._key() == other._key()

    @property
    def name(self) -> str:
        return self.task

    @property
    def default_params(self):
        return self._params

    def action_space(self, params=None):
        return spaces.Box(-1.0, 1.0, (self.action_size,), jnp.float32)

    def observation_space(self, params=None):
        return spaces.Box(-jnp.inf, jnp.inf, (self.obs_size,), jnp.float32)

    def get_obs(self, state, params=None, key=None):
        return state.obs

    def is_terminated(self, state, params):
        return self.termination_fn(None, None, state.obs, params)

    @partial(jax.jit, static_argnames=("self",))
    def step(self, key, state, action, params=None):
        """gymnax 1.0 `step`, but the auto-reset is a `lax.cond`: an unbatched env pays for a reset
        only when an episode ends (gymnax computes one every step, 30% of Brax hopper's step
        time). Under `vmap` the cond becomes a select, exactly gymnax's behaviour."""
        params = self.default_params if params is None else params
        step_key, reset_key = jax.random.split(key)
        obs, state, reward, terminated, info = self.step_env(step_key, state, action, params)
        truncated = self.is_truncated(state, params)
        final_obs = obs
        obs, state = jax.lax.cond(
            terminated | truncated, lambda: self.reset_env(reset_key, params), lambda: (obs, state)
        )
        info = {**info, "terminated": terminated, "truncated": truncated, "final_observation": final_obs}
        return obs, state, reward, terminated, truncated, info
