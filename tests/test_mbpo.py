"""MBPO: the model, rollouts, batches and the whole compiled loop on tiny configurations.

Few distinct configurations on purpose: each costs ~40 s of compilation on CPU."""

import dataclasses
import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

from algorithms import mbpo, utils

from helpers import as_cli, help_text

ROOT = Path(__file__).resolve().parents[1]
# The whole-loop runs step gymnax's pendulum: its epoch compiles in a third of the time of Brax's
# inverted pendulum (7 s against 23 s, measured alone), and what they test (seeds, resume, files,
# the CLI) does not depend on the physics. The model, rollout and termination tests and the
# learning test use BRAX's inverted pendulum, which terminates.
BRAX = dict(env_id="inverted_pendulum", backend="positional")
TINY = dict(
    env_id="pendulum", total_timesteps=1000, epoch_length=250, init_steps=250, model_train_freq=250,
    rollout_batch_size=1000, ensemble_size=3, num_elites=2, model_width=32, model_depth=2,
    model_weight_decay=(1e-5, 1e-5, 1e-5), sac_width=32, updates_per_step=2, model_max_epochs=5, max_holdout=100,
    eval_episodes=2, rollout_schedule=(0, 2, 1, 3), progress=False,
)


def tiny_args(**overrides):
    return mbpo.resolve(mbpo.Args(**{**TINY, **overrides}))


# --- the model ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _fitter(**overrides):
    args = tiny_args(**BRAX, **overrides)
    return args, mbpo.fitter(args), jax.jit(mbpo.fitter(args))


def _noisy_buffer(key, n, obs_size=4, action_size=1):
    """next_obs - obs = sin(2 obs_0) + noise with std 0.1 + 0.15 (a + 1); reward = obs_1 + a."""
    k1, k2, k3 = jax.random.split(key, 3)
    obs = jax.random.uniform(k1, (n, obs_size), minval=-1, maxval=1)
    action = jax.random.uniform(k2, (n, action_size), minval=-1, maxval=1)
    std = 0.1 + 0.15 * (action + 1.0)
    delta = jnp.sin(2 * obs[:, :1]) + std * jax.random.normal(k3, (n, obs_size))
    buf = mbpo.Buffer.empty(n, obs_size, action_size)
    reward = obs[:, 1] + action[:, 0]
    return buf.add_batch((obs, action, reward, obs + delta, jnp.zeros(n, bool)), jnp.ones(n, bool))


def _fit(overrides, buffer, key, model=None):
    args, _, fit = _fitter(**overrides)
    if model is None:
        model = mbpo.Ensemble(key, args.ensemble_size, 5, 5, args.model_width, args.model_depth)
    opt = optax.adam(args.model_lr).init(model)
    return fit(model, opt, buffer, key)


def test_ensemble_recovers_mean_and_variance_of_a_noisy_function():
    buffer = _noisy_buffer(jax.random.PRNGKey(0), 4000)
    model, _, elites, _, metrics = _fit(
        dict(model_width=64, model_max_epochs=400, max_holdout=800, model_patience=400), buffer, jax.random.PRNGKey(1))
    x = jnp.array([[0.5, 0.2, 0.0, 0.0, 0.8], [-0.5, -0.3, 0.0, 0.0, -0.8]])  # (obs, action)
    mean, logvar = model.members(elites)(jnp.broadcast_to(x, (len(elites), 2, 5)))
    true_mean = np.array([[np.sin(1.0)] * 4 + [1.0], [np.sin(-1.0)] * 4 + [-1.1]])
    true_std = np.array([0.1 + 0.15 * 1.8, 0.1 + 0.15 * 0.2])
    np.testing.assert_allclose(mean.mean(0), true_mean, atol=0.1)
    # The noise of the 4 delta dimensions (the reward is noiseless: its std goes small).
    std = np.exp(0.5 * np.asarray(logvar.mean(0)))
    # Each member fits its own bootstrap resample (~63% distinct rows), so at 4000 rows the std is
    # within ~35% (measured: 0.33 vs 0.37 and 0.17 vs 0.13); the heteroscedasticity must show.
    np.testing.assert_allclose(std[:, :4], np.repeat(true_std[:, None], 4, 1), rtol=0.35)
    assert np.all(std[0, :4] / std[1, :4] > 1.8)  # true ratio 2.85
    assert np.all(std[:, 4] < 0.5 * true_std.min())


