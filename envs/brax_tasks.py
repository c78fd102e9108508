"""Brax MuJoCo-style tasks behind the gymnax 1.0 API, with task functions on observations.

`BraxTask(name, backend=..., **param_overrides)` wraps `brax.envs.get_environment(name)`:

* gymnax 1.0 `reset`/`step` (6-value step, auto-reset inside `step`, the true pre-reset
  observation in `info["final_observation"]`), from gymnax's own `Environment.step`.
* Time limit as *truncation* (`EnvParams.max_steps_in_episode`, the task's standard episode
  length: 1000, except reacher 50 and pusher 100 as in Gym's `Reacher`/`Pusher`), kept apart from
  the task's own *termination* (falling over).
* Every reset draws a fresh random initial state from the step's reset key (Brax's own
  `AutoResetWrapper` instead restarts every episode from one cached state).
* `step` casts the new state to the dtypes of the state it was given, so a jitted function
  traces once whether it first sees a state from `reset` or from `step` (Brax's `step` returns
  weak-typed leaves where `reset` returns float32).
* `reward_fn(obs, action, next_obs)` / `termination_fn(obs, action, next_obs)` reproduce the
  Brax reward and `done` from observations alone, for planners and model rollouts.
* `mjx`: body poses and velocities are recomputed from the new q, qd after every step (Brax's
  MJX step leaves them one substep behind, so ant's and humanoid's `done` lagged their observed
  height); the trajectory of q, qd is Brax's own.
* `snapshot(state)` / `restore(snapshot)`: a flat float32 vector that stores a state and rebuilds
  it exactly (for algorithms that restart the real env from buffer states, e.g. TDML).

Observations = Brax's observation, then task-specific *reward features* appended at the end
(`REWARD_FEATURES` below), because some Brax rewards use quantities the observation drops:

| task | appended | why |
|---|---|---|
| hopper, walker2d, halfcheetah, ant | x-velocity of the torso over the last step, (x' - x) / dt | forward reward is this finite difference, the observation only has the end-of-step joint velocity |
| humanoid | x-velocity of the centre of mass over the last step | forward reward |
| inverted_double_pendulum | tip (x, z), unclipped hinge velocities (2) | distance/velocity penalties and `done` use them; the observation clips velocities to [-10, 10] |
| inverted_pendulum, reacher, pusher | nothing | reward already a function of observations |

After a reset the appended velocity is 0 (no step has been taken). With these features the task
functions match `step` exactly (tests/test_brax_tasks.py), with one documented gap: hopper's
health check also requires |joint velocity| < 100, which the observation cannot show because
Brax clips observed velocities to [-10, 10]; our `termination_fn` checks every observed entry
against 100 (the original MBPO code's check was void: it took `abs` of a boolean).
"""

import contextlib
import io
import warnings
from functools import partial
from typing import Any
from unittest import mock

# A quiet import. MJX prints "Failed to import warp" (twice) whenever NVIDIA Warp, an optional
# GPU backend we never use, is absent; Brax warns on every model load that its pipelines are
# unmaintained (the README's backend section says what we use and why), and imports JAXopt,
# which warns that it is unmaintained (Brax's dependency, not ours). Anything else MJX prints
# is passed through, and a failing import still raises.
warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
with contextlib.redirect_stdout(io.StringIO()) as _printed:
    import mujoco.mjx
for _line in _printed.getvalue().splitlines():
    if not _line.startswith(("Failed to import warp:", "Failed to import mujoco_warp:")):
        print(_line)
warnings.filterwarnings("ignore", message="Brax System, piplines and environments are not actively being maintained")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from brax import envs as brax_envs  # noqa: E402
from brax.base import Motion, Transform  # noqa: E402
from flax import struct  # noqa: E402
from gymnax.environments import environment  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from envs._common import PhysicsParams as EnvParams, PhysicsTask, with_overrides  # noqa: E402

BACKENDS = ("positional", "generalized", "spring", "mjx")  # Brax's own: other tasks than Gymnasium's


