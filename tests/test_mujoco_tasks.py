"""envs.make(<MuJoCo task>) against its oracle, Gymnasium's own environment on MuJoCo's CPU physics.

For every task: (1) from Gymnasium's states along its own random-action episodes (contacts, falls
and resets included), one step of ours and one of Gymnasium's with the same action agree in
observation, reward and termination; (2) zero-action and random-action episodes agree in length
and return (16 episodes each side); (3) the first observation has Gymnasium's reset distribution
(128 draws each side). A model file other than Gymnasium's (Brax's hopper) fails (1); the default
hopper that does nothing falls as MuJoCo's does; an episode renders in Brax's viewer.

Gymnasium's environment is v4 (the papers' model files), except pusher: v4 refuses mujoco >= 3,
so the oracle is Pusher-v5 (our model file) with v4's reward, v5's `_get_rew` taken *before* the
step. Each task compiles one stepping function, shared with test_brax_tasks.py (tests/probe.py).
"""

import functools
import os

import gymnasium
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

import envs
from envs import mujoco_tasks

import probe

GYM_IDS = {"hopper": "Hopper-v4", "walker2d": "Walker2d-v4", "halfcheetah": "HalfCheetah-v4", "ant": "Ant-v4",
           "humanoid": "Humanoid-v4", "inverted_pendulum": "InvertedPendulum-v4",
           "inverted_double_pendulum": "InvertedDoublePendulum-v4", "reacher": "Reacher-v4", "pusher": "Pusher-v5"}
# A test's task is in its id ([hopper]): conftest.py runs the tests of a task on one worker, with
# test_brax_tasks.py's default-backend tests of that task, so that they share one compile.
TASKS = list(envs.MUJOCO_TASKS)
NUM_TRANSITIONS, CHUNK = 256, probe.BATCH
# Relative one-step error allowed (float32 MJX vs float64 MuJoCo). Ant: a few steps with contacts
# differ more (MJX finds some contacts within the margin that MuJoCo does not), so ant is bounded
# by quantiles; they fail without our MuJoCo contact frame for capsules (envs/mujoco_tasks.py).
TOL = 1e-4
CONTACT_TASKS = {"ant"}


def _gym(task):
    return gymnasium.make(GYM_IDS[task]).unwrapped


def _gym_reward(g, task, action):
    """Gymnasium's v4 reward for the step about to be taken (pusher: before the step, as v4)."""
    return g._get_rew(action)[0] if task == "pusher" else None


def gym_transitions(task, num, seed=0):
    """`num` one-step transitions of Gymnasium's env from states of its own random-action episodes:
    (qpos, qvel, qacc_warmstart, action in [-1, 1], obs', reward, terminated, contact)."""
    env, _ = envs.make(task)
    g, rng = _gym(task), np.random.default_rng(seed)
    out, episode = [], 0
    g.reset(seed=seed)
    while len(out) < num:
        action = rng.uniform(-1.0, 1.0, env.action_size).astype(np.float32)
        qpos, qvel, warm = g.data.qpos.copy(), g.data.qvel.copy(), g.data.qacc_warmstart.copy()
        g.set_state(qpos, qvel)
        ctrl = np.asarray(env.ctrl(action), np.float64)
        pre = _gym_reward(g, task, ctrl)
        contact = _any_contact(g, ctrl)
        obs, reward, terminated, _, _ = g.step(ctrl)
        out.append((qpos, qvel, warm, action, obs[: env.gym_obs_size], pre if pre is not None else reward,
                    terminated, contact))
        if terminated or g.data.time > 0.4 * env.default_params.max_steps_in_episode * env.dt:
            episode += 1
            g.reset(seed=seed + episode)
    return [np.array(x) for x in zip(*out)]


def _any_contact(g, ctrl):
    """Whether any substep of Gymnasium's next step has a contact (stepped on a scratch copy)."""
    scratch = mujoco.MjData(g.model)
    mujoco.mj_copyData(scratch, g.model, g.data)
    scratch.ctrl[:] = ctrl
    contact = scratch.ncon > 0
    for _ in range(g.frame_skip):
        mujoco.mj_step(g.model, scratch)
        contact |= scratch.ncon > 0
    return contact


def _shared_step(env, task):
    """One step of the task's shared `run` (tests/probe.py): (final obs, reward, terminated)."""
    horizon, params = probe.GYM_HORIZON[task], probe.params_of(env)
    run, _ = probe.runner(env, horizon)

    def step(states, action, key):
        actions = jnp.zeros((CHUNK, horizon, env.action_size)).at[:, 0].set(action)
        _, out = run(states, actions, probe.step_keys(key, horizon), 1, params)
        return tuple(out[k][:, 0] for k in ("final_obs", "reward", "terminated"))

    return step


