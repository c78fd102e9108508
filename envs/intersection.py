"""Intersection: drive through an intersection while an oncoming car turns left or right.

Paper: Haghgoo et al., "Discriminator Augmented Model-Based Reinforcement Learning"
(DAM), 2021, section 4, Fig. 2 and Appendix C. Both cars enter the intersection at the
same time; the oncoming car turns left (across the agent's lane) or right (away from
it) with probability 1/2 each. The agent does not know which: the choice is drawn at
reset, kept in the state and not in the observation, and shows only through the other
car's motion once it starts turning. At that step p(s'|s, a) is bimodal (heading and
velocity rotate one way or the other), the multimodality the paper is about.

Observation (float32, 10 numbers): ``(x, y, vx, vy, heading)`` of the agent's car, then
the same for the oncoming car; heading is the angle of travel from the +x axis, in
radians. Actions: 0 accelerate, 1 decelerate, 2 neither (vy += accel, -= accel, += 0;
vy is clipped to [0, max_speed]). Reward (paper Eq. 21)::

    vy_agent - 10 * collision      (on s, on every step; the episode runs 25 steps)

Usage: ``env = Intersection(); obs, state = env.reset(key)`` (parameters: ``Intersection(dt=0.1)``).

Choices the paper leaves open, and why:
- Geometry: intersection centred at the origin, right-hand traffic. The agent drives
  +y in the lane ``x = +lane_offset`` from ``y = -start_distance``; the oncoming car
  drives -y in the lane ``x = -lane_offset`` from ``y = +start_distance``. Both move at
  ``speed`` = 5, so they reach the intersection edge ``|y| = turn_y`` at the same time.
- Turning: once the oncoming car is in the intersection (its ``y <= turn_y`` before the
  step) its heading rotates by ``speed / turn_radius * dt`` per step, at constant speed,
  until it has turned by pi/2: left (from its point of view, heading -pi/2 -> 0, towards
  +x, across the agent's lane) or right (-pi/2 -> -pi, towards -x, away from the agent).
  It does not yield and turns on a tight arc (``turn_radius`` = 2 from ``turn_y`` = 2.5),
  so a left turn crosses the agent's lane where an agent keeping its speed would be.
  Positions use semi-implicit Euler: ``pos += dt * new_velocity``.
- Eq. 21 read as written, r(s, a): the pre-action vy and the collision of s, on every
  step (the text gives 25-step episodes and no early end). A collision: the cars'
  centres closer than ``collision_distance`` (1.5; lanes are 2 apart, so a right turn
  or an oncoming car going straight never collides). Crashed cars stay where they are
  (velocities 0, agent actions ignored), so a crash costs -10 on every later step and
  the speed it would have earned. Cars that drove on through each other
  (``crash_stops_cars=False``) would make racing through optimal, against the text's
  "the agent's car must slow down to avoid collision".
- Our earlier reading is an option: ``crash_ends_episode=True`` makes the crash terminal
  (``terminated``, ``termination_fn``), -10 once on the step into it and 0 on every step
  after (stepped on, the cars stay frozen); ``reward_on_next_state=True`` reads Eq. 21
  on s'. Measured (benchmarks/README.md, "Intersection's readings"): on the literal
  reading the paper's Table 1 cells (29.6-97.7) lie between the random policy (1.07)
  and the optimum (204.5), and a maximum-likelihood Gaussian model's planner scores
  like the paper's baselines; on the earlier one the paper's baselines lay below the
  random policy (75.98) and ours scored ~125.
- dt = 0.2, accel = 1 per step and max_speed = 10 let the agent stop from speed 5 in
  5 steps (2 length units, right at the intersection edge from start_distance = 4.5)
  and reach top speed within the 25-step episode. Keeping speed 5 or always
  accelerating collides when the car turns left; braking first avoids both outcomes,
  so the greedy policy is not the best one (numbers in tests/test_dam_envs.py).
- Termination: none; the episode ends by the time limit (``truncated`` after
  ``max_steps_in_episode`` = 25 steps), or by a crash with ``crash_ends_episode``.
- ``state_from_obs(obs, key)``: an env state with this observation, the hidden turn drawn
  from its distribution given the observation (known once the oncoming car has started
  turning, else left or right with probability 1/2), so that ``step_env`` from it samples
  the true p(s'|s, a) of the observation process: the true model a planner can use.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

from envs._common import FixedHorizonDiscreteEnv

_HALF_PI = jnp.pi / 2


@struct.dataclass
class EnvState(environment.EnvState):
    agent_xy: jax.Array  # (2,)
    agent_vy: jax.Array
    other_xy: jax.Array  # (2,)
    other_v: jax.Array  # (2,)
    other_heading: jax.Array
    turn_left: jax.Array  # hidden: the oncoming car's choice, drawn at reset
    time: jax.Array


@struct.dataclass
class EnvParams(environment.EnvParams):
    speed: float = 5.0  # both cars' initial speed; the oncoming car keeps it
    accel: float = 1.0  # change of the agent's vy per accelerate/decelerate step
    max_speed: float = 10.0  # agent's vy is clipped to [0, max_speed]
    lane_offset: float = 1.0  # lanes at x = +lane_offset (agent), -lane_offset (other)
    start_distance: float = 4.5  # |y| of both cars at reset
    turn_y: float = 2.5  # oncoming car turns once its y <= turn_y (intersection edge)
    turn_radius: float = 2.0  # radius of the oncoming car's turn (both directions)
    collision_distance: float = 1.5  # collision when the centres are closer than this
    dt: float = 0.2
    max_steps_in_episode: int = 25
    # Readings of Eq. 21 that the text leaves open (benchmarks/README.md, "Intersection's readings"):
    crash_ends_episode: bool = False  # -10 on every step in collision (True: terminal, -10 once)
    crash_stops_cars: bool = True  # the crashed cars stand still (False: drive on through each other)
    reward_on_next_state: bool = False  # Eq. 21 on s, as "r(s, a)" is written (True: on s')


class Intersection(FixedHorizonDiscreteEnv):
    """Intersection from DAM (Haghgoo et al., 2021), gymnax 1.0 API."""

    params_cls = EnvParams

    @staticmethod
    def param_checks(p):
        return [
            (p.speed > 0, "speed must be positive"),
            (p.accel > 0, "accel must be positive"),
            (p.max_speed >= p.speed, "max_speed must be >= speed"),
            (p.dt > 0, "dt must be positive"),
            (p.turn_radius > 0, "turn_radius must be positive"),
            (p.start_distance > p.turn_y, "start_distance must exceed turn_y"),
            (
                0 < p.collision_distance < 2 * p.lane_offset,
                "need 0 < collision_distance < 2 * lane_offset (passing is no crash)",
            ),
        ]

    def step_env(
        self,
        key: jax.Array,
        state: EnvState,
        action: int | float | jax.Array,
        params: EnvParams,
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict[Any, Any]]:
        obs = self.get_obs(state)
        # Crashed cars stay where they are (always when the crash ends the episode).
        moving = ~(self._collision(obs, params) & (params.crash_ends_episode | params.crash_stops_cars))
        delta = jnp.array([1.0, -1.0, 0.0], jnp.float32)[action] * params.accel
        agent_vy = jnp.clip(state.agent_vy + delta, 0.0, params.max_speed) * moving
        # Oncoming car: rotate towards its exit heading once inside the intersection.
        turning = moving & (state.other_xy[1] <= params.turn_y)
        turned = jnp.abs(state.other_heading + _HALF_PI)
        turned = jnp.minimum(
            turned + turning * params.speed / params.turn_radius * params.dt, _HALF_PI
        )
        heading = -_HALF_PI + jnp.where(state.turn_left, turned, -turned)
        other_v = params.speed * jnp.stack([jnp.cos(heading), jnp.sin(heading)]) * moving
        next_state = state.replace(
            agent_xy=state.agent_xy + params.dt * jnp.stack([0.0, agent_vy]),
            agent_vy=agent_vy,
            other_xy=state.other_xy + params.dt * other_v,
            other_v=other_v,
            other_heading=heading,
            time=state.time + 1,
        )
        next_obs = self.get_obs(next_state)
        reward = self.reward_fn(obs, action, next_obs, params)
        next_obs, next_state = self._apply_transition_gradient_policy(
            next_obs, next_state
        )
        return next_obs, next_state, reward, self.is_terminated(next_state, params), {}

    def is_terminated(self, state, params) -> jax.Array:
        """A crash (the cars within ``collision_distance``) ends the episode (``crash_ends_episode``)."""
        return self._collision(self.get_obs(state), params) & params.crash_ends_episode

    def termination_fn(self, obs, action, next_obs, params=None):
        params = self.default_params if params is None else params
        return self.crash_fn(obs, action, next_obs, params) & params.crash_ends_episode

    def crash_fn(self, obs, action, next_obs, params=None):
        """The cars in collision at ``next_obs`` (a crash under every reading); any leading batch dims."""
        return self._collision(next_obs, self.default_params if params is None else params)

    def state_from_obs(self, obs, key, params=None) -> EnvState:
        """A state with observation ``obs``; the hidden turn from its conditional distribution."""
        turned = obs[9] + _HALF_PI  # > 0: turning left (heading -pi/2 -> 0), < 0: right
        return EnvState(
            agent_xy=obs[0:2], agent_vy=obs[3], other_xy=obs[5:7], other_v=obs[7:9],
            other_heading=obs[9],
            turn_left=jnp.where(turned == 0.0, jax.random.bernoulli(key, 0.5), turned > 0.0),
            time=jnp.zeros((), jnp.int32),
        )

    def reset_env(
        self, key: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState]:
        def f32(*values):
            return jnp.squeeze(jnp.array(values, jnp.float32))

        state = EnvState(
            agent_xy=f32(params.lane_offset, -params.start_distance),
            agent_vy=f32(params.speed),
            other_xy=f32(-params.lane_offset, params.start_distance),
            other_v=f32(0.0, -params.speed),
            other_heading=f32(-_HALF_PI),
            turn_left=jax.random.bernoulli(key, 0.5),
            time=jnp.zeros((), jnp.int32),
        )
        return self.get_obs(state), state

    def get_obs(self, state: EnvState, params=None, key=None) -> jax.Array:
        return jnp.concatenate(
            [
                state.agent_xy,
                jnp.stack([jnp.zeros_like(state.agent_vy), state.agent_vy]),
                jnp.full((1,), _HALF_PI, jnp.float32),
                state.other_xy,
                state.other_v,
                state.other_heading[None],
            ]
        ).astype(jnp.float32)

    @staticmethod
    def _collision(obs, params: EnvParams):
        gap = jnp.hypot(obs[..., 0] - obs[..., 5], obs[..., 1] - obs[..., 6])
        return gap < params.collision_distance

    def reward_fn(self, obs, action, next_obs, params: EnvParams | None = None):
        """Paper Eq. 21, vy of s' (or of s: ``reward_on_next_state``) minus 10 on the step into the
        crash when a crash ends the episode (0 on every step after it), else on every step whose s'
        (or s) is in collision; any leading batch dims."""
        params = self.default_params if params is None else params
        rewarded = jnp.where(params.reward_on_next_state, next_obs, obs)
        into_crash = self._collision(next_obs, params) & ~self._collision(obs, params)
        crash = jnp.where(params.crash_ends_episode, into_crash, self._collision(rewarded, params))
        ended = self._collision(obs, params) & params.crash_ends_episode  # stepping on past the end: 0
        return jnp.where(ended, 0.0, rewarded[..., 3] - 10.0 * crash).astype(jnp.float32)

    def plot_trajectory(self, ax, obs, params: EnvParams | None = None):
        """Both cars' paths over one episode's observations (the start of each is its lowest-t dot)."""
        p = self.default_params if params is None else params
        ax.axhspan(-p.turn_y, p.turn_y, color="0.93", label="intersection")
        ax.plot(obs[:, 0], obs[:, 1], "o-", markersize=3, label="agent")
        ax.plot(obs[:, 5], obs[:, 6], "s-", markersize=3, label="oncoming car")
        ax.set(xlabel="x", ylabel="y", aspect="equal")
        ax.legend(loc="upper left", fontsize=8)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        p = self.default_params if params is None else params
        v = max(p.max_speed, p.speed)
        reach = p.start_distance + p.max_steps_in_episode * p.dt * v
        car = jnp.array([reach, reach, v, v, jnp.pi], dtype=jnp.float32)
        high = jnp.concatenate([car, car])
        return spaces.Box(-high, high, (10,), dtype=jnp.float32)
