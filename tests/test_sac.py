"""algorithms/sac.py: learns inverted_pendulum, determinism, vmapped seed == single seed, the
critic target's bootstrapping, replay-buffer contents across truncation and termination, exact
resume, argument errors and a CLI smoke run.

Every run shares ONE compiled epoch: TINY (3000 steps, the learning test) and SHORT (its first
1000 steps) differ only in `total_timesteps`, which no shape depends on (the buffer size is
fixed), so the suite compiles the epoch twice: vmapped over 2 seeds and over 1 seed (first in
the CLI subprocess of `seed1`; the persistent XLA cache of conftest.py serves the later ones)."""

import functools
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import tyro

import envs
from algorithms import sac, utils

SCRIPT = Path(sac.__file__).resolve()
TINY = dict(env_id="inverted_pendulum", backend="positional", total_timesteps=3000, buffer_size=3000, epoch_length=250, init_steps=500,
            updates_per_step=2, sac_width=64, sac_batch_size=128, progress=False)
SHORT = {**TINY, "total_timesteps": 1000}  # 2 random-action epochs, 2 learning epochs
CLI_SHORT = ["--env-id", "inverted_pendulum", "--backend", "positional", "--total-timesteps", "1000", "--buffer-size", "3000",
             "--epoch-length", "250", "--init-steps", "500", "--updates-per-step", "2", "--sac-width", "64",
             "--sac-batch-size", "128", "--no-progress"]
KEYS = ["env_steps", "eval/return", "charts/train_return", "charts/train_episodes", "charts/alpha",
        "charts/entropy", "charts/steps_per_second", "losses/critic", "losses/actor", "losses/alpha"]
TIMING = ["charts/steps_per_second"]  # the one metric that differs between identical runs


def _run(run_dir, config=SHORT, **overrides):
    """A run; returns (run directory, metrics DataFrame without the timing column)."""
    path, _ = sac.run(sac.Args(**{**config, "run_dir": str(run_dir), **overrides}))
    return path.path, pd.read_csv(path.path / "metrics.csv").drop(columns=TIMING)


def _summary(path):
    summary = json.loads((Path(path) / "summary.json").read_text())
    summary.pop("run_dir")
    return summary


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """TINY, seeds 0 and 1 in one vmapped run."""
    return _run(tmp_path_factory.mktemp("two_seeds"), TINY, seed=0, num_seeds=2)


