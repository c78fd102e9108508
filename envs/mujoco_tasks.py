"""Gymnasium's MuJoCo tasks, as the papers ran them, stepped by MJX (MuJoCo's own physics in JAX).

`MujocoTask(name, **param_overrides)` loads Gymnasium's own model file
(`gymnasium/envs/mujoco/assets/`) and steps it with `mujoco.mjx.step`, `frame_skip` times per env
step, with the observation, reward, termination, reset noise, frame skip and time limit of
Gymnasium's **v4** environments. Why v4: its model files are those of v2/v3, which the papers ran
(MBPO: Hopper-v2, Walker2d-v2, HalfCheetah-v2, Ant-v2, Humanoid-v2, InvertedPendulum-v2); v4 only
moved them from mujoco-py to the `mujoco` bindings. Where v5 fixed a bug, we keep v4's behaviour
and say what v5 changes:

| task | model file, frame skip | obs | what v5 changes |
|---|---|---|---|
| hopper | hopper.xml, 4 | 11 | healthy reward only while healthy (no change under termination) |
| walker2d | walker2d.xml, 4 | 17 | walker2d_v5.xml: both feet friction 1.9 (v4: right foot 0.9, a bug) |
| halfcheetah | half_cheetah.xml, 5 | 17 | nothing that changes a step |
| ant | ant.xml, 5 | 27: MBPO's truncated obs (qpos[2:], qvel, no contact forces; v4's default) | adds contact forces and their cost by default |
| humanoid | humanoid.xml, 5 | 45: MBPO's truncated obs (qpos[2:], qvel) | adds the contact cost; v4's 376-obs drops to these 45 with v5's include_* flags off |
| inverted_pendulum | inverted_pendulum.xml, 2 | 4 | reward 0 on the step that terminates (v4: 1 on every step) |
| inverted_double_pendulum | inverted_double_pendulum.xml, 5 | 11 | drops the always-zero hinge constraint forces (obs 9) |
| reacher | reacher.xml, 2 | 11 | distance reward after the step (v4: before), obs without the z entry |
| pusher | **pusher_v5.xml**, 5 | 23 | reward after the step (v4: before) |

Departures, each forced and measured (benchmarks/README.md#gymnasiums-mujoco-tasks-on-mjx):
* pusher: Gymnasium's v4 refuses to run on mujoco >= 3 (its object, of density 1e-5, behaves
  differently there: Gymnasium issue 950); its fix is pusher_v5.xml (object density 0.01, the
  invisible sphere removed), which we load. Observation and reward are v4's.
* humanoid: its model file asks for MuJoCo's PGS solver, which MJX does not have; we use Newton
  (MuJoCo's default) with the file's 50 iterations.
* Contacts: MJX 3.17 gives a capsule standing steeply on a plane another contact frame than
  MuJoCo, which turns the friction pyramid of these files' pyramidal cone (ant's legs): we install
  MuJoCo's frame in MJX's collider table (`_plane_capsule` below), for every MJX model here.

Actions are in [-1, 1] for every task and are mapped linearly onto the actuators' control range
(humanoid [-0.4, 0.4], inverted_pendulum [-3, 3], pusher [-2, 2], the rest [-1, 1]): Gymnasium's
action is `ctrl = low + (a + 1) (high - low) / 2`, and control costs are on `ctrl`, as Gymnasium
computes them on its action (MBPO's reference normalised actions the same way).

As in Gymnasium (`mj_step` then no forward pass), body positions read after a step (ant's torso,
humanoid's centre of mass, reacher's and pusher's points, the double pendulum's tip) are those
MuJoCo computed at the start of the last substep; we keep that, so rewards match.

Observations are Gymnasium's, then *reward features* appended where the reward uses a quantity the
observation lacks, so that `reward_fn(obs, action, next_obs)` equals `step`'s reward:

| task | appended |
|---|---|
| hopper, walker2d, halfcheetah | x-velocity of the root over the step, (x' - x) / dt |
| ant | x-velocity of the torso body over the step |
| humanoid | x-velocity of the centre of mass over the step |
| inverted_double_pendulum | tip (x, z), unclipped hinge velocities (2) |
| the others | nothing (reacher's and pusher's rewards are on the observation before the step) |

`termination_fn` on observations equals `step`'s termination, with one gap: hopper's health check
also bounds |qvel| < 100, which its observation (velocities clipped to [-10, 10]) cannot show.
`snapshot(state)` / `restore(v)` store a state as a flat vector [time, obs, x, qpos, qvel,
qacc_warmstart] and rebuild one that steps exactly like it.
"""