def test_elites_are_the_members_with_lowest_holdout_loss():
    buffer = _noisy_buffer(jax.random.PRNGKey(0), 1000)
    args, _, _ = _fitter()
    model = mbpo.Ensemble(jax.random.PRNGKey(2), args.ensemble_size, 5, 5, args.model_width, args.model_depth)
    # Spoil member 0's output bias: its holdout loss must be the worst, so it is no elite.
    model = mbpo.eqx.tree_at(lambda m: m.biases[-1], model, model.biases[-1].at[0].add(5.0))
    _, _, elites, diagnostics, _ = _fit({}, buffer, jax.random.PRNGKey(3), model)
    losses = diagnostics["holdout_loss"]
    np.testing.assert_array_equal(np.sort(elites), np.sort(np.argsort(losses)[: args.num_elites]))
    assert 0 not in np.asarray(elites) and np.argmax(losses) == 0


def reference_early_stop(history, patience):
    """jannerm/mbpo bnn.py `_save_best` replayed on the per-epoch holdout losses: a member's best
    moves when it improves by > 1%; training breaks once epochs-since-update > patience."""
    best, since = np.full(history.shape[1], 1e10), 0
    for epoch, losses in enumerate(history):
        improved = (best - losses) / best > 0.01
        best = np.where(improved, losses, best)
        since = 0 if improved.any() else since + 1
        if since > patience:
            return epoch + 1, best
    return len(history), best


def test_early_stopping_matches_the_reference_rule_and_keeps_best_weights():
    buffer = _noisy_buffer(jax.random.PRNGKey(0), 1000)
    _, _, _, diagnostics, metrics = _fit(dict(model_max_epochs=500, model_patience=3), buffer, jax.random.PRNGKey(4))
    epochs = int(metrics["model/epochs"])
    history = np.asarray(diagnostics["holdout_history"])
    assert np.isfinite(history[:epochs]).all() and np.isnan(history[epochs:]).all()
    ref_epochs, ref_best = reference_early_stop(history[:epochs], patience=3)
    assert 4 <= epochs < 500 and epochs == ref_epochs  # the last 4 epochs (> 3) improved nothing
    # The returned losses are those of each member's best epoch: its weights were kept.
    np.testing.assert_allclose(np.asarray(diagnostics["holdout_loss"]), ref_best, rtol=1e-6)