@pytest.fixture(scope="module")
def seed1(tmp_path_factory):
    """SHORT, seed 1 alone, through the command line from another working directory, tracked."""
    run_dir = tmp_path_factory.mktemp("seed1")
    # With both trackers on (W&B offline: no network), which must not change any result.
    result = subprocess.run([sys.executable, str(SCRIPT), *CLI_SHORT, "--seed", "1", "--run-dir", str(run_dir),
                             "--track", "--wandb-project", "mbrl-test"], env={**os.environ, "WANDB_MODE": "offline"},
                            cwd=run_dir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = [p for p in run_dir.iterdir() if p.is_dir()]
    return path, pd.read_csv(path / "metrics.csv").drop(columns=TIMING), result


@functools.lru_cache(maxsize=None)
def _trainer():
    args = sac.resolve(sac.Args(**TINY))
    return args, sac.make_train(args)


def _run_programs(args, trainer):
    """(init, chunk) jitted as sac.run jits them: one seed of TINY's epoch is then the program that
    the CLI run of `seed1` compiled (conftest.py reads it from the subprocesses' cache)."""
    mesh = utils.seed_mesh(args)
    init = utils.over_devices(jax.vmap(trainer.init), mesh, donate=False)
    return lambda keys: init(utils.on_devices(keys, mesh)), utils.over_devices(
        jax.vmap(trainer.chunk, in_axes=(0, None)), mesh, replicated=1)


# ---------------------------------------------------------------------------------------------
def test_learns_inverted_pendulum(two_seeds):
    _, df = two_seeds
    assert set(KEYS) - set(TIMING) <= set(df.columns)
    curve = df.pivot(index="env_steps", columns="seed", values="eval/return")
    print("\neval/return per epoch:\n" + curve.round(1).T.to_string())
    # A uniform-random policy balances for ~10-40 steps; so does the untrained policy.
    assert (curve.iloc[0] < 60).all()
    # Measured on 6 seeds before the reference's data path (--add-at-episode-end): every seed >= 100
    # from 2000 steps on, 100-270 typical; with it, this fixture's 2 seeds: 122-274 from 1250 steps on.
    assert (curve.iloc[-4:].max() > 80).all(), curve.iloc[-4:]
    assert curve.iloc[-4:].to_numpy().mean() > 80
    # Losses are NaN before init_steps (no updates) and finite after; alpha is tuned.
    learning = df["env_steps"] > TINY["init_steps"]
    assert df.loc[~learning, "losses/critic"].isna().all()
    assert np.isfinite(df.loc[learning, ["losses/critic", "losses/actor", "losses/alpha", "charts/alpha"]]).all().all()
    assert (df.loc[learning, "charts/alpha"] < 1.0).all()
    # Random-action epochs end many episodes (~10-40 steps each); a trained policy may balance through
    # a whole 250-step epoch, which then reports no training return (NaN), never a stale one.
    assert (df.loc[~learning, "charts/train_episodes"] > 3).all()
    np.testing.assert_array_equal(df["charts/train_episodes"] == 0, df["charts/train_return"].isna())


def test_same_seed_identical(seed1, tmp_path):
    """Two runs of seed 1 (the CLI's and an in-process one) give identical metrics."""
    pd.testing.assert_frame_equal(seed1[1], _run(tmp_path, seed=1)[1])


def test_vmapped_seed_equals_single_run(two_seeds, seed1, tmp_path):
    """Seed 1 is the same run wherever it sits in a vmapped batch (exact), and the same as
    seed 1 alone up to float rounding: XLA rounds a batch-1 matmul differently from a batch-2
    one (~5e-7 after one update, measured), which training then amplifies chaotically (eval
    returns differ from the 2nd learning epoch on), so only the first learning epoch is compared."""
    vmapped = two_seeds[1].query("seed == 1 and env_steps <= 1000").reset_index(drop=True)
    _, other = _run(tmp_path, seed=1, num_seeds=2)  # seeds 1, 2: seed 1 now first in the batch
    pd.testing.assert_frame_equal(vmapped, other.query("seed == 1").reset_index(drop=True))

    single = seed1[1]
    random_phase = single["env_steps"] <= SHORT["init_steps"]
    pd.testing.assert_frame_equal(vmapped[random_phase], single[random_phase])
    first = single["env_steps"] == SHORT["init_steps"] + SHORT["epoch_length"]
    columns = ["losses/critic", "losses/actor", "losses/alpha", "charts/alpha", "charts/entropy"]
    np.testing.assert_allclose(vmapped.loc[first, columns], single.loc[first, columns], rtol=1e-3)
    np.testing.assert_allclose(vmapped.loc[first, "eval/return"], single.loc[first, "eval/return"], atol=1.0)


# ---------------------------------------------------------------------------------------------
def test_critic_target_bootstraps_unless_terminated():
    """On a hand-made batch: terminated rows get exactly r; the others r + gamma (min target Q -
    alpha log pi), written out by hand; and `sac_update`'s critic loss uses this target."""
    args, trainer = _trainer()
    state = jax.jit(trainer.init)(jax.random.PRNGKey(0)).sac
    state = state._replace(log_alpha=jnp.float32(-1.0))  # alpha != 1, so its factor is checked
    n, obs_size = 6, 4
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
    obs, next_obs = jax.random.normal(k1, (n, obs_size)), jax.random.normal(k2, (n, obs_size))
    action = jax.random.uniform(k3, (n, 1), minval=-1, maxval=1)
    reward = jnp.arange(1.0, n + 1.0)
    terminated = jnp.array([1, 0, 1, 0, 0, 1], bool)

    @jax.jit
    def compute(state):
        target = sac.critic_target(state, reward, next_obs, terminated, k4, args.gamma)
        by_hand = []
        for i, key in enumerate(jax.random.split(k4, n)):
            a, logp = sac.sample_action(state.actor, next_obs[i], key)
            q = jnp.min(state.target_critics(next_obs[i], a))
            by_hand.append(reward[i] + args.gamma * (q - jnp.exp(-1.0) * logp))
        update_key = jax.random.PRNGKey(2)
        _, metrics = sac.sac_update(args, state, (obs, action, reward, next_obs, terminated), update_key)
        next_key = jax.random.split(update_key)[0]  # the key sac_update gives critic_target
        update_target = sac.critic_target(state, reward, next_obs, terminated, next_key, args.gamma)
        q = jax.vmap(state.critics)(obs, action)
        return target, jnp.stack(by_hand), metrics["losses/critic"], 2 * jnp.mean((q - update_target[:, None]) ** 2)

    target, by_hand, loss, expected_loss = compute(state)
    np.testing.assert_array_equal(target[terminated], reward[terminated])
    bootstrapped = ~terminated
    np.testing.assert_allclose(target[bootstrapped], by_hand[bootstrapped], rtol=1e-5)
    assert (np.abs(target - reward)[bootstrapped] > 1e-3).all()  # the bootstrap term is really there
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


def test_buffer_stores_true_next_obs_and_termination_only():
    """One random-action epoch (the compiled epoch of the runs) from a state 5 steps before the
    time limit: the first episode is truncated, the later ones end by falling. The buffer holds
    `terminated` exactly where the task's rule says so (not at the truncation) and the true,
    pre-reset next observation."""
    args, trainer = _trainer()
    init, chunk = _run_programs(args, trainer)
    state = init(sac.seed_keys(args))
    time = jax.device_put(jnp.full(1, 995, jnp.int32), state.env_state.time.sharding)  # placed as sac.run's
    state = state._replace(env_state=state.env_state.replace(time=time))
    state, _ = chunk(state, np.int32(0))  # as sac.run calls it
    buf = jax.tree.map(lambda x: np.asarray(x[0]), state.buffer)
    steps = args.epoch_length
    assert buf.size == steps
    obs, action, next_obs, terminated = (x[:steps] for x in (buf.data.obs, buf.data.action, buf.data.next_obs, buf.data.terminated))
    env, _ = envs.make("inverted_pendulum", backend="positional")
    np.testing.assert_array_equal(terminated, np.asarray(env.termination_fn(obs, action, next_obs)))
    # Within an episode next_obs is the next obs; an episode end (next_obs != the following obs,
    # which is the reset one) is stored with its true final observation.
    ends = np.append(~np.isclose(next_obs[:-1], obs[1:]).all(-1), True)
    np.testing.assert_array_equal(next_obs[:-1][~ends[:-1]], obs[1:][~ends[:-1]])
    assert np.nonzero(ends)[0][0] == 4 and not terminated[4]  # the truncation, stored as not terminated
    assert terminated[5:-1].sum() == ends[5:-1].sum() > 3  # every later episode ended by falling
    # The episode in progress: the rows since the last end (the last row's own end is unknown here).
    in_progress = steps - 1 - np.nonzero(ends[:-1])[0][-1]
    assert int(state.unfinished[0]) == in_progress > 0
    # MBPO's reference pools a path when it ends: SAC's batches must not reach those rows. Poisoned
    # (observations 1e6), drawn rows blow the critic loss up (measured with them drawn: 2.5e8-4.7e8).
    poison = lambda x: x.at[:, steps - in_progress:steps].set(1e6)  # noqa: E731
    poisoned = state._replace(buffer=state.buffer._replace(data=state.buffer.data._replace(
        obs=poison(state.buffer.data.obs), next_obs=poison(state.buffer.data.next_obs))))
    update = jax.jit(jax.vmap(functools.partial(sac.update, args)))
    keys = jax.random.split(jax.random.PRNGKey(7), (20, 1))
    losses = np.array([float(update(poisoned, k)[1]["losses/critic"][0]) for k in keys])
    assert np.all(losses < 1e3), losses.max()


def test_pendulum_gets_the_policys_actions_on_its_torque_bounds():
    """Actions live in [-1, 1] (tanh policy, random phase, buffer); pendulum's torque bounds are
    [-2, 2], so the env must get them rescaled: the reward it returned for each stored transition is
    the task's reward of twice the stored action (the torque cost 0.001 u^2 tells 2a from a)."""
    args = sac.resolve(sac.Args(**{**SHORT, "env_id": "pendulum", "add_at_episode_end": False}))
    trainer = sac.make_train(args)
    state = jax.jit(jax.vmap(trainer.init))(sac.seed_keys(args))
    state, _ = jax.jit(jax.vmap(trainer.chunk, in_axes=(0, None)))(state, jnp.int32(0))  # random actions
    # --no-add-at-episode-end: no row is held back (with the default, the 50 rows after pendulum's
    # 200-step episode would be).
    assert int(state.unfinished[0]) == 0 and int(state.env_state.time[0]) == 50
    buf = jax.tree.map(lambda x: np.asarray(x[0]), state.buffer)
    n = args.epoch_length
    obs, action, reward, next_obs = buf.data.obs[:n], buf.data.action[:n], buf.data.reward[:n], buf.data.next_obs[:n]
    assert np.abs(action).max() <= 1.0 and np.abs(action).max() > 0.95
    env, _ = envs.make("pendulum")
    np.testing.assert_allclose(reward, env.reward_fn(obs, 2.0 * action, next_obs), rtol=1e-5, atol=1e-5)  # as test_pendulum_env.py
    assert np.abs(reward - np.asarray(env.reward_fn(obs, action, next_obs))).max() > 1e-3
    identity = utils.to_env_actions(*envs.make("hopper"))  # the MuJoCo tasks' bounds are [-1, 1]: no arithmetic
    a = jnp.array([0.3, -1.0, 1.0])
    assert identity(a) is a


def test_buffer_ring_keeps_the_latest():
    buf = sac.Buffer.empty(3, 2, 1)
    for i in range(5):
        buf = buf.add((jnp.full(2, i), jnp.full(1, i), jnp.float32(i), jnp.full(2, i + 1), jnp.bool_(i == 4)))
    assert int(buf.size) == 3 and int(buf.insert_pos) == 2
    np.testing.assert_array_equal(buf.data.reward, [3.0, 4.0, 2.0])
    np.testing.assert_array_equal(buf.data.terminated, [False, True, False])
    sampled = buf.sample(jax.random.PRNGKey(0), 100).reward
    assert set(np.asarray(sampled).tolist()) == {2.0, 3.0, 4.0}
    # The newest `hidden` rows (the episode in progress) are never drawn, full ring or not.
    assert set(np.asarray(buf.sample(jax.random.PRNGKey(0), 100, 1).reward).tolist()) == {2.0, 3.0}
    part = sac.Buffer.empty(5, 2, 1)
    for i in range(4):
        part = part.add((jnp.full(2, i), jnp.full(1, i), jnp.float32(i), jnp.full(2, i + 1), jnp.bool_(False)))
    assert set(np.asarray(part.sample(jax.random.PRNGKey(0), 100, 2).reward).tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------------------------------------
def test_resume_after_kill_is_exact(seed1, tmp_path, monkeypatch):
    """Killed after writing epoch 4's metrics but before its checkpoint (the checkpoint holds a
    learning agent): the resumed run drops that row, continues from epoch 3 and ends exactly
    like the uninterrupted `seed1`."""
    write = utils.RunDir.write_metrics
    calls = []

    def killed_on_4th(self, metrics, first_seed):
        write(self, metrics, first_seed)
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(utils.RunDir, "write_metrics", killed_on_4th)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, seed=1, run_name="killed")
    monkeypatch.undo()
    path = tmp_path / "killed"
    assert json.loads((path / "checkpoint.json").read_text())["env_steps"] == 750
    assert len(pd.read_csv(path / "metrics.csv")) == 4
    sac.run(sac.Args(resume=str(path)))
    pd.testing.assert_frame_equal(seed1[1], pd.read_csv(path / "metrics.csv").drop(columns=TIMING))
    assert _summary(path) == _summary(seed1[0])


@pytest.mark.parametrize("algo", ["sac", "mbpo"])
def test_init_alpha_is_the_starting_temperature(algo):
    """--init-alpha sets alpha = exp(log_alpha) at the start (default 1, as softlearning); traced
    eagerly on pendulum with the smallest networks."""
    import importlib

    module = importlib.import_module(f"algorithms.{algo}")
    for value in (1.0, 0.1):
        args = module.resolve(module.Args(env_id="pendulum", total_timesteps=1000, epoch_length=250, init_steps=250,
                                          sac_width=4, init_alpha=value,
                                          **({"rollout_batch_size": 10, "model_width": 4} if algo == "mbpo" else {})))
        state = module.init(args, *module.make_env(args), jax.random.PRNGKey(0))
        np.testing.assert_allclose(float(jnp.exp(state.sac.log_alpha)), value, rtol=1e-6)


def test_bad_arguments_fail_before_compiling(tmp_path, capsys):
    cases = [
        (dict(env_id="nope"), "unknown env 'nope'"),
        (dict(env_id="IcyRoad"), "continuous-action task"),
        (dict(updates_per_step=0), "--updates-per-step must be positive"),
        (dict(sac_batch_size=5000), "larger than the replay buffer"),
        (dict(buffer_size=100), "larger than the replay buffer"),
        (dict(total_timesteps=3100), "multiple of --epoch-length"),
        (dict(init_steps=3000), "must exceed --init-steps"),
        (dict(backend="nope"), "unknown backend"),
        (dict(init_alpha=0.0), "--init-alpha must be positive"),
    ]
    for overrides, message in cases:
        with pytest.raises(SystemExit, match=message):
            sac.run(sac.Args(**{**TINY, "run_dir": str(tmp_path), **overrides}))
    assert not any(tmp_path.iterdir())  # no run directory was created
    with pytest.raises(SystemExit):
        tyro.cli(sac.Args, args=["--help"])
    assert "G, SAC gradient updates per env step" in capsys.readouterr().out


def test_cli_smoke(seed1):
    """`python algorithms/sac.py ...` from another directory (the `seed1` fixture): exit code 0,
    a metrics.csv pandas reads with every metric, the summary as the last stdout line."""
    path, _, result = seed1
    df = pd.read_csv(path / "metrics.csv")
    assert len(df) == 4 and set(KEYS) <= set(df.columns)
    assert df["env_steps"].tolist() == [250, 500, 750, 1000]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["env_steps"] == 1000 and summary == json.loads((path / "summary.json").read_text())


def _tensorboard_scalars(directory):
    """{tag: [(step, value), ...]} from TensorBoard event files (TFRecord: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for file in sorted(Path(directory).glob("events.out.tfevents.*")):
        data, i = file.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _wandb_history(file):
    """The logged rows of an offline W&B run file: a LevelDB-style log (7-byte ':W&B' header, then
    32 KiB blocks of chunks: crc32, length, type (1 full, 2 first, 3 middle, 4 last)) of
    wandb_internal_pb2.Record messages; wandb 0.31 ships no reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data, i, pending, rows = Path(file).read_bytes(), 7, b"", []
    while i + 7 <= len(data):
        room = 32768 - i % 32768
        _, length, kind = struct.unpack("<IHB", data[i:i + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):  # padding to the end of the block
            i += room
            continue
        pending, i = pending + data[i + 7:i + 7 + length], i + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_tracking_tensorboard_and_wandb_offline(seed1):
    path, df, _ = seed1
    scalars = _tensorboard_scalars(path / "tensorboard" / "seed1")
    assert set(KEYS) <= set(scalars)  # every metric, one point per epoch at its env step
    steps, values = zip(*scalars["eval/return"])
    assert list(steps) == df["env_steps"].tolist()
    np.testing.assert_allclose(values, df["eval/return"], rtol=1e-6)
    (offline,) = (path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _wandb_history(offline)
    assert [row["_step"] for row in rows] == df["env_steps"].tolist() and set(KEYS) <= set(rows[-1])
    np.testing.assert_allclose([row["eval/return"] for row in rows], df["eval/return"], rtol=1e-6)


def test_render_writes_brax_html(seed1):
    path, _, _ = seed1
    sac.render_saved(str(path))
    page = (path / "episode.html").read_text()
    assert 'id="brax-viewer"' in page and re.search(r'var system = "[A-Za-z0-9+/=]{200,}"', page)
