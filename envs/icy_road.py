"""IcyRoad: a car on an icy road that may swerve off it at high speed.

Paper: Haghgoo et al., "Discriminator Augmented Model-Based Reinforcement Learning"
(DAM), 2021, section 4 and Appendix C. The environment exists to have stochastic,
*multimodal* dynamics: above a threshold speed the car swerves towards +y or -y with
equal probability, so p(s'|s, a) has two far-apart swerve modes (plus the no-swerve
outcome) and a unimodal Gaussian model fitted to it puts its mass in between, at
"on the road, at high speed, collecting the bonus", which never happens.

Observation (float32): ``(x, y, xdot, ydot)``, start ``(0, 0, 1, 0)``, 5 steps per
episode. Actions: 0 accelerate (xdot += 1), 1 decelerate (xdot -= 1), 2 cruise.
Reward (paper Eq. 20)::

    xdot - 6   if |y| > 1                 (off road)
    xdot + 8   if |y| <= 1 and xdot > 2   (high speed bonus)
    xdot       otherwise

Usage: ``env = IcyRoad(swerve_prob=0.9); obs, state = env.reset(key)``.

Choices the paper leaves open, and why:
- Reward is evaluated on the state *after* the transition (``next_obs``), so
  ``reward_fn(obs, action, next_obs)`` depends on ``next_obs`` only: accelerating past
  the threshold immediately earns either the bonus or the penalty.
  ``reward_on_next_state=False`` evaluates Eq. 20 on ``obs`` instead, as its "r(s, a)" is
  written (the last action's effect is then never rewarded).
- Semi-implicit Euler: velocities are updated first, then ``pos += dt * new_velocity``.
  With dt = 1 the car is at ``(2, 0, 2, 0)`` after one acceleration, the state of the
  paper's Fig. 2, and a swerve moves the car off the road in the step it happens.
  ``semi_implicit_euler=False`` is the explicit ("simple") Euler step, ``pos += dt *
  old_velocity``: a swerve leaves the road one step later, so the step that swerves still
  earns the bonus. What each reading does to the optimum and to the planners:
  benchmarks/README.md "DAM: IcyRoad's readings of Appendix C".
- Swerving: when the new ``xdot > speed_threshold`` (2, as in the paper) and the car
  has not swerved yet, it swerves with probability ``swerve_prob`` = 0.8 ("high
  chance"), to +y or -y with equal probability: ``ydot = +-swerve_speed``. One uniform
  draw from the step key decides both (u < p/2: -y, p/2 <= u < p: +y).
  ``swerve_speed`` = 2 with ``road_half_width`` = 1 gives ``|y| = 2 > 1`` at once;
  the constructor requires ``swerve_speed * dt > road_half_width`` so this holds.
- A swerved car keeps drifting: ``ydot`` is never reset (the road is icy), so it stays
  off the road and the penalty persists for the rest of the episode, whatever it does.
  A car that did not swerve faces the draw again at every step it stays fast.
- xdot is clipped to ``[0, max_speed]``; ``max_speed`` = 5 only binds on the last step
  of always-accelerate. It also bounds the observation space.
- With these numbers the greedy policy is not the best one: accelerating twice and
  cruising, or always accelerating, has a negative expected return, while accelerating
  once and cruising at the threshold speed returns 10 (tests/test_dam_envs.py).
- Termination: never. The episode ends by the time limit (``truncated`` after
  ``max_steps_in_episode`` steps), so ``terminated`` is always False and planning or
  bootstrapping is never cut by a terminal state.
- ``state_from_obs(obs, key)``: the state is fully observed (a swerved car has ydot != 0),
  so ``step_env`` from it samples the true p(s'|s, a): the true model a planner can use.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

from envs._common import FixedHorizonDiscreteEnv


@struct.dataclass
class EnvState(environment.EnvState):
    x: jax.Array
    y: jax.Array
    xdot: jax.Array
    ydot: jax.Array
    time: jax.Array


@struct.dataclass
class EnvParams(environment.EnvParams):
    swerve_prob: float = 0.8  # chance of swerving per step while xdot > threshold
    swerve_speed: float = 2.0  # |ydot| after a swerve
    speed_threshold: float = 2.0  # swerving possible (and bonus paid) above this xdot
    road_half_width: float = 1.0  # off road when |y| > this
    max_speed: float = 5.0  # xdot is clipped to [0, max_speed]
    dt: float = 1.0  # Euler time step
    max_steps_in_episode: int = 5
    # Two readings of Appendix C (the docstring; benchmarks/dam_icy_readings.py measures all four):
    semi_implicit_euler: bool = True  # positions move with the new velocities (False: the old ones)
    reward_on_next_state: bool = True  # Eq. 20 on s' (False: on s, as "r(s, a)" is written)


class IcyRoad(FixedHorizonDiscreteEnv):
    """IcyRoad from DAM (Haghgoo et al., 2021), gymnax 1.0 API."""

    params_cls = EnvParams

    @staticmethod
    def param_checks(p):
        return [
            (0.0 <= p.swerve_prob <= 1.0, "swerve_prob must be in [0, 1]"),
            (p.dt > 0, "dt must be positive"),
            (p.road_half_width > 0, "road_half_width must be positive"),
            (p.speed_threshold >= 0, "speed_threshold must be non-negative"),
            (p.max_speed > 0, "max_speed must be positive"),
            (
                p.swerve_speed * p.dt > p.road_half_width,
                "swerve_speed * dt must exceed road_half_width (a swerve leaves the road)",
            ),
        ]

    def step_env(
        self,
        key: jax.Array,
        state: EnvState,
        action: int | float | jax.Array,
        params: EnvParams,
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict[Any, Any]]:
        delta = jnp.array([1.0, -1.0, 0.0], jnp.float32)[action]  # accel, decel, cruise
        xdot = jnp.clip(state.xdot + delta, 0.0, params.max_speed)
        u = jax.random.uniform(key)
        swerve = (
            (xdot > params.speed_threshold)
            & (state.ydot == 0.0)
            & (u < params.swerve_prob)
        )
        direction = jnp.where(u < params.swerve_prob / 2, -1.0, 1.0)
        ydot = jnp.where(swerve, direction * params.swerve_speed, state.ydot)
        # Semi-implicit Euler moves with the new velocities; explicit ("simple") Euler with the old.
        x_vel = jnp.where(params.semi_implicit_euler, xdot, state.xdot)
        y_vel = jnp.where(params.semi_implicit_euler, ydot, state.ydot)
        next_state = EnvState(
            x=state.x + params.dt * x_vel,
            y=state.y + params.dt * y_vel,
            xdot=xdot,
            ydot=ydot,
            time=state.time + 1,
        )
        obs, next_obs = self.get_obs(state), self.get_obs(next_state)
        reward = self.reward_fn(obs, action, next_obs, params)
        next_obs, next_state = self._apply_transition_gradient_policy(
            next_obs, next_state
        )
        return next_obs, next_state, reward, self.is_terminated(next_state, params), {}

    def state_from_obs(self, obs, key=None, params=None) -> EnvState:
        """The state with observation ``obs`` (nothing is hidden; the time is not observed)."""
        return EnvState(x=obs[0], y=obs[1], xdot=obs[2], ydot=obs[3], time=jnp.zeros((), jnp.int32))

    def reset_env(
        self, key: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState]:
        zero = jnp.zeros((), jnp.float32)
        state = EnvState(
            x=zero, y=zero, xdot=jnp.ones((), jnp.float32), ydot=zero,
            time=jnp.zeros((), jnp.int32),
        )
        return self.get_obs(state), state

    def get_obs(self, state: EnvState, params=None, key=None) -> jax.Array:
        return jnp.stack([state.x, state.y, state.xdot, state.ydot]).astype(jnp.float32)

    def reward_fn(self, obs, action, next_obs, params: EnvParams | None = None):
        """Paper Eq. 20 on the post-transition observation (or on `obs`: `reward_on_next_state`);
        any leading batch dims."""
        params = self.default_params if params is None else params
        rewarded = jnp.where(params.reward_on_next_state, next_obs, obs)
        y, xdot = rewarded[..., 1], rewarded[..., 2]
        on_road = jnp.abs(y) <= params.road_half_width
        bonus = jnp.where(xdot > params.speed_threshold, 8.0, 0.0)
        return jnp.where(on_road, xdot + bonus, xdot - 6.0).astype(jnp.float32)

    def plot_trajectory(self, ax, obs, params: EnvParams | None = None):
        """The car's path (x, y) over one episode's observations, the road's edges dashed."""
        p = self.default_params if params is None else params
        ax.axhspan(-p.road_half_width, p.road_half_width, color="0.9", label="road")
        ax.plot(obs[:, 0], obs[:, 1], "o-", label="car")
        for t, (x, y, xdot) in enumerate(obs[:, :3]):
            ax.annotate(f"t{t} v{xdot:.0f}", (x, y), textcoords="offset points", xytext=(3, 5), fontsize=7)
        ax.set(xlabel="x", ylabel="y", ylim=(-3 * p.road_half_width, 3 * p.road_half_width))
        ax.legend(loc="upper left", fontsize=8)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        p = self.default_params if params is None else params
        reach = p.max_steps_in_episode * p.dt
        high = jnp.array(
            [reach * p.max_speed, reach * p.swerve_speed, p.max_speed, p.swerve_speed],
            dtype=jnp.float32,
        )
        low = jnp.array([0.0, -high[1], 0.0, -high[3]], dtype=jnp.float32)
        return spaces.Box(low, high, (4,), dtype=jnp.float32)
