"""Tests for the DAM environments IcyRoad and Intersection (envs/icy_road.py, envs/intersection.py).

Every rollout goes through `run`; its inputs keep a few fixed shapes so it compiles only a
handful of times (the whole file must stay fast on a shared 2-core CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.icy_road import IcyRoad
from envs.intersection import Intersection

ACCEL, DECEL, CRUISE = 0, 1, 2
# Intersection twice: the default (Eq. 21 as written, no early end) and the reading in which a
# crash ends the episode (envs/intersection.py), whose terminations the generic tests then check.
ENVS = {"IcyRoad": IcyRoad(), "Intersection": Intersection(),
        "Intersection_crash_ends": Intersection(crash_ends_episode=True, reward_on_next_state=True)}
OBS_DIM = {"IcyRoad": 4, "Intersection": 10, "Intersection_crash_ends": 10}
ICY, INTER = ENVS["IcyRoad"], ENVS["Intersection"]
N_ICY = 4000  # Monte Carlo episodes for IcyRoad's fixed action sequences


@functools.partial(jax.jit, static_argnums=(0, 5))
def run(env, keys, actions, turn_left=None, params=None, auto_reset=True):
    """Reset one env per key, then step all with `actions` (N, T); per-step outputs (N, T, ...).

    `turn_left` (N,) fixes the Intersection's hidden turn instead of the reset draw. With
    `auto_reset=False` the steps are `step_env` (no reset after a crash or the time limit), as
    DAM's fixed-length episodes step.
    """

    def one(key, actions, turn_left):
        key_reset, key_steps = jax.random.split(key)
        obs, state = env.reset(key_reset, params)
        if turn_left is not None:
            state = state.replace(turn_left=turn_left)

        def body(carry, xs):
            obs, state = carry
            key, action = xs
            if auto_reset:
                next_obs, state, reward, terminated, truncated, info = env.step(
                    key, state, action, params
                )
            else:
                next_obs, state, reward, terminated, info = env.step_env(
                    key, state, action, env.default_params if params is None else params
                )
                truncated, info = jnp.zeros((), bool), {"final_observation": next_obs}
            out = dict(
                obs=obs,
                next_obs=next_obs,
                final_obs=info["final_observation"],
                reward=reward,
                terminated=terminated,
                truncated=truncated,
            )
            return (next_obs, state), out

        steps = (jax.random.split(key_steps, actions.shape[0]), actions)
        return jax.lax.scan(body, (obs, state), steps)[1]

    return jax.vmap(one)(keys, actions, turn_left)


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def fixed(actions, n):
    """The action sequence `actions` for `n` envs, shape (n, T)."""
    return jnp.tile(jnp.asarray(actions, jnp.int32), (n, 1))


@functools.cache
def random_rollout(name):
    """256 envs, 3 episodes of uniformly random actions (computed once per env)."""
    env = ENVS[name]
    T = 3 * env.default_params.max_steps_in_episode
    actions = jax.random.randint(jax.random.key(4), (256, T), 0, 3)
    out = run(env, keys(256, seed=5), actions)
    return {"actions": actions, **jax.tree.map(np.asarray, out)}


def icy_runs(actions, seed=0, params=ICY.default_params):
    """N_ICY IcyRoad episodes of one action sequence (5 steps), as numpy arrays."""
    out = run(ICY, keys(N_ICY, seed), fixed(actions, N_ICY), params=params)
    return jax.tree.map(np.asarray, out)


def intersection_runs(actions, params=None):
    """Intersection episodes of one action sequence, T steps of `step_env` (stepping on past a
    crash, as DAM does): the other car turns left, then right."""
    out = run(INTER, keys(2), fixed(actions, 2), jnp.array([True, False]), params, False)
    return jax.tree.map(np.asarray, out)


# ---------------------------------------------------------------------------- both envs


@pytest.mark.parametrize("name", ENVS)
def test_reset_step_jit_vmap_shapes_and_dtypes(name):
    env, n, dim = ENVS[name], 64, OBS_DIM[name]
    obs, state = jax.jit(jax.vmap(env.reset))(keys(n))
    actions = jax.vmap(env.action_space().sample)(keys(n, seed=1))
    obs2, state2, reward, term, trunc, info = jax.jit(jax.vmap(env.step))(
        keys(n, seed=2), state, actions
    )
    for o in (obs, obs2, info["final_observation"]):
        assert o.shape == (n, dim) and o.dtype == jnp.float32
    assert reward.shape == (n,) and reward.dtype == jnp.float32
    assert term.shape == trunc.shape == (n,) and term.dtype == trunc.dtype == bool
    assert state.time.dtype == jnp.int32 and bool(jnp.all(state2.time == 1))
    assert not bool(jnp.any(term)) and not bool(jnp.any(trunc))
    assert env.num_actions == 3 and env.name == name.split("_")[0]
    assert env.default_params.max_steps_in_episode == (5 if name == "IcyRoad" else 25)


@pytest.mark.parametrize("name", ENVS)
def test_spaces_contain_observations_and_actions(name):
    env, out, dim = ENVS[name], random_rollout(name), OBS_DIM[name]
    obs_space, act_space = env.observation_space(env.default_params), env.action_space()
    assert obs_space.dtype == jnp.float32 and obs_space.shape == (dim,)
    for o in (out["obs"], out["final_obs"]):
        assert bool(jnp.all(jax.vmap(obs_space.contains)(o.reshape(-1, dim))))
    assert not bool(obs_space.contains(jnp.full(dim, 1e4, jnp.float32)))
    sampled = jax.vmap(act_space.sample)(keys(300))
    assert bool(jnp.all(jax.vmap(act_space.contains)(sampled)))
    assert set(np.unique(sampled).tolist()) == {0, 1, 2}
    assert not bool(act_space.contains(3))


@pytest.mark.parametrize("name", ENVS)
def test_auto_reset_after_time_limit_or_crash(name):
    """gymnax's step: truncated after T steps of an episode, terminated only by a crash where the
    reading ends the episode on it, and an auto-reset after either."""
    env, out = ENVS[name], random_rollout(name)
    T = env.default_params.max_steps_in_episode
    reset_obs = out["obs"][:, 0]
    terminated = out["terminated"]
    if name == "Intersection_crash_ends":  # random actions crash in some episodes
        assert 0 < terminated.any(1).mean() < 1
    else:
        assert not terminated.any()
    step_in_episode = np.zeros(terminated.shape[0], int)
    for t in range(terminated.shape[1]):
        np.testing.assert_array_equal(out["truncated"][:, t], step_in_episode == T - 1)
        done = terminated[:, t] | out["truncated"][:, t]
        np.testing.assert_array_equal(out["next_obs"][done, t], reset_obs[done])  # auto-reset
        # final_observation is the true last observation, not the reset one.
        assert np.all(np.any(out["final_obs"][done, t] != reset_obs[done], axis=-1))
        np.testing.assert_array_equal(out["final_obs"][~done, t], out["next_obs"][~done, t])
        step_in_episode = np.where(done, 0, step_in_episode + 1)


@pytest.mark.parametrize("name", ENVS)
def test_task_functions_equal_step_on_random_rollouts(name):
    env, out = ENVS[name], random_rollout(name)
    obs, actions, final = out["obs"], out["actions"], out["final_obs"]
    np.testing.assert_array_equal(env.reward_fn(obs, actions, final), out["reward"])
    done = env.termination_fn(obs, actions, final)
    assert done.shape == actions.shape and done.dtype == bool
    np.testing.assert_array_equal(done, out["terminated"])
    # The rollouts cover the reward's cases, so the comparison is not vacuous.
    if name == "IcyRoad":
        off_road = np.abs(final[..., 1]) > 1
        bonus = ~off_road & (final[..., 2] > 2)
        assert off_road.any() and bonus.any() and (~off_road & ~bonus).any()
    else:
        crash = env.crash_fn(obs, actions, final)
        assert 0 < crash.mean() < 0.5 and (out["reward"] < 0).any()


@pytest.mark.parametrize("name", ENVS)
def test_task_functions_on_batches_without_vmap(name):
    env, out, dim = ENVS[name], random_rollout(name), OBS_DIM[name]
    obs, next_obs = out["obs"][:8], out["final_obs"][:8]  # leading dims (8, 3T)
    actions = out["actions"][:8]
    reward = env.reward_fn(obs, actions, next_obs)
    assert reward.shape == actions.shape and reward.dtype == jnp.float32
    np.testing.assert_array_equal(reward, out["reward"][:8])
    flat = jax.vmap(env.reward_fn)(obs.reshape(-1, dim), actions.reshape(-1),
                                   next_obs.reshape(-1, dim))
    np.testing.assert_array_equal(reward.reshape(-1), flat)
    done = jax.jit(env.termination_fn)(obs, actions, next_obs)
    assert done.shape == actions.shape and done.dtype == bool
    np.testing.assert_array_equal(done, out["terminated"][:8])
    assert env.termination_fn(obs[0, 0], 0, next_obs[0, 0]).shape == ()
    assert env.reward_fn(obs[0, 0], 0, next_obs[0, 0]) == out["reward"][0, 0]


@pytest.mark.parametrize("cls", [IcyRoad, Intersection])
def test_constructor_overrides_and_errors(cls):
    env = cls(dt=0.75, max_steps_in_episode=7)
    assert env.default_params.dt == 0.75 and env.default_params.max_steps_in_episode == 7
    with pytest.raises(ValueError, match="max_steps_in_episode"):  # lists the valid fields
        cls(not_a_field=1.0)
    with pytest.raises(ValueError, match="dt"):
        cls(dt=0.0)


def test_invalid_values_raise():
    with pytest.raises(ValueError, match="swerve_prob"):
        IcyRoad(swerve_prob=1.5)
    with pytest.raises(ValueError, match="swerve_speed"):
        IcyRoad(swerve_speed=0.5)
    with pytest.raises(ValueError, match="collision_distance"):
        Intersection(collision_distance=2.5)
    with pytest.raises(ValueError, match="start_distance"):
        Intersection(start_distance=1.0)


# ------------------------------------------------------------------------------ IcyRoad


def test_icy_road_start_actions_and_speed_floor():
    obs, _ = ICY.reset(jax.random.key(0))
    np.testing.assert_array_equal(obs, [0.0, 0.0, 1.0, 0.0])
    # At xdot <= 2 the dynamics are deterministic Euler steps: (actions, xdot, x).
    for actions, xdot, x in [
        ([DECEL] * 5, [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]),  # speed floor at 0
        ([CRUISE] * 5, [1, 1, 1, 1, 1], [1, 2, 3, 4, 5]),
        ([ACCEL, DECEL, DECEL, DECEL, ACCEL], [2, 1, 0, 0, 1], [2, 3, 3, 3, 4]),
    ]:
        final = icy_runs(actions)["final_obs"]
        assert np.all(final[..., 2] == xdot) and np.all(final[..., 0] == x)
        assert np.all(final[..., 1] == 0) and np.all(final[..., 3] == 0)  # no swerve


def test_icy_road_swerve_is_bimodal_and_persistent():
    p = ICY.default_params
    # The second acceleration reaches xdot = 3 > 2 from the paper's s = (2, 0, 2, 0).
    out = icy_runs([ACCEL, ACCEL, CRUISE, DECEL, DECEL], seed=8)
    final = out["final_obs"]
    assert np.all(final[:, 0] == [2.0, 0.0, 2.0, 0.0])
    ydot = final[:, 1, 3]
    swerved = ydot != 0
    assert set(np.unique(ydot).tolist()) == {-p.swerve_speed, 0.0, p.swerve_speed}
    assert abs(swerved.mean() - p.swerve_prob) < 0.03
    assert 0.45 < (ydot > 0).sum() / swerved.sum() < 0.55  # +y and -y equally likely
    # A swerve leaves the road at once and the car stays off it, even after slowing down.
    assert np.all(np.abs(final[swerved, 1:, 1]) > p.road_half_width)
    assert np.all(out["reward"][swerved, 1:] == final[swerved, 1:, 2] - 6)
    # Cars that stay fast face the draw again (cruise at xdot = 3); slow cars never swerve.
    late = ~swerved & (final[:, 2, 3] != 0)
    assert late.any() and np.all(final[~swerved & ~late, 2:, 3] == 0)


def test_icy_road_unimodal_gaussian_fit_is_badly_wrong():
    """Fig. 2: a Gaussian fitted to p(s' | s=(2,0,2,0), accelerate) puts mass on the road."""
    p = ICY.default_params
    out = icy_runs([ACCEL, ACCEL, CRUISE, CRUISE, CRUISE], seed=9)
    obs, next_obs = out["obs"][:, 1], out["final_obs"][:, 1]
    # Maximum-likelihood diagonal Gaussian over s', and samples from it.
    normal = np.asarray(jax.random.normal(jax.random.key(10), next_obs.shape))
    fake = next_obs.mean(0) + next_obs.std(0) * normal
    y_true, y_fake = np.abs(next_obs[:, 1]), np.abs(fake[:, 1])
    # The model invents states between the modes that never happen...
    assert np.mean((y_true > 0.5) & (y_true < 1.5)) == 0
    assert np.mean((y_fake > 0.5) & (y_fake < 1.5)) > 0.2
    # ...overestimates staying on the road at high speed...
    assert np.mean(y_fake <= p.road_half_width) > np.mean(y_true <= p.road_half_width) + 0.15
    # ...and so prefers the gamble to cruising at xdot = 2 (reward 2), which truly is better.
    cruise_reward = float(ICY.reward_fn(obs[0], CRUISE, obs[0]))
    assert cruise_reward == 2.0
    assert float(ICY.reward_fn(obs, ACCEL, fake).mean()) > cruise_reward + 0.5
    assert float(ICY.reward_fn(obs, ACCEL, next_obs).mean()) < cruise_reward - 1.0


def test_icy_road_greedy_policy_is_not_optimal():
    policies = {
        "cruise": [CRUISE] * 5,
        "careful": [ACCEL] + [CRUISE] * 4,  # to the threshold speed and hold it
        "greedy_twice": [ACCEL, ACCEL] + [CRUISE] * 3,  # chase the +8 bonus
        "always_accelerate": [ACCEL] * 5,
    }
    returns = {k: icy_runs(a, seed=11)["reward"].sum(1) for k, a in policies.items()}
    mean = {k: r.mean() for k, r in returns.items()}
    stderr = {k: r.std() / np.sqrt(N_ICY) for k, r in returns.items()}
    assert stderr["careful"] == 0.0 and mean["careful"] > mean["cruise"]
    never_swerves = ICY.default_params.replace(swerve_prob=0.0)
    for greedy in ("greedy_twice", "always_accelerate"):
        assert mean[greedy] + 5 * stderr[greedy] < mean["careful"]
        # Without the swerve risk greedy would be best: the risk is the whole story.
        safe = icy_runs(policies[greedy], params=never_swerves)["reward"].sum(1)
        assert np.all(safe > mean["careful"])


@pytest.mark.parametrize("semi_implicit", [True, False])
@pytest.mark.parametrize("on_next", [True, False])
def test_icy_road_readings_of_appendix_c_give_their_closed_form_returns(semi_implicit, on_next):
    """Expected returns by hand from Appendix C, for each reading of its open choices (envs/icy_road.py):
    the Euler step (semi-implicit: a swerve leaves the road in its own step; explicit: one step later)
    and where Eq. 20 is evaluated (s' or s). q = 1 - swerve_prob: the chance of no swerve per fast step."""
    params = ICY.default_params.replace(semi_implicit_euler=semi_implicit, reward_on_next_state=on_next)
    q = 1 - params.swerve_prob
    fast_on_road, fast_off_road = 3 + 8.0, 3 - 6.0  # xdot = 3: bonus, or the penalty off the road
    # The last step accelerates to xdot 3: its reward counts only on s', and is the bonus for sure
    # when the swerve moves the car one step later.
    last = (fast_on_road if not semi_implicit else q * fast_on_road + (1 - q) * fast_off_road) if on_next else 2.0
    # Twice to xdot 3 at step 2, then cruise: on s', step k >= 2 (1-based) is on the road iff no
    # swerve in the steps that already moved the car (k - 1 of them semi-implicit, k - 2 explicit).
    fast_steps = [k - 1 if semi_implicit else k - 2 for k in range(2, 6)] if on_next else [
        k - 2 if semi_implicit else k - 3 for k in range(3, 6)]
    greedy = (2.0 if on_next else 1.0 + 2.0) + sum(q**n * fast_on_road + (1 - q**n) * fast_off_road for n in fast_steps)
    expected = {"careful": 10.0 if on_next else 9.0, "late": 8.0 + last if on_next else 9.0, "greedy_twice": greedy}
    for name, actions in [("careful", [ACCEL] + [CRUISE] * 4), ("late", [ACCEL, CRUISE, CRUISE, CRUISE, ACCEL]),
                          ("greedy_twice", [ACCEL, ACCEL, CRUISE, CRUISE, CRUISE])]:
        returns = icy_runs(actions, seed=12, params=params)["reward"].sum(1)
        assert abs(returns.mean() - expected[name]) <= 5 * returns.std() / np.sqrt(N_ICY) + 1e-5, (
            name, returns.mean(), expected[name])


# ------------------------------------------------------------------------- Intersection


def test_intersection_start_and_simultaneous_entry():
    p = INTER.default_params
    obs, _ = INTER.reset(jax.random.key(0))
    half_pi = np.pi / 2
    expected = [p.lane_offset, -p.start_distance, 0, p.speed, half_pi,
                -p.lane_offset, p.start_distance, 0, -p.speed, -half_pi]
    np.testing.assert_array_equal(obs, np.array(expected, np.float32))
    final = intersection_runs([CRUISE] * p.max_steps_in_episode)["final_obs"][0]
    agent_in, other_in = final[:, 1] >= -p.turn_y, final[:, 6] <= p.turn_y
    assert agent_in.any() and np.array_equal(agent_in, other_in)


def test_intersection_speed_changes_and_bounds():
    p = INTER.default_params
    T = p.max_steps_in_episode
    steps = np.arange(1, 4)
    for action, expected in [
        (ACCEL, p.speed + p.accel * steps),
        (DECEL, p.speed - p.accel * steps),
        (CRUISE, np.full(3, p.speed)),
    ]:
        vy = intersection_runs([action] * T)["final_obs"][:, :3, 3]
        np.testing.assert_allclose(vy, np.tile(expected, (2, 1)), rtol=1e-6)
    vy = intersection_runs([DECEL] * T)["final_obs"][..., 3]
    assert vy.min() == 0.0 and np.all(vy[:, int(p.speed / p.accel) :] == 0)
    vy = intersection_runs([ACCEL] * T)["final_obs"][1, :, 3]  # right turn: no crash
    assert vy.max() == p.max_speed and np.all(vy[-3:] == p.max_speed)


def test_intersection_turn_is_hidden_random_and_bimodal():
    _, state = jax.vmap(INTER.reset)(keys(2000, seed=12))
    assert 0.45 < float(state.turn_left.mean()) < 0.55
    # Same actions, left vs right turn: identical observations until the turn starts.
    final = intersection_runs([DECEL] * INTER.default_params.max_steps_in_episode)["final_obs"]
    differs = np.any(final[0] != final[1], axis=-1)
    first = int(np.argmax(differs))
    assert first > 0 and differs[first:].all()
    np.testing.assert_array_equal(final[0, :, :5], final[1, :, :5])  # agent unaffected
    other_vx = final[:, first, 7]
    assert other_vx[0] > 1 and other_vx[1] < -1  # left turn towards +x, right towards -x
    # With the reset's own draws, that step's p(s'|s, a) has two modes of about 1/2 each.
    vx = random_rollout("Intersection")["final_obs"][:, first, 7]
    assert np.all(np.abs(vx) > 1) and 0.4 < np.mean(vx > 0) < 0.6


def test_intersection_collisions_depend_on_turn_and_braking():
    T = INTER.default_params.max_steps_in_episode

    def crashes(actions):
        return np.asarray(INTER.crash_fn(None, None, intersection_runs(actions)["final_obs"]))  # (left, right) x T

    cruise = crashes([CRUISE] * T)
    assert cruise[0].any() and not cruise[1].any()  # collides only on a left turn
    greedy = crashes([ACCEL] * T)
    assert greedy[0].any() and not greedy[1].any()
    for then in (ACCEL, CRUISE):  # braking first avoids both outcomes
        assert not crashes([DECEL] * 5 + [then] * (T - 5)).any()
    # Eq. 21 on s, every step: the crash (s' of step `first` in collision) costs nothing on its own
    # step, vy - 10 on the next (the crash speed), then -10 on every step: the cars stay frozen in
    # collision and the episode is never terminated.
    out = intersection_runs([ACCEL] * T)
    first = int(np.argmax(greedy[0]))
    assert first < T - 2 and greedy[0, first:].all() and not greedy[0, :first].any()
    assert out["reward"][0, first] == out["obs"][0, first, 3]
    assert out["reward"][0, first + 1] == out["final_obs"][0, first, 3] - 10.0
    assert np.all(out["reward"][0, first + 2 :] == -10.0)
    assert not out["terminated"].any()
    stopped = out["final_obs"][0, first + 1 :]
    assert np.all(stopped == out["final_obs"][0, -1]) and np.all(stopped[:, [2, 3, 7, 8]] == 0)


def test_intersection_greedy_policy_is_not_optimal():
    T = INTER.default_params.max_steps_in_episode
    policies = {
        "cruise": [CRUISE] * T,
        "always_accelerate": [ACCEL] * T,
        "brake_then_go": [DECEL] * 5 + [ACCEL] * (T - 5),
    }
    # Returns for (left, right): the turn is the only randomness, 1/2 each, so the mean
    # of the two is the exact expected return.
    returns = {k: intersection_runs(a)["reward"].sum(1) for k, a in policies.items()}
    expected = {k: r.mean() for k, r in returns.items()}
    assert expected["always_accelerate"] < expected["brake_then_go"]
    assert expected["cruise"] < expected["brake_then_go"]
    # Greedy wins when the car turns right: caution has a price and is still worth it.
    assert returns["always_accelerate"][1] > returns["brake_then_go"][1]


@pytest.mark.parametrize("ends, stops", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("on_next", [True, False])
def test_intersection_readings_of_eq21_give_their_closed_form_returns(ends, stops, on_next):
    """Always accelerating into the left turn, under each reading of Eq. 21 (envs/intersection.py):
    the crash ends the episode (-10 once), or costs -10 on every step in collision with the cars
    frozen or driving on; the reward read on s' or on s. The oracle is built without any crash:
    the agent's speeds and positions by hand (vy_t = min(5 + t, 10), y_t = y_0 + dt sum vy), the
    oncoming car's positions from a crash-free episode of the default env (braking from the start)."""
    p = INTER.default_params
    T, dt = p.max_steps_in_episode, p.dt
    vy = np.minimum(p.speed + p.accel * np.arange(T + 1), p.max_speed)  # s_0 .. s_T
    agent_y = -p.start_distance + dt * np.concatenate([[0.0], np.cumsum(vy[1:])])
    other = intersection_runs([DECEL] * T)["final_obs"][0]  # left turn, no crash: the other car's path
    other_xy = np.concatenate([[[-p.lane_offset, p.start_distance]], other[:, 5:7]])
    gap = np.hypot(p.lane_offset - other_xy[:, 0], agent_y - other_xy[:, 1])
    hit = gap < p.collision_distance  # s_t in collision, had the cars driven on
    c = int(np.argmax(hit))  # the step into the crash (s_c is the first state in collision)
    assert 0 < c < T - 2 and hit.sum() < T - c  # a crash, and driving on, the cars part again
    if ends:  # -10 once, on the transition into the crash; nothing after it
        expected = (vy[1:c + 1].sum() if on_next else vy[:c].sum()) - 10.0
    elif stops:  # frozen from s_c on: vy 0, in collision on every later state
        expected = vy[1:c + 1].sum() - 10.0 * (T - c + 1) if on_next else vy[:c + 1].sum() - 10.0 * (T - c)
    else:  # driving on: every state's own vy and collision
        expected = vy[1:].sum() - 10.0 * hit[1:].sum() if on_next else vy[:-1].sum() - 10.0 * hit[:-1].sum()
    params = p.replace(crash_ends_episode=ends, crash_stops_cars=stops, reward_on_next_state=on_next)
    out = intersection_runs([ACCEL] * T, params)
    np.testing.assert_allclose(out["reward"][0].sum(), expected, rtol=1e-5)
    assert out["terminated"][0].any() == ends and not out["terminated"][1].any()
    # The right turn never collides: its return is the speeds' alone under every reading.
    np.testing.assert_allclose(out["reward"][1].sum(), vy[1:].sum() if on_next else vy[:-1].sum(), rtol=1e-5)