def _load(name, backend):
    """`brax.envs.get_environment`, with the model on this process's own first device. Brax's
    loader calls MJX's `put_model` without a device, which then picks `jax.devices()[0]`: in a
    multi-process run (jax.distributed) that device belongs to process 0, so every other process
    would hold a model with no data and fail to compile ("closing over a jax.Array that spans
    non-addressable devices"). On `mjx`, the body poses come fresh after every step (below)."""
    local_put = partial(mujoco.mjx.put_model, device=jax.local_devices()[0])
    with mock.patch.object(mujoco.mjx, "put_model", local_put):
        env = brax_envs.get_environment(name, backend=backend)
    if backend == "mjx":
        steps = env.pipeline_step
        env.pipeline_step = lambda state, action: _fresh_poses(env.sys, steps(state, action))
    return env


def _fresh_poses(sys, data):
    """MJX's state after a step with body poses and velocities (x, xd) of its new q, qd.

    `mjx.step` computes kinematics before it integrates, so after Brax's MJX step x, xd are one
    substep older than q, qd (MuJoCo's own `mj_step` behaves the same; mjlab and Gymnasium added
    a forward pass after the step for this reason). Brax's ant and humanoid end the episode on
    x's torso height, but observe q's: their `done` disagreed with the height in the observation
    at 11 of 960 steps of the test. Only x, xd change; the next step recomputes the kinematics it
    uses from q, so the trajectory of q, qd is the same."""
    data = mujoco.mjx.com_vel(sys, mujoco.mjx.com_pos(sys, mujoco.mjx.kinematics(sys, data)))
    x = Transform(pos=data.xpos[1:], rot=data.xquat[1:])  # as Brax's mjx pipeline builds them
    cvel = Motion(vel=data.cvel[1:, 3:], ang=data.cvel[1:, :3])
    offset = Transform.create(pos=data.xpos[1:] - data.subtree_com[sys.body_rootid[1:]])
    return data.replace(x=x, xd=offset.vmap().do(cvel))
# `positional` compiles and runs fastest on CPU (../shared/FACTS.md); returns differ across
# backends, so every run records the backend it used.
BRAX_DEFAULT = "positional"
EPISODE_LENGTH = {
    "hopper": 1000,
    "walker2d": 1000,
    "halfcheetah": 1000,
    "ant": 1000,
    "humanoid": 1000,
    "inverted_pendulum": 1000,
    "inverted_double_pendulum": 1000,
    "reacher": 50,
    "pusher": 100,
}
TASKS = tuple(EPISODE_LENGTH)


@struct.dataclass
class EnvState(environment.EnvState):
    pipeline_state: Any  # the Brax physics state
    obs: jax.Array  # observation of this state (humanoid's is not a function of the physics state)
    time: jax.Array


# ---------------------------------------------------------------------------------------------
# Reward features appended to Brax's observation: f(brax_env, pipeline_state_before, after).
# At reset both states are the same state.
def _torso_x_velocity(env, before, after):
    return ((after.x.pos[0, 0] - before.x.pos[0, 0]) / env.dt)[None]


def _com_x_velocity(env, before, after):
    return ((env._com(after)[0][0] - env._com(before)[0][0]) / env.dt)[None]


def _double_pendulum_tip_and_velocity(env, before, after):
    # Same tip point as Brax's `InvertedDoublePendulum.step`: 0.6 along the second pole.
    tip = after.x.take(2).do(Transform.create(pos=jnp.array([0.0, 0.0, 0.6]))).pos
    return jnp.concatenate([tip[jnp.array([0, 2])], after.qd[1:]])


REWARD_FEATURES = {
    "hopper": _torso_x_velocity,
    "walker2d": _torso_x_velocity,
    "halfcheetah": _torso_x_velocity,
    "ant": _torso_x_velocity,
    "humanoid": _com_x_velocity,
    "inverted_double_pendulum": _double_pendulum_tip_and_velocity,
}


def _sum_squares(action):
    return jnp.sum(jnp.square(action), axis=-1)