def one_step_errors(env, task, seed=0, step=None):
    qpos, qvel, warm, action, gym_obs, gym_reward, gym_term, contact = gym_transitions(task, NUM_TRANSITIONS, seed)
    # In chunks: one vmapped call over all 240 humanoid states never returned on this CPU (XLA sat
    # idle, a deadlock; 64 at a time took 1 s).
    step = step or _shared_step(env, task)
    chunks = []
    for i in range(0, len(qpos), CHUNK):
        states = probe.state_from(env, qpos[i:i + CHUNK], qvel[i:i + CHUNK], warm[i:i + CHUNK])
        chunks.append([np.asarray(x) for x in step(states, action[i:i + CHUNK], jax.random.PRNGKey(i))])
    obs, reward, term = (np.concatenate([c[k] for c in chunks]) for k in range(3))
    scale = np.maximum(1.0, np.abs(gym_obs).max(-1))
    obs_err = np.abs(obs[:, : env.gym_obs_size] - gym_obs).max(-1) / scale
    reward_err = np.abs(reward - gym_reward) / np.maximum(1.0, np.abs(gym_reward))
    return obs_err, reward_err, term, gym_term, contact


@pytest.mark.parametrize("task", TASKS)
def test_one_step_agrees_with_gymnasium(task):
    env, _ = envs.make(task)
    obs_err, reward_err, term, gym_term, contact = one_step_errors(env, task)
    if task in CONTACT_TASKS:
        free = ~contact
        assert free.sum() >= 20 and contact.sum() >= 20, "too few steps with and without contact to test"
        # Measured on ant: without contact 98% within 1e-4; with contact median 1.7e-5, 90% 1.2e-4,
        # max 3e-2 (MJX's own capsule frame: median 5e-3, 90% 5.8e-2).
        assert np.quantile(obs_err[free], 0.9) < TOL and np.quantile(reward_err[free], 0.9) < TOL
        assert np.quantile(obs_err[contact], 0.9) < 1e-3, np.quantile(obs_err[contact], 0.9)
        assert obs_err.max() < 0.1 and np.median(obs_err) < TOL, (obs_err.max(), np.median(obs_err))
        assert np.mean(term == gym_term) >= 0.95
    else:
        assert obs_err.max() < TOL, obs_err.max()
        assert reward_err.max() < TOL, reward_err.max()
        np.testing.assert_array_equal(term, gym_term)
    if task in ("hopper", "walker2d", "humanoid", "inverted_pendulum", "inverted_double_pendulum"):
        assert gym_term.sum() >= 2, "the states never reached a fall: the termination rule is untested"


def test_brax_model_file_fails_the_gymnasium_oracle(monkeypatch):
    """The mutant: our hopper with Brax's edited hopper.xml in place of Gymnasium's."""
    import brax

    brax_xml = os.path.join(os.path.dirname(brax.__file__), "envs", "assets", "hopper.xml")
    monkeypatch.setitem(mujoco_tasks.SPECS, "hopper", mujoco_tasks.SPECS["hopper"]._replace(xml=brax_xml))
    env = mujoco_tasks.MujocoTask("hopper")
    params = env.default_params
    # Its own program (a new model is a new compile): one vmapped step, compiled without XLA's backend
    # optimisation (tests/probe.py FAST_COMPILE), since it runs once on NUM_TRANSITIONS states.
    one = jax.jit(jax.vmap(lambda state, action, key: env.step(key, state, action, params)),
                  compiler_options=probe.FAST_COMPILE)

    def step(states, action, key):
        _, _, reward, terminated, _, info = one(states, action, jax.random.split(key, CHUNK))
        return info["final_observation"], reward, terminated

    obs_err, *_ = one_step_errors(env, "hopper", step=step)
    assert obs_err.max() > 100 * TOL


# --- whole episodes: lengths and returns in distribution --------------------------------------------
EPISODES = 16
# Episode horizon of the comparison, past the do-nothing episodes of Gymnasium's tasks that end
# (hopper ~150 steps, walker2d ~120, humanoid ~40, inverted_pendulum ~30, the double ~10) and past
# most random ant episodes (median ~70); tasks that never end are compared on their first steps.
# Pusher's are whole episodes (100 steps; tests/probe.py steps its envs one after another).
HORIZON = {"hopper": 250, "walker2d": 200, "humanoid": 80, "inverted_pendulum": 100,
           "inverted_double_pendulum": 50, "ant": 300, "halfcheetah": 50, "reacher": 50, "pusher": 100}


@functools.lru_cache(maxsize=None)
def our_episodes(task):
    """EPISODES of ours doing nothing, then EPISODES with uniform random actions, to HORIZON steps:
    (lengths, returns), from the task's shared `run`, each env stepped to its first termination."""
    env, params = probe.env_of(task)[0], probe.params_of(probe.env_of(task)[0])
    horizon, steps = probe.GYM_HORIZON[task], HORIZON[task]
    assert 2 * EPISODES == probe.BATCH and steps <= horizon
    _, states = probe.reset(env, jax.random.PRNGKey(7), params)
    scale = jnp.repeat(jnp.array([0.0, 1.0]), EPISODES)[:, None, None]
    actions = scale * jax.random.uniform(jax.random.PRNGKey(8), (probe.BATCH, horizon, env.action_size),
                                         minval=-1.0, maxval=1.0)
    run, _ = probe.runner(env, horizon)
    _, out = run(states, actions, probe.step_keys(jax.random.PRNGKey(9), horizon), steps, params, until_terminated=True)
    terminated, reward = np.asarray(out["terminated"][:, :steps]), np.asarray(out["reward"][:, :steps])
    # An episode is the steps up to its first termination (the auto-reset starts another after it).
    lengths = np.where(terminated.any(1), terminated.argmax(1) + 1, steps)
    totals = (reward * (np.arange(steps) < lengths[:, None])).sum(1)
    return lengths, totals