def test_bootstrap_is_one_resample_per_member_and_fit():
    """The reference draws idxs = randint(n, size=[B, n]) once per fit and walks each row once per
    epoch in a new order: each member sees ~1 - 1/e = 63% of the rows, each epoch all n draws.
    The fit's resample, and its epoch's minibatches (`minibatch_rows`) over a random order."""
    buffer = _noisy_buffer(jax.random.PRNGKey(0), 3000)
    args, _, _ = _fitter(model_max_epochs=6, model_patience=10, max_holdout=300)
    _, _, _, diagnostics, metrics = _fit(dict(model_max_epochs=6, model_patience=10, max_holdout=300), buffer,
                                         jax.random.PRNGKey(5))
    n_train, resample = int(diagnostics["n_train"]), np.asarray(diagnostics["resample"])
    bs, width = args.model_batch_size, resample.shape[1]
    assert n_train == 2700 and resample[:, :n_train].max() < n_train
    distinct = np.array([len(np.unique(row[:n_train])) for row in resample]) / n_train
    np.testing.assert_allclose(distinct, 1 - np.exp(-1), atol=0.03)
    np.testing.assert_allclose(float(metrics["model/bootstrap_distinct"]), distinct.mean(), rtol=1e-6)
    assert len({tuple(row[:50]) for row in resample}) == len(resample)  # members resample independently
    # One epoch: every position < n_train once, so each member trains on its whole resample once.
    order = np.asarray(jnp.argsort(jnp.where(jnp.arange(width) < n_train, jax.random.uniform(jax.random.PRNGKey(9), (width,)), 2.0)))
    seen = np.zeros((len(resample), 3000), int)
    for j in range(-(-n_train // bs)):
        rows, valid = (np.asarray(x) for x in mbpo.minibatch_rows(jnp.asarray(resample), jnp.asarray(order), j, bs, n_train))
        np.add.at(seen, (np.arange(len(resample))[:, None], rows[:, valid]), 1)
    for member, row in enumerate(resample):
        np.testing.assert_array_equal(seen[member], np.bincount(row[:n_train], minlength=3000))


def test_sequential_fit_runs_each_vmapped_seed_as_a_single_fit():
    """--sequential-fit (the CPU default): under vmap each seed's fit runs alone, through the
    kernels of a single fit, so its result is the single-seed fit's bit for bit (a vmapped fit
    differs by batch rounding: this test fails with sequential_fit=False). What it saves, the
    epochs a batched loop steps past each seed's stop, is measured by mbpo_throughput.py."""
    overrides = dict(model_max_epochs=200, model_patience=2, sequential_fit=True)
    args, fit_model, fit = _fitter(**overrides)
    keys = [jax.random.PRNGKey(11), jax.random.PRNGKey(12)]
    buffers = [_noisy_buffer(jax.random.PRNGKey(i), 800) for i in range(2)]
    models = [mbpo.Ensemble(k, args.ensemble_size, 5, 5, args.model_width, args.model_depth) for k in keys]
    opts = [optax.adam(args.model_lr).init(m) for m in models]
    alone = [fit(m, o, b, k) for m, o, b, k in zip(models, opts, buffers, keys)]
    stack = lambda xs: jax.tree.map(lambda *leaves: jnp.stack(leaves), *xs)
    batched = jax.jit(jax.vmap(fit_model))(stack(models), stack(opts), stack(buffers), jnp.stack(keys))
    epochs = [int(a[4]["model/epochs"]) for a in alone]
    assert epochs[0] != epochs[1]  # the seeds stop at different epochs
    np.testing.assert_array_equal(np.asarray(batched[4]["model/epochs"]), epochs)
    for i, single in enumerate(alone):
        for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], batched)), jax.tree.leaves(single)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_holdout_is_capped_and_fit_compiles_once_as_the_buffer_grows():
    args, fit_model, _ = _fitter()
    traces = []

    def counted(*a):
        traces.append(1)
        return fit_model(*a)

    fit = jax.jit(counted)
    full = _noisy_buffer(jax.random.PRNGKey(0), 1000)
    for size in (300, 1000):
        buffer = full._replace(size=jnp.int32(size), insert_pos=jnp.int32(size % 1000))
        model = mbpo.Ensemble(jax.random.PRNGKey(0), args.ensemble_size, 5, 5, args.model_width, args.model_depth)
        *_, metrics = fit(model, optax.adam(1e-3).init(model), buffer, jax.random.PRNGKey(0))
        assert np.isfinite(metrics["model/holdout_mse"])
    assert len(traces) == 1


# --- rollouts and batches ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _runner():
    args = tiny_args(**BRAX)
    trainer = mbpo.make_train(args)
    runner = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    env = mbpo.make_env(args)[0]
    # Real buffer: 500 non-terminal inverted-pendulum states (|angle| <= 0.2).
    obs = jax.random.uniform(jax.random.PRNGKey(1), (500, 4), minval=-0.15, maxval=0.15)
    action = jnp.zeros((500, 1))
    real = runner.real.add_batch((obs, action, jnp.ones(500), obs, jnp.zeros(500, bool)), jnp.ones(500, bool))
    return args, env, runner._replace(real=real)


@pytest.mark.parametrize("k", [1, 3])
def test_rollouts_respect_k_and_the_termination_function(k):
    args, env, runner = _runner()
    # Bias the model's angle prediction so that rollouts drift out of the healthy range.
    model = mbpo.eqx.tree_at(lambda m: m.biases[-1], runner.model, runner.model.biases[-1].at[:, 1].add(0.08))
    runner = runner._replace(model=model)
    n = args.rollout_batch_size
    runner = runner._replace(model_data=runner.model_data.resize(10 * n))
    buffer, metrics = jax.jit(functools.partial(mbpo.model_rollout, args, env), static_argnums=1)(runner, k, jax.random.PRNGKey(5))
    size = int(buffer.size)
    obs, next_obs, terminated = (np.asarray(x[:size]) for x in (buffer.data.obs, buffer.data.next_obs, buffer.data.terminated))
    env = mbpo.envs.make("inverted_pendulum", backend="positional")[0]
    np.testing.assert_array_equal(terminated, np.asarray(env.termination_fn(obs, None, next_obs)))
    # Rollouts stop at termination: no stored transition starts from a terminal state.
    assert np.all(np.abs(obs[:, 1]) <= 0.2)
    if k == 1:
        assert size == n
    else:
        assert n < size < k * n and terminated.any()
        # Step t+1 stores exactly the rollouts step t did not terminate (rows are in step order).
        second = int(np.sum(~terminated[:n]))
        third = int(np.sum(~terminated[n : n + second]))
        assert size == n + second + third