import os
from typing import Any, NamedTuple

import gymnasium
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct
from gymnax.environments import environment
from mujoco import mjx
from mujoco.mjx._src import collision_driver, collision_primitive, math as mjx_math
from mujoco.mjx._src.types import GeomType

from envs._common import PhysicsParams, PhysicsTask, with_overrides

ASSETS = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets")


def _plane_capsule(plane, cap):
    """MJX's plane-capsule contacts with MuJoCo's contact frame: the tangent along the capsule's
    axis projected on the plane. MJX 3.17 swaps in a fixed axis whenever that projection is
    shorter than 0.5 (a leg pointing down), and under a pyramidal friction cone the friction
    pyramid turns with the frame: ant's one-step qvel then differed from MuJoCo 4.0's by up to
    0.35; with MuJoCo's frame, 1.4e-4 (benchmarks/README.md). A fixed axis only for a capsule
    standing on the plane."""
    n, axis = plane.mat[:, 2], cap.mat[:, 2]
    tangent, norm = mjx_math.normalize_with_norm(axis - n * jnp.dot(n, axis))
    fallback = jnp.where((-0.5 < n[1]) & (n[1] < 0.5), jnp.array([0.0, 1.0, 0.0]), jnp.array([0.0, 0.0, 1.0]))
    tangent = jnp.where(norm < 1e-6, fallback, tangent)
    frame = jnp.array([[n, tangent, jnp.cross(n, tangent)]])
    contacts = []
    for end in (axis * cap.size[1], -axis * cap.size[1]):
        dist, pos = collision_primitive._plane_sphere(n, plane.pos, cap.pos + end, cap.size[0])
        contacts.append((dist[None], pos[None], frame))
    return jax.tree.map(lambda *x: jnp.concatenate(x), *contacts)


# Installed in MJX's table of pair colliders (used when a model is compiled, so before any of ours).
collision_driver._COLLISION_FUNC[(GeomType.PLANE, GeomType.CAPSULE)] = collision_primitive.collider(ncon=2)(_plane_capsule)


@struct.dataclass
class EnvState(environment.EnvState):
    data: Any  # mjx.Data
    obs: jax.Array
    x: jax.Array  # the position whose change over a step is the forward reward (0 where unused)
    time: jax.Array


def _uniform(scale):
    return lambda key, shape: jax.random.uniform(key, shape, minval=-scale, maxval=scale)


def _normal(scale):
    return lambda key, shape: scale * jax.random.normal(key, shape)


def _noisy_start(qpos_noise, qvel_noise):
    """Gymnasium's `reset_model` for most tasks: init + noise on every qpos and qvel entry."""
    def start(key, qpos0, qvel0):
        kq, kv = jax.random.split(key)
        return qpos0 + qpos_noise(kq, qpos0.shape), qvel0 + qvel_noise(kv, qvel0.shape)
    return start


def _rejection(key, draw, accept):
    """The first draw of `draw(key)` that `accept`s, as Gymnasium's `while True` loops."""
    def body(carry):
        key, _ = carry
        key, sub = jax.random.split(key)
        return key, draw(sub)
    key, sub = jax.random.split(key)
    return jax.lax.while_loop(lambda c: ~accept(c[1]), body, (key, draw(sub)))[1]