def gym_episodes(task, horizon, scale, seed=100):
    env, _ = envs.make(task)
    g, rng = _gym(task), np.random.default_rng(seed)
    lengths, totals = [], []
    for i in range(EPISODES):
        g.reset(seed=seed + i)
        total, length = 0.0, 0
        for length in range(1, horizon + 1):
            action = scale * rng.uniform(-1.0, 1.0, env.action_size)
            ctrl = np.asarray(env.ctrl(action.astype(np.float32)), np.float64)
            pre = _gym_reward(g, task, ctrl)
            _, reward, terminated, _, _ = g.step(ctrl)
            total += pre if pre is not None else reward
            if terminated:
                break
        lengths.append(length)
        totals.append(total)
    return np.array(lengths), np.array(totals)


def _agree(ours, theirs, slack):
    se = np.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
    return abs(ours.mean() - theirs.mean()) <= 4 * se + slack


@pytest.mark.parametrize("task", TASKS)
def test_zero_and_random_episodes_agree_with_gymnasium(task):
    horizon = HORIZON[task]
    lengths, totals = our_episodes(task)
    for i, name in enumerate(("zero", "random")):
        ours_len, ours_ret = lengths[i * EPISODES:(i + 1) * EPISODES], totals[i * EPISODES:(i + 1) * EPISODES]
        gym_len, gym_ret = gym_episodes(task, horizon, float(i))
        message = (f"{task} {name}: ours {ours_len.mean():.1f} steps / {ours_ret.mean():.2f}, "
                   f"Gymnasium {gym_len.mean():.1f} / {gym_ret.mean():.2f}")
        assert _agree(ours_len, gym_len, 0.02 * gym_len.mean() + 1), message
        assert _agree(ours_ret, gym_ret, 0.02 * np.abs(gym_ret).mean() + 0.5), message


@pytest.mark.parametrize("task", ["hopper"])
def test_default_hopper_that_does_nothing_falls_as_in_mujoco(task):
    """The default task is the papers' one: Brax's `positional` hopper stood for 1000 steps."""
    env, _ = envs.make(task)
    assert isinstance(env, envs.MujocoTask) and env.backend == envs.DEFAULT_BACKEND == "gymnasium"
    lengths, totals = our_episodes(task)
    assert 100 < lengths[:EPISODES].mean() < 200 and 100 < totals[:EPISODES].mean() < 200


def test_an_episode_renders_in_braxs_viewer(tmp_path):
    env, _ = envs.make("inverted_pendulum")
    policy = lambda obs, carry, key: (jax.random.uniform(key, (env.action_size,), minval=-1, maxval=1), carry)  # noqa: E731
    file, total = envs.render_episode(env, policy, None, jax.random.PRNGKey(0), tmp_path)
    assert file.name == "episode.html" and 0 < total < 1000 and file.stat().st_size > 1000
    # What the page draws: Gymnasium's bodies, at the poses MJX computed along the episode.
    from brax.io import json as brax_json

    states, _, length, _ = jax.jit(envs.rollout, static_argnums=(0, 1))(env, policy, None, jax.random.PRNGKey(0))
    system, frames = envs.render._brax_frames(env, states, int(length))
    scene = brax_json.dumps(system, frames)
    assert '"pole"' in scene and '"cart"' in scene and len(frames) == int(length) > 1
    np.testing.assert_allclose(frames[-1].x.pos, states.data.xpos[int(length) - 1, 1:])


RESETS = 128


@pytest.mark.parametrize("task", TASKS)
def test_reset_distribution_is_gymnasiums(task):
    """Each entry of the first observation: mean and spread as Gymnasium's reset (128 draws each);
    this is what tells a wrong reset noise apart (episode statistics hardly move with it)."""
    env = probe.env_of(task)[0]
    ours = np.concatenate([np.asarray(probe.reset(env, key, probe.params_of(env))[0])[:, : env.gym_obs_size]
                           for key in jax.random.split(jax.random.PRNGKey(3), RESETS // probe.BATCH)])
    g = _gym(task)
    theirs = np.stack([g.reset(seed=1000 + i)[0][: env.gym_obs_size] for i in range(RESETS)])
    se = np.sqrt(ours.var(0, ddof=1) / RESETS + theirs.var(0, ddof=1) / RESETS)
    np.testing.assert_array_less(np.abs(ours.mean(0) - theirs.mean(0)), 5 * se + 1e-5)  # ~200 entries in all
    np.testing.assert_array_less(np.abs(ours.std(0) - theirs.std(0)), 0.3 * theirs.std(0) + 1e-5)