def test_batches_mix_real_and_model_data_as_the_reference():
    args, _, runner = _runner()
    n_model = 300
    model_data = runner.model_data.resize(n_model).add_batch(
        (jnp.zeros((n_model, 4)), jnp.zeros((n_model, 1)), -jnp.ones(n_model), jnp.zeros((n_model, 4)),
         jnp.zeros(n_model, bool)), jnp.ones(n_model, bool))
    batch = jax.jit(functools.partial(mbpo.sample_batch, args))(runner._replace(model_data=model_data), jax.random.PRNGKey(0))
    reward = np.asarray(batch.reward)
    assert args.sac_batch_size == 256 and args.real_ratio == 0.05 and len(reward) == 256
    # The reference's env_batch_size = int(256 * 0.05) = 12 real rows (rewards 1), 244 model rows.
    assert np.sum(reward == 1.0) == 12 and np.sum(reward == -1.0) == 244


def test_critic_target_bootstraps_through_truncation_not_termination():
    args, _, runner = _runner()
    sac = runner.sac
    obs = jnp.zeros((2, 4))
    batch = (obs, jnp.zeros((2, 1)), jnp.ones(2), obs, jnp.array([True, False]))
    # The reported critic loss is that of the pre-update critics against a hand-made target.
    new_sac, metrics = jax.jit(functools.partial(mbpo.sac_update, args))(sac, batch, jax.random.PRNGKey(0))
    q = np.asarray(jax.vmap(sac.critics)(obs, batch[1]))
    next_a, next_logp = jax.vmap(mbpo.sample_action, (None, 0, 0))(sac.actor, obs, jax.random.split(jax.random.split(jax.random.PRNGKey(0))[0], 2))
    next_q = np.min(np.asarray(jax.vmap(sac.target_critics)(obs, next_a)), -1)
    target = 1.0 + args.gamma * np.array([0.0, 1.0]) * (next_q - 1.0 * np.asarray(next_logp))
    np.testing.assert_allclose(float(metrics["losses/critic"]), np.mean((q - target[:, None]) ** 2) * 2, rtol=1e-4)


# --- the whole loop -------------------------------------------------------------------------------
def _run(tmp_path, **overrides):
    args = dataclasses.replace(tiny_args(**overrides), run_dir=str(tmp_path))
    run_dir, metrics = mbpo.run(args)
    return run_dir, pd.read_csv(run_dir.path / "metrics.csv")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TINY, seed 0, through the command line from another working directory. Its programs go to
    the tests' shared cache, where the in-process runs of TINY below read them (conftest.py)."""
    root = tmp_path_factory.mktemp("mbpo")
    done = subprocess.run([sys.executable, str(ROOT / "algorithms" / "mbpo.py"), *as_cli({**TINY, "run_dir": str(root)})],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    path = Path(summary["run_dir"])
    assert summary == json.loads((path / "summary.json").read_text())
    return types.SimpleNamespace(path=path), pd.read_csv(path / "metrics.csv")


def test_run_writes_metrics_summary_and_checkpoint(reference):
    run_dir, df = reference
    assert list(df["env_steps"]) == [250, 500, 750, 1000]
    # schedule (0, 2, 1, 3) over epochs counted from the end of the 250 random steps
    assert list(df["model/rollout_length"]) == [1, 1, 2, 3]
    assert df.loc[1:, "model/holdout_mse"].notna().all() and df["eval/return"].notna().all()
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["env_steps"] == 1000 and summary["env_id"] == "pendulum"
    assert (run_dir.path / "checkpoint.eqx").exists()


def test_pendulum_gets_the_policys_actions_on_its_torque_bounds(reference):
    """The reference run's real buffer (from its checkpoint): actions stored in [-1, 1], and the
    reward the env returned is pendulum's reward of twice the stored action (torque bounds [-2, 2])."""
    _, _, state, _ = utils.load_saved(str(reference[0].path), mbpo.Args, mbpo.make_train, mbpo.seed_keys)
    real = jax.tree.map(lambda x: np.asarray(x[0]), state.real)
    n = int(real.size)
    obs, action, reward, next_obs = real.data.obs[:n], real.data.action[:n], real.data.reward[:n], real.data.next_obs[:n]
    assert n == 1000 and np.abs(action).max() <= 1.0 and np.abs(action).max() > 0.95
    env, _ = mbpo.envs.make("pendulum")
    np.testing.assert_allclose(reward, env.reward_fn(obs, 2.0 * action, next_obs), rtol=1e-5, atol=1e-5)  # as test_pendulum_env.py
    assert np.abs(reward - np.asarray(env.reward_fn(obs, action, next_obs))).max() > 1e-3


def test_curves_portable_checkpoint_is_the_checkpoint_without_the_model_pools_rows(reference, tmp_path):
    """benchmarks/mbpo_curves.py's portable.npz (committed so that a fresh machine can resume a
    curve run): restored, it gives back every leaf of the run's own checkpoint, and an empty model
    pool of the same capacity in place of the pool's rows."""
    import shutil

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mbpo_curves

    path = tmp_path / "seed0"
    shutil.copytree(reference[0].path, path)
    mbpo_curves.save_portable(mbpo, path)
    like = mbpo_curves._state_shape(mbpo, path)
    saved, counters = utils.RunDir(path).load_checkpoint(like)
    (path / "checkpoint.eqx").unlink()
    assert mbpo_curves.restore_portable(mbpo, path) == counters["env_steps"] == 1000
    restored, restored_counters = utils.RunDir(path).load_checkpoint(like)
    assert restored_counters == counters and int(saved.model_data.size[0]) == 3000  # the run's pool was full
    for (key_path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(restored)):
        field = mbpo_curves._pool_field(key_path)
        if field in (*mbpo_curves.POOL_ROWS, "insert_pos", "size"):
            assert not np.any(np.asarray(b)), jax.tree_util.keystr(key_path)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key_path))
    assert int(restored.model_data.capacity[0]) == 3000 and int(restored.real.size[0]) == 1000