def _reacher_start(key, qpos0, qvel0):
    kq, kg, kv = jax.random.split(key, 3)
    goal = _rejection(kg, lambda k: jax.random.uniform(k, (2,), minval=-0.2, maxval=0.2),
                      lambda g: jnp.linalg.norm(g) < 0.2)
    qpos = (qpos0 + jax.random.uniform(kq, qpos0.shape, minval=-0.1, maxval=0.1)).at[-2:].set(goal)
    qvel = (qvel0 + jax.random.uniform(kv, qvel0.shape, minval=-0.005, maxval=0.005)).at[-2:].set(0.0)
    return qpos, qvel


def _pusher_start(key, qpos0, qvel0):
    kc, kv = jax.random.split(key)
    cylinder = _rejection(
        kc, lambda k: jax.random.uniform(k, (2,), minval=jnp.array([-0.3, -0.2]), maxval=jnp.array([0.0, 0.2])),
        lambda c: jnp.linalg.norm(c) > 0.17)  # the goal is at (0, 0)
    qpos = qpos0.at[-4:-2].set(cylinder).at[-2:].set(0.0)
    qvel = (qvel0 + jax.random.uniform(kv, qvel0.shape, minval=-0.005, maxval=0.005)).at[-4:].set(0.0)
    return qpos, qvel


# --- observations (Gymnasium v4's `_get_obs`), of the model ids `ids` and the data ------------
def _positions_velocities(skip, clip=None):
    def obs(ids, d):
        qvel = d.qvel if clip is None else jnp.clip(d.qvel, -clip, clip)
        return jnp.concatenate([d.qpos[skip:], qvel])
    return obs


def _double_pendulum_obs(ids, d):
    return jnp.concatenate([d.qpos[:1], jnp.sin(d.qpos[1:]), jnp.cos(d.qpos[1:]),
                            jnp.clip(d.qvel, -10, 10), jnp.clip(d.qfrc_constraint, -10, 10)])


def _reacher_obs(ids, d):
    theta = d.qpos[:2]
    return jnp.concatenate([jnp.cos(theta), jnp.sin(theta), d.qpos[2:], d.qvel[:2],
                            d.xpos[ids["fingertip"]] - d.xpos[ids["target"]]])


def _pusher_obs(ids, d):
    return jnp.concatenate([d.qpos[:7], d.qvel[:7], d.xpos[ids["tips_arm"]], d.xpos[ids["object"]],
                            d.xpos[ids["goal"]]])


# --- the position whose velocity is rewarded --------------------------------------------------
def _root_x(ids, d):
    return d.qpos[0]


def _torso_x(ids, d):
    return d.xpos[ids["torso"], 0]


def _com_x(ids, d):
    return jnp.sum(ids["body_mass"] * d.xipos[:, 0]) / jnp.sum(ids["body_mass"])


def _sum_squares(x):
    return jnp.sum(jnp.square(x), axis=-1)


class Spec(NamedTuple):
    xml: str
    frame_skip: int
    episode_length: int
    obs: callable  # (ids, data) -> Gymnasium's observation
    start: callable  # (key, qpos0, qvel0) -> (qpos, qvel): Gymnasium's reset_model
    reward: callable  # (obs, ctrl, next_obs, n) -> reward; n = Gymnasium's obs size
    healthy: callable = None  # (next_obs, n) -> bool; None: never terminates
    x: callable = None  # (ids, data) -> position of the forward reward
    bodies: tuple = ()
    extra_features: callable = None  # (ids, data) -> features beyond the forward velocity


def _locomotion_reward(forward_weight, healthy_reward, ctrl_weight):
    def reward(obs, ctrl, next_obs, n):
        return forward_weight * next_obs[..., n] + healthy_reward - ctrl_weight * _sum_squares(ctrl)
    return reward


def _hopper_healthy(next_obs, n):
    # Gymnasium also bounds the unclipped qvel (|qvel| < 100), which `step` checks on the physics.
    z, angle = next_obs[..., 0], next_obs[..., 1]
    state_ok = jnp.all((next_obs[..., 1:n] > -100.0) & (next_obs[..., 1:n] < 100.0), axis=-1)
    return (z > 0.7) & (angle > -0.2) & (angle < 0.2) & state_ok