class BraxTask(PhysicsTask):
    """A Brax task with the gymnax 1.0 API. See the module docstring."""

    def __init__(self, name: str, backend: str = BRAX_DEFAULT, **param_overrides):
        if name not in EPISODE_LENGTH:
            raise ValueError(f"unknown Brax task {name!r}; valid: {', '.join(TASKS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown Brax backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self._params = with_overrides(
            name, EnvParams(max_steps_in_episode=EPISODE_LENGTH[name]), param_overrides
        )
        self.task, self.backend = name, backend
        self.brax_env = _load(name, backend)
        self.action_size = self.brax_env.action_size
        self.brax_obs_size = jax.eval_shape(self.brax_env.reset, jax.random.PRNGKey(0)).obs.shape[-1]
        self._features = REWARD_FEATURES.get(name, lambda env, before, after: jnp.zeros(0))
        dummy_state = jax.eval_shape(self.brax_env.reset, jax.random.PRNGKey(0)).pipeline_state
        self.obs_size = self.brax_obs_size + jax.eval_shape(
            partial(self._features, self.brax_env), dummy_state, dummy_state
        ).shape[0]
        # Actuator control range: humanoid, inverted_pendulum and pusher rescale [-1, 1] actions
        # to it before computing their control cost.
        self._ctrl_range = np.asarray(self.brax_env.sys.actuator.ctrl_range)

    # --- dynamics ------------------------------------------------------------------------
    def _observe(self, brax_obs, before, after):
        return jnp.concatenate([brax_obs, self._features(self.brax_env, before, after)]).astype(jnp.float32)

    def reset_env(self, key, params):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)  # Brax expects raw uint32 keys
        brax_state = self.brax_env.reset(key)
        ps = brax_state.pipeline_state
        obs = self._observe(brax_state.obs, ps, ps)
        return obs, EnvState(time=jnp.int32(0), pipeline_state=ps, obs=obs)

    def step_env(self, key, state, action, params):
        del key  # Brax dynamics are deterministic
        # A fresh Brax state each step: Brax's `step` mutates `metrics` in place and some tasks add
        # keys to `info`, which would change the pytree structure from one step to the next.
        zero = jnp.float32(0.0)
        brax_state = self.brax_env.step(
            brax_envs.State(state.pipeline_state, state.obs[: self.brax_obs_size], zero, zero, {}, {}),
            action,
        )
        # Cast back to the incoming dtypes (weak-typed floats from `step` would retrace).
        pipeline_state = jax.tree.map(
            lambda new, old: jnp.asarray(new, old.dtype), brax_state.pipeline_state, state.pipeline_state
        )
        obs = self._observe(brax_state.obs, state.pipeline_state, pipeline_state)
        new_state = EnvState(time=state.time + 1, pipeline_state=pipeline_state, obs=obs)
        return (
            obs,
            new_state,
            jnp.asarray(brax_state.reward, jnp.float32),
            jnp.asarray(brax_state.done, jnp.float32) > 0.5,
            {},
        )

    # --- task functions on observations (batched over any leading dims) -----------------------
    def _scaled_action(self, action):
        low, high = self._ctrl_range[:, 0], self._ctrl_range[:, 1]
        return (action + 1.0) * (high - low) * 0.5 + low

    def reward_fn(self, obs, action, next_obs, params=None):
        """The Brax reward of the transition (obs, action) -> next_obs, from observations."""
        env, n, task = self.brax_env, self.brax_obs_size, self.task
        if task in ("hopper", "walker2d", "halfcheetah"):
            healthy = getattr(env, "_healthy_reward", 0.0)
            return (
                env._forward_reward_weight * next_obs[..., n]
                + healthy
                - env._ctrl_cost_weight * _sum_squares(action)
            )
        if task == "ant":
            return next_obs[..., n] + env._healthy_reward - env._ctrl_cost_weight * _sum_squares(action)
        if task == "humanoid":
            return (
                env._forward_reward_weight * next_obs[..., n]
                + env._healthy_reward
                - env._ctrl_cost_weight * _sum_squares(self._scaled_action(action))
            )
        if task == "inverted_pendulum":
            return jnp.ones(next_obs.shape[:-1], jnp.float32)
        if task == "inverted_double_pendulum":
            tip_x, tip_z, v1, v2 = (next_obs[..., n + i] for i in range(4))
            alive = 10.0 * (tip_z > 1.0)
            return alive - 0.01 * tip_x**2 - (tip_z - 2.0) ** 2 - 1e-3 * v1**2 - 5e-3 * v2**2
        if task == "reacher":  # observation ends with fingertip - target
            return -jnp.linalg.norm(next_obs[..., -3:], axis=-1) - _sum_squares(action)
        if task == "pusher":  # Brax computes it on the state *before* the step
            tip, obj, goal = obs[..., 14:17], obs[..., 17:20], obs[..., 20:23]
            return (
                -jnp.linalg.norm(obj - goal, axis=-1)
                - 0.1 * _sum_squares(self._scaled_action(action))
                - 0.5 * jnp.linalg.norm(obj - tip, axis=-1)
            )
        raise AssertionError(task)

    def termination_fn(self, obs, action, next_obs, params=None):
        """True where the transition ends the episode by the task's own rule (not the time limit)."""
        env, n, task = self.brax_env, self.brax_obs_size, self.task
        z = next_obs[..., 0]
        if task == "hopper":
            low_z, high_z = env._healthy_z_range
            low_angle, high_angle = env._healthy_angle_range
            low_state, high_state = env._healthy_state_range
            in_range = (next_obs[..., 1:n] > low_state) & (next_obs[..., 1:n] < high_state)
            healthy = (
                (z > low_z) & (z < high_z)
                & (next_obs[..., 1] > low_angle) & (next_obs[..., 1] < high_angle)
                & jnp.all(in_range, axis=-1)
            )
        elif task == "walker2d":
            low_z, high_z = env._healthy_z_range
            low_angle, high_angle = env._healthy_angle_range
            angle = next_obs[..., 1]
            healthy = (z > low_z) & (z < high_z) & (angle > low_angle) & (angle < high_angle)
        elif task in ("ant", "humanoid"):
            low_z, high_z = env._healthy_z_range
            healthy = (z >= low_z) & (z <= high_z)
        elif task == "inverted_pendulum":
            healthy = jnp.abs(next_obs[..., 1]) <= 0.2
        elif task == "inverted_double_pendulum":
            healthy = next_obs[..., n + 1] > 1.0
        else:
            healthy = jnp.ones(next_obs.shape[:-1], bool)
        return ~healthy

    # --- storing and restoring states --------------------------------------------------------
    def snapshot(self, state: EnvState) -> jax.Array:
        """A flat float32 vector [time, obs, physics] from which `restore` rebuilds `state`.

        `generalized`: physics = (q, qd), rebuilt with `pipeline_init` (exact up to float error).
        `positional`/`spring`: rebuilding from (q, qd) is wrong (errors 0.2-1.1 after one step,
        ../shared/FACTS.md); `mjx`: so is it on contact tasks (hopper: 0.26 within 10 steps, as
        the solver warm-starts from the stored accelerations). Those store the whole pipeline
        state, flattened (integer fields round-trip exactly through float32 at their sizes).
        """
        if self.backend == "generalized":
            physics = jnp.concatenate([state.pipeline_state.q, state.pipeline_state.qd])
        else:
            physics = ravel_pytree(state.pipeline_state)[0]
        return jnp.concatenate([state.time[None].astype(jnp.float32), state.obs, physics.astype(jnp.float32)])

    @property
    def snapshot_size(self) -> int:
        dummy = jax.eval_shape(self.reset, jax.random.PRNGKey(0))[1]
        return jax.eval_shape(self.snapshot, dummy).shape[0]

    def restore(self, snapshot: jax.Array) -> EnvState:
        """Inverse of `snapshot`: a full state that steps exactly like the stored one."""
        template = jax.eval_shape(self.reset, jax.random.PRNGKey(0))[1]
        time = snapshot[0].astype(jnp.int32)
        obs = snapshot[1 : 1 + self.obs_size]
        physics = snapshot[1 + self.obs_size :]
        if self.backend == "generalized":
            nq = template.pipeline_state.q.shape[0]
            pipeline_state = self.brax_env.pipeline_init(physics[:nq], physics[nq:])
            pipeline_state = jax.tree.map(
                lambda new, old: jnp.asarray(new, old.dtype), pipeline_state, template.pipeline_state
            )
        else:
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), template.pipeline_state)
            pipeline_state = ravel_pytree(zeros)[1](physics)
        return EnvState(time=time, pipeline_state=pipeline_state, obs=obs)
