"""Environments for the MBRL algorithms: one registry, one API (gymnax 1.0).

    env, params = envs.make("hopper")                 # Gymnasium's Hopper (v4) on MJX: the papers' task
    env, params = envs.make("hopper", backend="positional", max_steps_in_episode=500)  # Brax's variant
    env, params = envs.make("IcyRoad", swerve_prob=0.5)

    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)
    # auto-reset inside `step`; the true next observation is info["final_observation"]

    env.reward_fn(obs, action, next_obs)       # task functions on observations, batched over
    env.termination_fn(obs, action, next_obs)  # any leading dims, equal to what `step` returns

The MuJoCo tasks (hopper, walker2d, ...) are by default Gymnasium's v4 environments, their own
model files stepped by MJX (`envs/mujoco_tasks.py`). `backend="positional" | "generalized" |
"spring" | "mjx"` gives Brax's variants instead (`envs/brax_tasks.py`): Brax's edited model files,
so *different tasks* (a hopper that does nothing stands for the whole episode on `positional`).
Keyword overrides are fields of the env's `EnvParams`; the returned `params` are also
`env.default_params`, so the task functions use them too.
"""

from envs.brax_tasks import BACKENDS as BRAX_BACKENDS, BraxTask
from envs.icy_road import IcyRoad
from envs.intersection import Intersection
from envs.mujoco_tasks import TASKS as MUJOCO_TASKS, MujocoTask
from envs.pendulum import Pendulum
from envs.render import render_episode, rollout

_NON_MUJOCO = {"IcyRoad": IcyRoad, "Intersection": Intersection, "pendulum": Pendulum}
NAMES = (*_NON_MUJOCO, *MUJOCO_TASKS)
CONTINUOUS = ("pendulum", *MUJOCO_TASKS)  # continuous actions, with `obs_size` and `action_size`
DEFAULT_BACKEND = MujocoTask.backend  # "gymnasium"
BACKENDS = (DEFAULT_BACKEND, *BRAX_BACKENDS)


def make(name: str, **overrides):
    """Make env `name` with `EnvParams` overrides (and `backend` for the MuJoCo tasks); returns
    `(env, params)`."""
    if name in _NON_MUJOCO:
        env = _NON_MUJOCO[name](**overrides)
    elif name in MUJOCO_TASKS:
        backend = overrides.pop("backend", DEFAULT_BACKEND)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for {name}; valid: {', '.join(BACKENDS)}")
        env = MujocoTask(name, **overrides) if backend == DEFAULT_BACKEND else BraxTask(name, backend, **overrides)
    else:
        raise ValueError(f"unknown env {name!r}; valid names: {', '.join(NAMES)}")
    return env, env.default_params


__all__ = ["make", "render_episode", "rollout", "NAMES", "MUJOCO_TASKS", "CONTINUOUS", "BACKENDS", "BRAX_BACKENDS",
           "DEFAULT_BACKEND", "BraxTask", "MujocoTask", "IcyRoad", "Intersection", "Pendulum"]