def _double_pendulum_reward(obs, ctrl, next_obs, n):
    tip_x, tip_z, v1, v2 = (next_obs[..., n + i] for i in range(4))
    return 10.0 - 0.01 * tip_x**2 - (tip_z - 2.0) ** 2 - 1e-3 * v1**2 - 5e-3 * v2**2


def _pusher_reward(obs, ctrl, next_obs, n):  # on the observation *before* the step (v4)
    tip, obj, goal = obs[..., 14:17], obs[..., 17:20], obs[..., 20:23]
    return (-jnp.linalg.norm(obj - goal, axis=-1) - 0.1 * _sum_squares(ctrl)
            - 0.5 * jnp.linalg.norm(obj - tip, axis=-1))


SPECS = {
    "hopper": Spec("hopper.xml", 4, 1000, _positions_velocities(1, clip=10),
                   _noisy_start(_uniform(5e-3), _uniform(5e-3)), _locomotion_reward(1.0, 1.0, 1e-3),
                   _hopper_healthy, _root_x),
    "walker2d": Spec("walker2d.xml", 4, 1000, _positions_velocities(1, clip=10),
                     _noisy_start(_uniform(5e-3), _uniform(5e-3)), _locomotion_reward(1.0, 1.0, 1e-3),
                     lambda o, n: (o[..., 0] > 0.8) & (o[..., 0] < 2.0) & (o[..., 1] > -1.0) & (o[..., 1] < 1.0),
                     _root_x),
    "halfcheetah": Spec("half_cheetah.xml", 5, 1000, _positions_velocities(1),
                        _noisy_start(_uniform(0.1), _normal(0.1)), _locomotion_reward(1.0, 0.0, 0.1),
                        None, _root_x),
    "ant": Spec("ant.xml", 5, 1000, _positions_velocities(2),
                _noisy_start(_uniform(0.1), _normal(0.1)), _locomotion_reward(1.0, 1.0, 0.5),
                lambda o, n: jnp.all(jnp.isfinite(o[..., :n]), axis=-1) & (o[..., 0] >= 0.2) & (o[..., 0] <= 1.0),
                _torso_x, bodies=("torso",)),
    "humanoid": Spec("humanoid.xml", 5, 1000, _positions_velocities(2),
                     _noisy_start(_uniform(1e-2), _uniform(1e-2)), _locomotion_reward(1.25, 5.0, 0.1),
                     lambda o, n: (o[..., 0] > 1.0) & (o[..., 0] < 2.0), _com_x),
    "inverted_pendulum": Spec("inverted_pendulum.xml", 2, 1000, _positions_velocities(0),
                              _noisy_start(_uniform(0.01), _uniform(0.01)),
                              lambda o, c, no, n: jnp.ones(no.shape[:-1], jnp.float32),
                              lambda o, n: jnp.all(jnp.isfinite(o), axis=-1) & (jnp.abs(o[..., 1]) <= 0.2)),
    "inverted_double_pendulum": Spec(
        "inverted_double_pendulum.xml", 5, 1000, _double_pendulum_obs,
        _noisy_start(_uniform(0.1), _normal(0.1)), _double_pendulum_reward,
        lambda o, n: o[..., n + 1] > 1.0,
        extra_features=lambda ids, d: jnp.concatenate([d.site_xpos[0, jnp.array([0, 2])], d.qvel[1:3]])),
    "reacher": Spec("reacher.xml", 2, 50, _reacher_obs, _reacher_start,
                    lambda o, c, no, n: -jnp.linalg.norm(o[..., 8:11], axis=-1) - _sum_squares(c),
                    bodies=("fingertip", "target")),
    "pusher": Spec("pusher_v5.xml", 5, 100, _pusher_obs, _pusher_start, _pusher_reward,
                   bodies=("tips_arm", "object", "goal")),
}
TASKS = tuple(SPECS)


