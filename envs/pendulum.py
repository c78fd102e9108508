"""pendulum: gymnax's continuous Pendulum-v1 swing-up (Gym's), with task functions on observations.

A cartpole-like task that never terminates, as PETS' reference cartpole (a 200-step swing-up):
every trial adds `max_steps_in_episode` = 200 transitions. The pole starts at a uniform angle in
[-pi, pi] with angular velocity in [-1, 1] and must be swung up and held with a torque in [-2, 2]
(too weak to lift it directly: it must swing).

Observation (cos theta, sin theta, theta_dot); theta = 0 is upright. Reward of a step, on the
state before it: -(theta^2 + 0.1 theta_dot^2 + 0.001 u^2), theta wrapped to [-pi, pi], u the
clipped torque; so `reward_fn(obs, action, next_obs)` uses obs and action only (theta =
atan2(sin, cos)). Dynamics, reset and spaces are gymnax's; this class adds the registry's
keyword overrides, `obs_size`/`action_size`, the task functions, snapshots (`snapshot(state)` /
`restore(v)`: the state as a flat vector [theta, theta_dot, last_u, time]) and a trajectory plot.
"""

import jax
import jax.numpy as jnp
from gymnax.environments.classic_control import pendulum as gymnax_pendulum

from envs._common import with_overrides


class Pendulum(gymnax_pendulum.Pendulum):
    """gymnax's Pendulum-v1 with `EnvParams` overrides and task functions (gymnax 1.0 API)."""

    obs_size = 3
    action_size = 1

    def __init__(self, **param_overrides):
        super().__init__()
        self._params = with_overrides("pendulum", gymnax_pendulum.EnvParams(), param_overrides, lambda p: [
            (p.max_torque > 0 and p.max_speed > 0 and p.dt > 0, "max_torque, max_speed and dt must be positive")])

    def reset_env(self, key, params):
        """gymnax's reset, with the state's `last_u` and `time` strongly typed (float32, int32): gymnax
        starts them as Python 0.0 and 0 (weak types) while a step returns strong ones, so a compiled
        loop that carries the state would compile a second time at its second call."""
        obs, state = super().reset_env(key, params)
        return obs, state.replace(last_u=jnp.asarray(state.last_u, jnp.float32), time=jnp.asarray(state.time, jnp.int32))

    snapshot_size = 4

    def snapshot(self, state) -> jax.Array:
        """The whole state as a flat float32 vector [theta, theta_dot, last_u, time]."""
        return jnp.stack([state.theta, state.theta_dot, state.last_u, state.time]).astype(jnp.float32)

    def restore(self, snapshot: jax.Array):
        """Inverse of `snapshot`: a state that steps exactly like the stored one."""
        return gymnax_pendulum.EnvState(theta=snapshot[0], theta_dot=snapshot[1], last_u=snapshot[2],
                                        time=snapshot[3].astype(jnp.int32))

    @property
    def default_params(self):
        return self._params

    @property
    def name(self) -> str:
        return "pendulum"

    def reward_fn(self, obs, action, next_obs, params=None):
        """Gym's reward from the observation before the step and the action; any leading dims."""
        p = self.default_params if params is None else params
        theta = jnp.arctan2(obs[..., 1], obs[..., 0])
        u = jnp.clip(action[..., 0], -p.max_torque, p.max_torque)
        return -(theta**2 + 0.1 * obs[..., 2] ** 2 + 0.001 * u**2)

    def termination_fn(self, obs, action, next_obs, params=None):
        """All False: the episode ends only by the time limit."""
        return jnp.zeros(jnp.shape(next_obs)[:-1], dtype=bool)

    def plot_trajectory(self, ax, obs, params=None):
        """The pole's angle (0 upright) and angular velocity over one episode's observations."""
        ax.plot(jnp.arctan2(obs[:, 1], obs[:, 0]), label="angle (0: up)")
        ax.plot(obs[:, 2], label="angular velocity")
        ax.axhline(0.0, color="0.7", linewidth=1)
        ax.set(xlabel="step")
        ax.legend(loc="upper right", fontsize=8)