def test_same_seed_gives_identical_metrics(reference, tmp_path):
    _, df = _run(tmp_path)
    pd.testing.assert_frame_equal(df.drop(columns="charts/steps_per_second"),
                                  reference[1].drop(columns="charts/steps_per_second"))


def test_vmapped_seed_equals_single_run(tmp_path):
    """Seed 1 of a 2-seed vmapped run vs seed 1 alone. XLA's kernels at batch 2 and batch 1 round
    differently (Brax's physics too: ~1e-5 after 250 steps), and RL amplifies such differences
    over training, so we compare where they are still rounding-sized: the first two epochs.
    With --seed-batch 1 (the CPU default) the seeds run one after another in the same program,
    through the same kernels as a single run: identical metrics."""
    _, both = _run(tmp_path / "both", num_seeds=2, seed_batch=2)
    _, mapped = _run(tmp_path / "mapped", num_seeds=2, seed_batch=1)
    _, single = _run(tmp_path / "single", seed=1)
    both = both[both.seed == 1].reset_index(drop=True)
    early = single.env_steps <= 500
    assert both.loc[0, "eval/return"] == single.loc[0, "eval/return"]
    for col in ["losses/critic", "losses/actor", "model/holdout_mse", "model/train_nll"]:
        np.testing.assert_allclose(both.loc[early, col].iloc[1:], single.loc[early, col].iloc[1:], rtol=1e-3)
    mapped = mapped[mapped.seed == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(mapped.drop(columns="charts/steps_per_second"),
                                  single.drop(columns="charts/steps_per_second"))


def test_killed_run_resumes_to_identical_results(reference, tmp_path, monkeypatch):
    calls = []
    original = utils.RunDir.write_metrics

    def dying_write(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # killed during the third epoch, after two checkpoints
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(utils.RunDir, "write_metrics", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    monkeypatch.setattr(utils.RunDir, "write_metrics", original)
    killed_dir = next(tmp_path.iterdir())
    run_dir, _ = mbpo.run(mbpo.Args(resume=str(killed_dir)))
    df = pd.read_csv(run_dir.path / "metrics.csv")
    pd.testing.assert_frame_equal(df.drop(columns="charts/steps_per_second"),
                                  reference[1].drop(columns="charts/steps_per_second"))


class ReferencePool:
    """softlearning's FlexibleReplayPool as used by jannerm/mbpo: add_samples writes at
    arange(pointer, pointer + n) % max_size; `_reallocate_model_pool` builds a new pool and adds
    the old one's return_all_samples() (fields[:size])."""

    def __init__(self, max_size, width=1):
        self.max_size, self.pointer, self.size = max_size, 0, 0
        self.data = np.zeros((max_size, width), np.float32)

    def add_samples(self, rows):
        self.data[np.arange(self.pointer, self.pointer + len(rows)) % self.max_size] = rows
        self.pointer = (self.pointer + len(rows)) % self.max_size
        self.size = min(self.size + len(rows), self.max_size)

    def reallocate(self, max_size):
        if max_size == self.max_size:
            return self
        new = ReferencePool(max_size, self.data.shape[1])
        new.add_samples(self.data[: self.size])
        return new


def test_model_buffer_matches_the_reference_pool_through_resizes():
    rng = np.random.default_rng(0)
    ours, ref, next_id = mbpo.Buffer.empty(64, 1, 1), ReferencePool(64), 0
    ours = ours.resize(10)
    ref = ref.reallocate(10)
    add = jax.jit(lambda b, rows, valid: b.add_batch((rows, rows, rows[:, 0], rows, valid), valid))
    for capacity in [10, 10, 24, 24, 40, 40, 40, 52, 52, 64]:  # grows (full, then wrapped), stays
        ours, ref = jax.jit(mbpo.Buffer.resize)(ours, capacity), ref.reallocate(capacity)
        valid = rng.random(12) < 0.7  # rollouts that ended write nothing
        rows = np.arange(next_id, next_id + 12, dtype=np.float32)[:, None]
        ours, next_id = add(ours, jnp.asarray(rows), jnp.asarray(valid)), next_id + 12
        ref.add_samples(rows[valid])
        assert (int(ours.size), int(ours.insert_pos), int(ours.capacity)) == (ref.size, ref.pointer, ref.max_size)
        np.testing.assert_array_equal(np.asarray(ours.data.obs[: ref.size]), ref.data[: ref.size])


def _reference_programs(args, trainer):
    """(init, chunk) built as mbpo.run builds its programs: for TINY, the reference run's compiled
    programs (the tests' compile cache serves them)."""
    mesh = utils.seed_mesh(args)
    chunk = utils.over_devices(lambda state, start: utils.map_in_batches(lambda s: trainer.chunk(s, start), state,
                                                                         args.seed_batch), mesh, replicated=1)
    init = utils.over_devices(jax.vmap(trainer.init), mesh, donate=False)
    return lambda: init(utils.on_devices(mbpo.seed_keys(args), mesh)), chunk


def test_the_episode_in_progress_reaches_no_fit_rollout_or_sac_batch():
    """The reference's sampler (softlearning's SimpleSampler) adds a path to the pool when it ends:
    until then its rows are in no model fit, no rollout start and no SAC batch. Pendulum's episodes
    last 200 steps, so after the random epoch (250 steps) rows 200-249 are the episode in progress;
    poisoned (observations 1e6), not one of them may show."""
    args = tiny_args()
    trainer = mbpo.make_train(args)
    init, chunk = _reference_programs(args, trainer)
    state, _ = chunk(init(), jnp.int32(0))
    assert int(state.real.size[0]) == 250 and int(state.unfinished[0]) == 50
    poison = lambda x: x.at[:, 200:250].set(1e6)  # noqa: E731
    state = state._replace(real=state.real._replace(data=state.real.data._replace(
        obs=poison(state.real.data.obs), next_obs=poison(state.real.data.next_obs))))
    n_real = int(args.real_ratio * args.sac_batch_size)
    batches = jax.jit(jax.vmap(functools.partial(mbpo.sample_batch, args), (None, 0)))(jax.tree.map(lambda x: x[0], state),
                                                                jax.random.split(jax.random.PRNGKey(0), 200))
    assert np.abs(np.asarray(batches[0][:, :n_real])).max() < 100  # SAC's real rows
    state, _ = chunk(state, jnp.int32(250))  # fits, then branches k = 1 rollouts from real states
    assert np.abs(np.asarray(state.model.input_mean)).max() < 100  # the fit's inputs
    starts = np.asarray(state.model_data.data.obs[0, :int(state.model_data.size[0])])
    assert len(starts) == args.rollout_batch_size and np.abs(starts).max() < 100  # the rollouts' starts
    # The count follows the env's own step counter (pendulum's `time`: steps into the episode);
    # with --no-add-at-episode-end it stays 0 (every row is seen at once).
    runner = jax.tree.map(lambda x: x[0], state)._replace(unfinished=jnp.int32(0))
    for flag in (True, False):
        flagged = args if flag else tiny_args(add_at_episode_end=False)
        collect = functools.partial(mbpo.collect, flagged, *mbpo.make_env(flagged))
        after = jax.jit(lambda runner, key: jax.lax.fori_loop(
            0, 130, lambda i, r: collect(r, True, jax.random.fold_in(key, i))[0], runner))(runner, jax.random.PRNGKey(1))
        assert int(after.unfinished) == (int(after.env_state.time) if flag else 0) and int(after.env_state.time) > 0


def test_every_sampled_model_row_was_written_as_k_grows_and_epochs_compile_once():
    """The model buffer starts as NaN: after every fit (k = 1, 2, 3) the range that SAC samples
    from, [0, size), must hold only written rows, and the ring holds retain x k x rollouts."""
    args = tiny_args()
    trainer = mbpo.make_train(args)
    traces = []

    def counted(state, start):
        traces.append(1)
        return trainer.chunk(state, start)

    # Built as mbpo.run builds its programs, so that this is the reference run's compiled chunk
    # (the same program: the test's compile cache serves it), not one of its own (38 s on a worker before).
    init, chunk = _reference_programs(args, trainer._replace(chunk=counted))
    state = init()
    nan_fields = {name: jnp.full_like(getattr(state.model_data.data, name), jnp.nan) for name in ("obs", "action", "next_obs")}
    state = state._replace(model_data=state.model_data._replace(data=state.model_data.data._replace(**nan_fields)))
    ks = []
    for i in range(trainer.num_chunks):
        state, metrics = chunk(state, jnp.int32(i * args.epoch_length))
        ks.append(int(metrics["model/rollout_length"][0]))
        data, size = state.model_data, int(state.model_data.size[0])
        if i > 0:
            assert int(data.capacity[0]) == ks[-1] * args.rollout_batch_size and size > 0
            for name in nan_fields:
                assert np.isfinite(np.asarray(getattr(data.data, name)[0, :size])).all(), (name, i, size)
    assert ks == [1, 1, 2, 3] and len(traces) == 1


def reference_rollout_length(schedule, epoch):
    """jannerm/mbpo `_set_rollout_length`, with its epoch counter (0 = first epoch after the
    initial exploration steps)."""
    min_epoch, max_epoch, min_length, max_length = schedule
    if epoch <= min_epoch:
        return min_length
    return int(min(1.0, (epoch - min_epoch) / (max_epoch - min_epoch)) * (max_length - min_length) + min_length)


@pytest.mark.parametrize("env_id", ["hopper", "ant", "humanoid"])
def test_k_schedule_counts_epochs_after_the_random_steps_as_the_reference(env_id):
    args = mbpo.resolve(mbpo.Args(env_id=env_id))
    fits = np.arange(args.init_steps, args.total_timesteps, args.model_train_freq)
    ours = np.asarray(jax.vmap(lambda s: mbpo.rollout_length(args, s))(jnp.asarray(fits)))
    ref = [reference_rollout_length(args.rollout_schedule, (s - args.init_steps) // args.epoch_length) for s in fits]
    np.testing.assert_array_equal(ours, ref)
    if env_id == "hopper":  # k = 2 first at the reference's epoch 30, i.e. env step 35k (not 30k)
        assert fits[np.argmax(ours == 2)] == 35_000


def test_presets_branch_100k_rollouts_per_fit_and_memory_is_checked_first(monkeypatch, capsys):
    hopper, humanoid = mbpo.resolve(mbpo.Args(env_id="hopper")), mbpo.resolve(mbpo.Args(env_id="humanoid"))
    # The reference's rollout_batch_size = 100e3 per fit: M = 400 per env step on hopper, 100 on humanoid.
    assert hopper.rollout_batch_size // hopper.model_train_freq == 400
    assert humanoid.rollout_batch_size // humanoid.model_train_freq == 100
    mbpo.check_memory(dataclasses.replace(hopper, total_timesteps=30_000))
    printed = capsys.readouterr().out
    assert "6,000,000 rows per seed" in printed  # 1 epoch x k 15 x 4 fits x 100k rollouts
    # Humanoid: 5 epochs x k 25 x 100k = 12.5M rows; Gymnasium's task (45 obs + the velocity feature)
    # gives rows of 2 x 46 + 17 + 1 float32, about 5.1 GiB per seed, so 4 GiB is too little.
    monkeypatch.setattr(utils, "available_memory", lambda args: (4 * 2**30, "test machine", args.num_seeds))
    with pytest.raises(SystemExit, match=r"12,500,000 rows.*too little memory; lower --rollout-batch-size"):
        mbpo.check_memory(humanoid)


def test_nonfinite_predictions_end_rollouts_and_only_a_dead_branch_stops():
    args, env, runner = _runner()
    rollout = jax.jit(functools.partial(mbpo.model_rollout, args, env), static_argnums=1)
    nan_bias = runner.model.biases[-1].at[0].set(jnp.nan)  # member 0 predicts NaN
    for elites, dead in [(jnp.array([0, 1]), 0), (jnp.array([0, 0]), 1)]:
        model = mbpo.eqx.tree_at(lambda m: m.biases[-1], runner.model, nan_bias)
        r = runner._replace(model=model, elites=elites, model_data=runner.model_data.resize(3 * args.rollout_batch_size))
        buffer, metrics = rollout(r, 3, jax.random.PRNGKey(0))
        size = int(buffer.size)
        assert np.isfinite(np.asarray(buffer.data.next_obs[:size])).all() and np.isfinite(np.asarray(buffer.data.reward[:size])).all()
        assert int(metrics["model/nonfinite_branch"]) == dead
        if not dead:  # about half the rollouts hit member 0 at the first step and end there
            assert 0.4 < int(metrics["model/nonfinite_predictions"]) / args.rollout_batch_size < 1.0
            assert size > args.rollout_batch_size // 3
        else:
            assert size == 0


def test_bad_arguments_fail_before_compiling():
    for overrides, message in [
        (dict(env_id="Hopper-v4"), "unknown env"),
        (dict(env_id="IcyRoad"), "continuous-action task"),
        (dict(num_elites=4), "--num-elites 4 > --ensemble-size 3"),
        (dict(real_ratio=1.5), "--real-ratio"),
        (dict(updates_per_step=0), "--updates-per-step must be positive"),
        (dict(sac_batch_size=5000), "--sac-batch-size"),
        (dict(total_timesteps=1100), "multiple of --epoch-length"),
        (dict(rollout_schedule=(0, 2, 3, 1)), "k must not decrease"),
    ]:
        with pytest.raises(SystemExit, match=message):
            tiny_args(**overrides)


def test_nonfinite_metrics_are_reported_with_where():
    with pytest.raises(utils.NonFiniteError, match=r"losses/critic at env step 500 \(seeds \[1\]\)"):
        utils.assert_finite({"losses/critic": np.array([1.0, np.nan])}, "env step 500")


def test_cli_from_another_directory_and_evaluate_saved_policy(reference, tmp_path):
    """The reference run is the command line's (its fixture); here its saved policy is evaluated and
    rendered, and --help lists the flags."""
    run_dir, df = reference
    assert len(df) == 4 and df["eval/return"].notna().all()
    shown = help_text(mbpo.Args)
    for flag in ["--ensemble-size", "--rollout-schedule", "--real-ratio", "--num-seeds", "--resume"]:
        assert flag in shown
    returns = mbpo.evaluate_saved(str(run_dir.path))
    assert returns.shape == (1,) and np.isfinite(returns).all()
    mbpo.render_saved(str(run_dir.path))  # --render: pendulum's trajectory plot (Brax's viewer: test_sac.py)
    assert (run_dir.path / "episode.png").stat().st_size > 1000


def test_mbpo_learns_inverted_pendulum(tmp_path):
    """A short run (4000 steps, small networks) must reach a clearly-better-than-random return
    (random actions balance for ~10-40 steps; measured here before the reference's data path,
    --add-at-episode-end: 100-250 by 2500-4000 steps)."""
    _, df = _run(tmp_path, **BRAX, total_timesteps=4000, rollout_batch_size=5000, model_width=64, sac_width=64,
                 sac_batch_size=128, updates_per_step=10, model_max_epochs=20, max_holdout=500, eval_episodes=4,
                 rollout_schedule=(1, 15, 1, 1))
    first, last = df["eval/return"].iloc[0], df["eval/return"].iloc[-6:]
    assert first < 60 and last.max() > 150 and last.mean() > 100, df["eval/return"].tolist()