def load_model(name):
    """Gymnasium's MuJoCo model of task `name`, with what MJX needs changed (humanoid: Newton for
    PGS, which MJX lacks)."""
    m = mujoco.MjModel.from_xml_path(os.path.join(ASSETS, SPECS[name].xml))
    if m.opt.solver == mujoco.mjtSolver.mjSOL_PGS:
        m.opt.solver = mujoco.mjtSolver.mjSOL_NEWTON
    return m


class MujocoTask(PhysicsTask):
    """A Gymnasium v4 MuJoCo task on MJX with the gymnax 1.0 API. See the module docstring."""

    backend = "gymnasium"

    def _key(self):
        # The spec too (model file, reward...): envs equal by this key share compiled `step`s.
        return (*super()._key(), self.spec)

    def __init__(self, name: str, **param_overrides):
        if name not in SPECS:
            raise ValueError(f"unknown MuJoCo task {name!r}; valid: {', '.join(TASKS)}")
        self.task, self.spec = name, SPECS[name]
        self._params = with_overrides(
            name, PhysicsParams(max_steps_in_episode=self.spec.episode_length), param_overrides)
        self.mj_model = load_model(name)
        # The model on this process's own first device (put_model's default, jax.devices()[0],
        # belongs to process 0 in a multi-process run).
        self.model = mjx.put_model(self.mj_model, device=jax.local_devices()[0])
        self.dt = float(self.mj_model.opt.timestep * self.spec.frame_skip)
        self.action_size = self.mj_model.nu
        self._ctrl_range = np.asarray(self.mj_model.actuator_ctrlrange, np.float32)
        self._ids = {b: mujoco.mj_name2id(self.mj_model, mujoco.mjtObj.mjOBJ_BODY, b) for b in self.spec.bodies}
        self._ids["body_mass"] = np.asarray(self.mj_model.body_mass, np.float32)
        data = mjx.make_data(self.mj_model)
        self.gym_obs_size = jax.eval_shape(lambda d: self.spec.obs(self._ids, d), data).shape[0]
        self.obs_size = self.gym_obs_size + jax.eval_shape(lambda d: self._features(d, jnp.float32(0), jnp.float32(0)), data).shape[0]

    def ctrl(self, action):
        """Gymnasium's action (the actuators' control) for an action in [-1, 1]."""
        low, high = self._ctrl_range[:, 0], self._ctrl_range[:, 1]
        return low + (action + 1.0) * (high - low) * 0.5

    # --- dynamics ------------------------------------------------------------------------------
    def _x(self, data):
        return jnp.float32(0.0) if self.spec.x is None else self.spec.x(self._ids, data)

    def _features(self, data, before_x, after_x):
        features = [] if self.spec.x is None else [((after_x - before_x) / self.dt)[None]]
        if self.spec.extra_features is not None:
            features.append(self.spec.extra_features(self._ids, data))
        return jnp.concatenate(features) if features else jnp.zeros(0)

    def _observe(self, data, before_x, after_x):
        return jnp.concatenate([self.spec.obs(self._ids, data),
                                self._features(data, before_x, after_x)]).astype(jnp.float32)

    def state_from(self, qpos, qvel, qacc_warmstart=None, time=0):
        """The state at (qpos, qvel), as Gymnasium's `set_state` leaves it for what is read from it.

        Gymnasium runs MuJoCo's whole forward pass there; we run its kinematics only (body, geom
        and site poses), which is all that an observation, `x` or a render reads, and `mjx.step`
        begins with its own forward pass from (qpos, qvel, ctrl, qacc_warmstart), so the next step
        is the same. Why: compile time. Measured on hopper (benchmarks/mujoco_reset_kinematics.py,
        2 CPU cores): a vmapped reset compiles in 4.6 s instead of 13.1 s, a vmapped step (its
        auto-reset inside) in 33.0 s instead of 41.8 s, at the same speed (32.5 and 31.6 ms per
        step of 32 envs), and 60 steps return the same outputs bit for bit. The one observation
        entry beyond kinematics, inverted_double_pendulum's qfrc_constraint, is zero after any
        reset in Gymnasium too (v5 drops it as always zero)."""
        data = mjx.make_data(self.model)
        data = data.replace(qpos=jnp.asarray(qpos, data.qpos.dtype), qvel=jnp.asarray(qvel, data.qvel.dtype))
        if qacc_warmstart is not None:
            data = data.replace(qacc_warmstart=jnp.asarray(qacc_warmstart, data.qacc_warmstart.dtype))
        # MJX's kinematics writes back free joints' quaternions normalised; MuJoCo's does not, so
        # Gymnasium's first observation holds the noisy, unnormalised one (its step normalises it).
        data = mjx.kinematics(self.model, data).replace(qpos=data.qpos)
        x = self._x(data)
        return EnvState(data=data, obs=self._observe(data, x, x), x=x, time=jnp.int32(time))

    def reset_env(self, key, params):
        qpos, qvel = self.spec.start(key, jnp.asarray(self.mj_model.qpos0, jnp.float32),
                                     jnp.zeros(self.mj_model.nv, jnp.float32))
        state = self.state_from(qpos, qvel)
        return state.obs, state

    def step_env(self, key, state, action, params):
        del key  # the physics is deterministic
        ctrl = self.ctrl(action)
        data = jax.lax.fori_loop(0, self.spec.frame_skip, lambda _, d: mjx.step(self.model, d),
                                 state.data.replace(ctrl=ctrl.astype(state.data.ctrl.dtype)))
        x = self._x(data)
        obs = self._observe(data, state.x, x)
        reward = self.spec.reward(state.obs, ctrl, obs, self.gym_obs_size)
        terminated = self.termination_fn(state.obs, action, obs)
        if self.task == "hopper":  # the part of Gymnasium's health check the observation lacks
            terminated = terminated | jnp.any(jnp.abs(data.qvel) >= 100.0)
        new_state = EnvState(data=data, obs=obs, x=x, time=state.time + 1)
        return obs, new_state, jnp.asarray(reward, jnp.float32), terminated, {}

    # --- task functions on observations (batched over any leading dims) -------------------------
    def reward_fn(self, obs, action, next_obs, params=None):
        """Gymnasium's reward of the transition (obs, action) -> next_obs, from observations."""
        return self.spec.reward(obs, self.ctrl(action), next_obs, self.gym_obs_size)

    def termination_fn(self, obs, action, next_obs, params=None):
        """True where the transition ends the episode by the task's own rule (not the time limit)."""
        if self.spec.healthy is None:
            return jnp.zeros(next_obs.shape[:-1], bool)
        return ~self.spec.healthy(next_obs, self.gym_obs_size)

    # --- storing and restoring states --------------------------------------------------------
    def snapshot(self, state: EnvState) -> jax.Array:
        """A flat float32 vector [time, obs, x, qpos, qvel, qacc_warmstart]: what the next step
        reads (MuJoCo's forward pass recomputes the rest; the warm start seeds its solver)."""
        d = state.data
        return jnp.concatenate([state.time[None].astype(jnp.float32), state.obs, state.x[None],
                                d.qpos, d.qvel, d.qacc_warmstart]).astype(jnp.float32)

    @property
    def snapshot_size(self) -> int:
        return 2 + self.obs_size + self.mj_model.nq + 2 * self.mj_model.nv

    def restore(self, snapshot: jax.Array) -> EnvState:
        """Inverse of `snapshot`: a full state that steps exactly like the stored one."""
        nq, nv, n = self.mj_model.nq, self.mj_model.nv, self.obs_size
        qpos = snapshot[2 + n: 2 + n + nq]
        qvel = snapshot[2 + n + nq: 2 + n + nq + nv]
        state = self.state_from(qpos, qvel, snapshot[2 + n + nq + nv:], snapshot[0].astype(jnp.int32))
        # Observation and x as stored: MuJoCo read body positions at the last substep's start.
        return state.replace(obs=snapshot[1: 1 + n], x=snapshot[1 + n])
