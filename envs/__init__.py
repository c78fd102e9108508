"""Environments for the MBRL algorithms: one registry, one API (gymnax 1.0).

    env, params = envs.make("hopper")                 # Brax task, default backend
    env, params = envs.make("hopper", backend="generalized", max_steps_in_episode=500)
    env, params = envs.make("IcyRoad", swerve_prob=0.5)

    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)
    # auto-reset inside `step`; the true next observation is info["final_observation"]

    env.reward_fn(obs, action, next_obs)       # task functions on observations, batched over
    env.termination_fn(obs, action, next_obs)  # any leading dims, equal to what `step` returns

Keyword overrides are fields of the env's `EnvParams` (plus `backend` for Brax tasks); the
returned `params` are also `env.default_params`, so the task functions use them too.
"""

from envs.brax_tasks import BACKENDS, DEFAULT_BACKEND, TASKS as BRAX_TASKS, BraxTask
from envs.icy_road import IcyRoad
from envs.intersection import Intersection
from envs.pendulum import Pendulum
from envs.render import render_episode, rollout

_NON_BRAX = {"IcyRoad": IcyRoad, "Intersection": Intersection, "pendulum": Pendulum}
NAMES = (*_NON_BRAX, *BRAX_TASKS)
CONTINUOUS = ("pendulum", *BRAX_TASKS)  # continuous actions, with `obs_size` and `action_size`


def make(name: str, **overrides):
    """Make env `name` with `EnvParams` overrides; returns `(env, params)`."""
    if name in _NON_BRAX:
        env = _NON_BRAX[name](**overrides)
    elif name in BRAX_TASKS:
        env = BraxTask(name, **overrides)
    else:
        raise ValueError(f"unknown env {name!r}; valid names: {', '.join(NAMES)}")
    return env, env.default_params


__all__ = ["make", "render_episode", "rollout", "NAMES", "BRAX_TASKS", "CONTINUOUS", "BACKENDS", "DEFAULT_BACKEND", "BraxTask",
           "IcyRoad", "Intersection", "Pendulum"]
