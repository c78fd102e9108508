"""DAM: discriminator, models, minimum-variance weights, planner and the compiled MBRL loop, on
tiny configurations (probe problems with known answers, then end-to-end runs)."""

import functools
import itertools
import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from algorithms import dam, utils
from envs.icy_road import EnvState as IcyState

from helpers import as_cli, help_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import CASES  # noqa: E402

# The GPU check's DAM smoke case (IcyRoad, rounds 2, 4 random episodes, K = 32, P = 2, 32-wide nets,
# 100 SGD steps): the reference run below, with its 2 seeds, is that case's program, compiled once
# for both (the tests' shared cache).
TINY = {**CASES["dam"][3], "progress": False}


def tiny_args(**overrides):
    return dam.resolve(dam.Args(**{**TINY, **overrides}))


@functools.lru_cache(maxsize=None)
def trainer_for(**overrides):
    """dam's phases bound to the tiny config with `overrides` and its env, by name (make_train binds
    only the round's wiring)."""
    args = tiny_args(**overrides)
    env, params = dam.make_env(args)
    bound = {name: functools.partial(getattr(dam, name), args) for name in (
        "fit_normalizer", "trajectory_weights", "model_loss", "predictive", "fit_model", "sample_model",
        "fit_discriminator")}
    bound.update({name: functools.partial(getattr(dam, name), env, params) for name in ("run_episode", "sample_true")})
    return types.SimpleNamespace(**bound, estimate_values=functools.partial(dam.estimate_values, args, env, params),
                                 disc_logit=dam.disc_logit, env=env)


def unit_norm(d=4):
    return dam.Normalizer(jnp.zeros(d), jnp.ones(d), jnp.zeros(d), jnp.ones(d))


def dataset(obs, action, reward, next_obs):
    return dam.Dataset(obs, action, reward, next_obs, jnp.int32(obs.shape[0]))


def true_icy_road(env):
    """IcyRoad's real dynamics as a batched sampler s' ~ p(.|s, a) (the state is the observation)."""
    params = env.default_params

    def one(obs, action, key):
        state = IcyState(x=obs[0], y=obs[1], xdot=obs[2], ydot=obs[3], time=jnp.int32(0))
        return env.step_env(key, state, action, params)[0]

    return lambda obs, action, key: jax.vmap(one)(obs, action, jax.random.split(key, obs.shape[0]))


# --- the discriminator ---------------------------------------------------------------------------
def test_discriminator_logit_recovers_log_density_ratio_of_two_gaussians():
    """Real s'_0 ~ N(0, 1), model s'_0 ~ N(1, 1) at the same (s, a): log p/q(x) = 0.5 - x."""
    trainer = trainer_for(disc_train_steps=3000, disc_batch_size=256, disc_width=64)
    n, horizon = 2000, 5
    real = jnp.zeros((n, horizon, 4)).at[..., 0].set(jax.random.normal(jax.random.PRNGKey(0), (n, horizon)))
    data = dataset(jnp.zeros((n, horizon, 4)), jnp.zeros((n, horizon), jnp.int32), jnp.zeros((n, horizon)), real)
    fake = lambda obs, action, key: obs.at[:, 0].set(1.0 + jax.random.normal(key, obs.shape[:1]))
    disc, metrics = jax.jit(trainer.fit_discriminator, static_argnums=2)(data, unit_norm(), fake, jax.random.PRNGKey(1))
    x = jnp.linspace(-1.0, 2.0, 7)
    probe = jnp.zeros((7, 4)).at[:, 0].set(x)
    logit = trainer.disc_logit(disc, unit_norm(), jnp.zeros((7, 4)), jnp.zeros(7, jnp.int32), probe)
    np.testing.assert_allclose(logit, 0.5 - x, atol=0.3)
    # The Bayes accuracy of N(0,1) vs N(1,1) is Phi(0.5) = 0.69.
    assert 0.6 < float(metrics["disc/accuracy"]) < 0.75


def test_early_stopping_on_held_out_episodes_keeps_a_calibrated_discriminator():
    """The overfitting regime the paper's setting invites: 20 episodes (100 real transitions) to
    train on, a 128-wide discriminator, 2000 Adam steps. Real s'_0 ~ N(0, 1), model s'_0 ~ N(1, 1):
    the exact log-ratio 0.5 - x gives the Bayes log loss (Monte Carlo, 1e6 draws), which no
    discriminator can beat on held-out data. Kept to the last step (one evaluation, at the end),
    it memorises the real points: on the held-out ones E_p[exp(-logit)] is far from 1 (measured
    405). Early stopping on the held-out episodes keeps parameters within 0.1 of the Bayes loss,
    with both calibration ratios near 1."""
    n, horizon = 40, 5
    real = jnp.zeros((n, horizon, 4)).at[..., 0].set(jax.random.normal(jax.random.PRNGKey(0), (n, horizon)))
    data = dataset(jnp.zeros((n, horizon, 4)), jnp.zeros((n, horizon), jnp.int32), jnp.zeros((n, horizon)), real)
    fake = lambda obs, action, key: obs.at[:, 0].set(1.0 + jax.random.normal(key, obs.shape[:1]))
    x = np.random.default_rng(0).normal(size=1_000_000)
    bayes = np.mean(np.logaddexp(0, x - 0.5)) + np.mean(np.logaddexp(0, 0.5 - (x + 1)))  # 1.164

    def fit(eval_every):
        trainer = trainer_for(disc_width=128, disc_train_steps=2000, disc_holdout=0.5, disc_eval_every=eval_every)
        _, metrics = jax.jit(trainer.fit_discriminator, static_argnums=2)(data, unit_norm(), fake, jax.random.PRNGKey(1))
        return {k: float(v) for k, v in metrics.items()}

    last, stopped = fit(2000), fit(50)
    assert last["disc/best_step"] == 2000 and last["disc/holdout_ratio_real"] > 10, last
    assert stopped["disc/best_step"] < 2000, stopped
    assert bayes - 0.05 < stopped["disc/holdout_loss"] < bayes + 0.1 < last["disc/holdout_loss"], (bayes, stopped, last)
    for name in ("disc/holdout_ratio_real", "disc/holdout_ratio_model"):
        assert 0.7 < stopped[name] < 1.5, stopped


@functools.lru_cache(maxsize=None)
def random_icy_road_data(episodes=400):
    trainer = trainer_for()
    random_policy = lambda obs, t, key: (jax.random.randint(key, (), 0, 3), {})
    keys = jax.random.split(jax.random.PRNGKey(3), episodes)
    episodes, _ = jax.jit(jax.vmap(trainer.run_episode, (None, 0)), static_argnums=0)(random_policy, keys)
    return dataset(*episodes)


def test_perfect_model_gives_unit_weights_and_unchanged_values():
    """If the 'model' is the true dynamics, real and fake are indistinguishable: logits ~ 0, so
    weights ~ 1 and the corrected values equal the plain ones."""
    trainer = trainer_for(disc_train_steps=1000)
    data = random_icy_road_data()
    truth = true_icy_road(trainer.env)
    norm = unit_norm()
    disc, _ = jax.jit(trainer.fit_discriminator, static_argnums=2)(data, norm, truth, jax.random.PRNGKey(4))
    logits = trainer.disc_logit(disc, norm, data.obs, data.action, data.next_obs)
    assert float(jnp.mean(jnp.abs(logits))) < 0.15 and abs(float(jnp.mean(jnp.exp(logits))) - 1) < 0.1
    sequences = jnp.array(list(itertools.product(range(3), repeat=5)))
    start = jnp.array([0.0, 0.0, 1.0, 0.0])
    log_w = lambda s, a, s2: trainer.disc_logit(disc, norm, s, a, s2)
    plain = lambda s, a, s2: jnp.zeros(s.shape[:-1])
    corrected, _ = trainer.estimate_values(truth, log_w, start, 0, sequences, jax.random.PRNGKey(5))
    uncorrected, _ = trainer.estimate_values(truth, plain, start, 0, sequences, jax.random.PRNGKey(5))
    # Weights ~ 1: the corrected values follow the plain ones (a few rare states keep |logit| up
    # to ~0.5, so single sequences can differ by ~2 on a scale of 10).
    corrected, uncorrected = np.asarray(corrected), np.asarray(uncorrected)
    assert np.corrcoef(corrected, uncorrected)[0, 1] > 0.95
    assert np.mean(np.abs(corrected - uncorrected)) < 0.1 * np.mean(np.abs(uncorrected))


# --- the dynamics models -------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mdn", "gaussian"])
def test_mdn_fits_both_modes_of_a_bimodal_target_and_the_gaussian_cannot(model):
    """s' - s = (0, +-2, 0, 0) with probability 1/2 each (IcyRoad's swerve): the MDN puts its
    samples on both modes; a Gaussian puts its mass between them."""
    trainer = trainer_for(model=model, model_train_steps=1500, model_width=64)
    n, horizon = 400, 5
    sign = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(6), 0.5, (n, horizon)), 1.0, -1.0)
    next_obs = jnp.zeros((n, horizon, 4)).at[..., 1].set(2.0 * sign)
    data = dataset(jnp.zeros((n, horizon, 4)), jnp.zeros((n, horizon), jnp.int32), jnp.zeros((n, horizon)), next_obs)
    norm = dam.Normalizer(jnp.zeros(4), jnp.ones(4), jnp.zeros(4), jnp.ones(4))
    fitted, _ = jax.jit(trainer.fit_model)(data, norm, jax.random.PRNGKey(7))
    samples = trainer.sample_model(fitted, norm, jnp.zeros((4000, 4)), jnp.zeros(4000, jnp.int32), jax.random.PRNGKey(8))
    y = np.asarray(samples[:, 1])
    near_up, near_down = np.mean(np.abs(y - 2) < 0.5), np.mean(np.abs(y + 2) < 0.5)
    if model == "mdn":
        assert near_up > 0.4 and near_down > 0.4, (near_up, near_down)
    else:
        assert near_up + near_down < 0.5 and np.mean(np.abs(y) < 1.5) > 0.4, (near_up, near_down)


def test_minimum_variance_loss_weights_each_trajectory_by_its_shifted_return():
    """Eq. 10: weight(tau) = R'(tau) / mean R'. --minvar-shift data (default): R' = R - the lowest
    stored return; worst: R' = R - T r_min (IcyRoad r_min = -6, T = 5: R + 30)."""
    minvar, baseline = trainer_for(method="minvar", model="gaussian"), trainer_for(method="baseline", model="gaussian")
    worst = trainer_for(method="minvar", model="gaussian", minvar_shift="worst")
    capacity = TINY["init_episodes"] + TINY["rounds"]  # 6 episode slots

    def data(returns):
        rewards = jnp.zeros((capacity, 5)).at[:3, 0].set(jnp.array(returns))
        return dam.Dataset(jnp.zeros((capacity, 5, 4)), jnp.zeros((capacity, 5), jnp.int32), rewards,
                           jnp.zeros((capacity, 5, 4)), jnp.int32(3))

    # R = -20, 0, 40. data: R' = 0, 20, 60 (mean 80/3); worst: R' = 10, 30, 70 (mean 110/3); empty slots 0.
    np.testing.assert_allclose(minvar.trajectory_weights(data([-20.0, 0.0, 40.0])), [0, 0.75, 2.25, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(worst.trajectory_weights(data([-20.0, 0.0, 40.0])),
                               [3 / 11, 9 / 11, 21 / 11, 0, 0, 0], atol=1e-6)
    # Equal returns: R' = 0 everywhere, and q* = p (Eq. 9), so every stored episode weighs 1.
    np.testing.assert_allclose(minvar.trajectory_weights(data([5.0, 5.0, 5.0])), [1, 1, 1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(baseline.trajectory_weights(data([-20.0, 0.0, 40.0])), np.ones(capacity))
    model = dam.MLP(jax.random.PRNGKey(0), 4 + 3, 1 + 2 * 4, 8, 1)
    obs = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    next_obs = obs + jax.random.normal(jax.random.PRNGKey(2), (3, 4))
    action = jnp.array([0, 1, 2])
    weights = jnp.array([0.0, 1.0, 2.0])
    log_prob = baseline.predictive(model, unit_norm(), obs, action).log_prob(next_obs - obs)
    np.testing.assert_allclose(minvar.model_loss(model, unit_norm(), obs, action, next_obs, weights),
                               -jnp.mean(weights * log_prob), rtol=1e-6)


def test_near_constant_dimensions_are_not_scaled():
    """Intersection's agent heading is pi/2 in every state, but float32 sums give it a std of
    ~1e-6, not 0: scaled by it, a model's ~0.01 noise on that column would lie thousands of std
    out. Below --min-input-std (1e-2) a dimension keeps std 1."""
    trainer = trainer_for()
    n, horizon = 50, 5
    obs = jax.random.normal(jax.random.PRNGKey(0), (n, horizon, 4))
    heading = np.float32(np.pi / 2) + np.float32(3e-6) * jax.random.normal(jax.random.PRNGKey(1), (n, horizon))
    obs = obs.at[..., 3].set(heading)
    norm = trainer.fit_normalizer(dataset(obs, jnp.zeros((n, horizon), jnp.int32), jnp.zeros((n, horizon)), obs + 1.0))
    assert 0 < float(jnp.std(obs[..., 3])) < 1e-5 and float(norm.obs_std[3]) == 1.0
    assert np.all(np.abs(np.asarray(norm.obs_std[:3]) - 1) < 0.2)  # the N(0, 1) columns are scaled
    np.testing.assert_array_equal(norm.delta_std, np.ones(4))  # s' - s = 1 exactly: constant


@pytest.mark.parametrize("env_id", ["IcyRoad", "Intersection"])
def test_true_model_samples_the_env_given_only_the_observation(env_id):
    """--model true: from an observation alone, s' follows p(s'|s, a). IcyRoad at (2, 0, 2, 0)
    accelerating: swerves with probability 0.8, half each way. Intersection: before the turn the
    step is deterministic; at the first turning step the hidden turn is left or right 1/2 each;
    once visible, the sampler keeps the car's own turn."""
    trainer = trainer_for(env_id=env_id, model="true", method="baseline")
    env, n = trainer.env, 4000
    key = jax.random.PRNGKey(0)
    if env_id == "IcyRoad":
        nxt = trainer.sample_true(jnp.tile(jnp.array([2.0, 0, 2, 0]), (n, 1)), jnp.zeros(n, jnp.int32), key)
        ydot = np.asarray(nxt[:, 3])
        assert 0.77 < np.mean(ydot != 0) < 0.83 and 0.45 < np.mean(ydot > 0) / np.mean(ydot != 0) < 0.55
        return
    cruise = jnp.full(n, 2, jnp.int32)
    obs, state = env.reset(key, env.default_params)
    states = []
    for _ in range(6):  # the true env, turning left, cruising
        states.append(obs)
        obs, state, *_ = env.step_env(key, state.replace(turn_left=jnp.array(True)), 2, env.default_params)
    heading = lambda o: np.asarray(o[:, 9])
    first_turn = next(t for t in range(6) if states[t + 1][9] != states[t][9])
    before = trainer.sample_true(jnp.tile(states[first_turn - 1], (n, 1)), cruise, key)
    np.testing.assert_allclose(before, jnp.tile(states[first_turn], (n, 1)), atol=1e-5)
    at_turn = heading(trainer.sample_true(jnp.tile(states[first_turn], (n, 1)), cruise, key))
    assert 0.45 < np.mean(at_turn > -np.pi / 2) < 0.55 and np.all(at_turn != -np.float32(np.pi / 2))
    after = heading(trainer.sample_true(jnp.tile(states[first_turn + 1], (n, 1)), cruise, key))
    np.testing.assert_allclose(after, states[first_turn + 2][9], atol=1e-5)  # left stays left


def test_true_model_planner_reaches_icy_roads_optimum():
    """The planner's ceiling on IcyRoad (the preset K = 500, H = 5, P = 20, common random numbers):
    with the env's own dynamics as the model it is near the optimum 10 (measured 9.82 +- 0.09 over
    80 episodes; without common random numbers 7.35, with one particle -0.17)."""
    args = dam.resolve(dam.Args(env_id="IcyRoad", method="baseline", model="true", num_seeds=2, eval_episodes=20,
                                init_episodes=1, rounds=1, progress=False))
    trainer = dam.make_train(args)
    state = jax.jit(jax.vmap(trainer.init))(dam.seed_keys(args))
    returns, _ = jax.jit(jax.vmap(trainer.evaluate))(state, dam.eval_keys(args))
    assert np.all(np.asarray(returns) > 9.0) and float(np.mean(returns)) > 9.5, returns


INTERSECTION = dict(env_id="Intersection", method="dam", model="mdn", rounds=1, num_seeds=4, horizon=5, eval_episodes=2)


@pytest.fixture(scope="module")
def intersection_cli(tmp_path_factory):
    """One round of the tiny config on Intersection, seeds 0-3, the corrected method, through the
    command line from another directory: (summary, metrics)."""
    root = tmp_path_factory.mktemp("intersection")
    done = subprocess.run([sys.executable, str(ROOT / "algorithms" / "dam.py"),
                           *as_cli({**TINY, **INTERSECTION, "run_dir": str(root)})],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    return summary, pd.read_csv(Path(summary["run_dir"]) / "metrics.csv")


def test_short_runs_stay_finite_on_intersection_for_every_seed(intersection_cli):
    """The normalizer bug made planner values reach 1e21-1e32 and NaN here."""
    summary, df = intersection_cli
    assert sorted(df["seed"]) == [0, 1, 2, 3] and summary["env_id"] == "Intersection"
    assert np.isfinite(df.drop(columns=["charts/steps_per_second"]).to_numpy(float)).all()
    assert np.isfinite(summary["eval/return_per_seed"]).all() and len(summary["eval/return_per_seed"]) == 4


# --- the planner -----------------------------------------------------------------------------------
def test_planner_picks_the_best_first_action_with_the_true_model():
    """IcyRoad from (0, 0, 1, 0): accelerate once (to the threshold speed 2), then cruise; from
    (1, 0, 2, 0) at t = 1 cruising beats accelerating into the swerve zone."""
    trainer = trainer_for(num_particles=200)
    truth = true_icy_road(trainer.env)
    plain = lambda s, a, s2: jnp.zeros(s.shape[:-1])
    sequences = jnp.array(list(itertools.product(range(3), repeat=5)))
    for obs, t, best_action, best_value in [([0.0, 0, 1, 0], 0, 0, 10.0), ([2.0, 0, 2, 0], 1, 2, 8.0)]:
        values, _ = trainer.estimate_values(truth, plain, jnp.array(obs), t, sequences, jax.random.PRNGKey(9))
        best = int(jnp.argmax(values))
        assert int(sequences[best, 0]) == best_action, (obs, sequences[best])
        assert abs(float(values[best]) - best_value) < 1e-4  # deterministic best plan; steps past T masked


def test_importance_weights_multiply_along_the_rollout_and_are_capped():
    trainer = trainer_for(max_log_weight=2.5)
    still = lambda s, a, key: s  # stays at (0, 0, 1, 0): reward xdot = 1 per step
    one = lambda s, a, s2: jnp.ones(s.shape[:-1])  # log w = 1 per step
    values, log_w = trainer.estimate_values(still, one, jnp.array([0.0, 0, 1, 0]), 0, jnp.zeros((1, 5), jnp.int32),
                                            jax.random.PRNGKey(0))
    expected = np.exp(1) + np.exp(2) + 3 * np.exp(2.5)  # w_1..t = e^t, capped at e^2.5
    np.testing.assert_allclose(values, [expected], rtol=1e-5)
    assert float(log_w) == 2.5


def test_flattened_and_clipped_weights_are_grover_et_al_s():
    """Flattening w^alpha and clipping max(w, beta) of the cumulative weight (Grover et al. 2019),
    closed forms: log w = 1 per step, reward 1 per step, so step h earns e^(alpha h) flattened and
    max(e^h, beta) clipped; alpha 0 is the uncorrected value (5)."""
    still = lambda s, a, key: s  # stays at (0, 0, 1, 0): reward xdot = 1 per step
    one = lambda s, a, s2: jnp.ones(s.shape[:-1])  # log w = 1 per step
    start, sequence = jnp.array([0.0, 0, 1, 0]), jnp.zeros((1, 5), jnp.int32)
    h = np.arange(1, 6)
    for overrides, expected in [(dict(weight_power=0.5), np.exp(0.5 * h).sum()), (dict(weight_power=0.0), 5.0),
                                (dict(weight_floor=np.exp(3.0)), np.maximum(np.exp(h), np.exp(3.0)).sum())]:
        trainer = trainer_for(**overrides)
        values, _ = trainer.estimate_values(still, one, start, 0, sequence, jax.random.PRNGKey(0))
        np.testing.assert_allclose(values, [expected], rtol=1e-5, err_msg=str(overrides))


def test_exact_density_ratio_moves_model_values_to_the_true_returns():
    """A toy problem with a known model error: IcyRoad's reward (xdot = 1 on the road, |y| <= 1;
    -5 off it) where the real next y ~ N(0, 1) and the model's y ~ N(0.5, 1), independent of the
    state. The true value of 5 steps is 5 (P_on - 5 P_off) with P_on = 2 Phi(1) - 1 (-4.52); the
    model's is -6.26. Eq. 4 with the exact log-ratio log p/q (y) = (m^2 - 2 m y) / 2 is an
    unbiased estimate of the true value (each step's weight w_1..h averages 1 under q); 4000
    particles bring it within 0.4 of it, plain and self-normalised."""
    from statistics import NormalDist

    m, particles = 0.5, 4000
    on = 2 * NormalDist().cdf(1.0) - 1
    on_model = NormalDist().cdf(1.0 - m) - NormalDist().cdf(-1.0 - m)
    true_value, model_value = 5 * (on - 5 * (1 - on)), 5 * (on_model - 5 * (1 - on_model))
    sample = lambda s, a, key: s.at[..., 1].set(m + jax.random.normal(key, s.shape[:-1])).at[..., 2].set(1.0)
    exact = lambda s, a, s2: (m**2 - 2 * m * s2[..., 1]) / 2
    plain = lambda s, a, s2: jnp.zeros(s.shape[:-1])
    start, sequence = jnp.array([0.0, 0, 1, 0]), jnp.zeros((1, 5), jnp.int32)
    for overrides in [{}, {"self_normalize": True}]:
        trainer = trainer_for(num_particles=particles, common_noise=False, **overrides)
        uncorrected, _ = trainer.estimate_values(sample, plain, start, 0, sequence, jax.random.PRNGKey(0))
        corrected, _ = trainer.estimate_values(sample, exact, start, 0, sequence, jax.random.PRNGKey(0))
        assert abs(float(uncorrected[0]) - model_value) < 0.4, (overrides, float(uncorrected[0]), model_value)
        assert abs(float(corrected[0]) - true_value) < 0.4, (overrides, float(corrected[0]), true_value)


def test_self_normalised_weights_ignore_a_constant_factor():
    """--self-normalize: log w + c for every transition (a ratio off by e^c) leaves the values
    unchanged, where the plain product scales step h's reward by e^(c h); with unequal weights
    across particles it is the weighted average."""
    trainer = trainer_for(self_normalize=True, num_particles=2, common_noise=False)
    still = lambda s, a, key: s  # reward xdot = 1 per step
    plain = lambda s, a, s2: jnp.zeros(s.shape[:-1])
    one = lambda s, a, s2: jnp.ones(s.shape[:-1])
    start, sequence = jnp.array([0.0, 0, 1, 0]), jnp.zeros((1, 5), jnp.int32)
    base, _ = trainer.estimate_values(still, plain, start, 0, sequence, jax.random.PRNGKey(0))
    shifted, _ = trainer.estimate_values(still, one, start, 0, sequence, jax.random.PRNGKey(0))
    np.testing.assert_allclose(shifted, base, rtol=1e-6)
    np.testing.assert_allclose(base, [5.0], rtol=1e-6)
    # Particle 0 at xdot 1 (reward 1), particle 1 at xdot 3 (reward 3 + 8 bonus) with log-weight
    # log 3 per step: after h steps the weights are 1 : 3^h, so step h earns (1 + 11 * 3^h) / (1 + 3^h).
    two = lambda s, a, key: s.at[1, 2].set(3.0)
    tilted = lambda s, a, s2: jnp.array([0.0, np.log(3.0)])
    values, _ = trainer.estimate_values(two, tilted, start, 0, sequence, jax.random.PRNGKey(0))
    expected = sum((1 + 11 * 3.0**h) / (1 + 3.0**h) for h in range(1, 6))
    np.testing.assert_allclose(values, [expected], rtol=1e-5)


# --- the whole loop --------------------------------------------------------------------------------
def _run(tmp_path, **overrides):
    args = tiny_args(run_dir=str(tmp_path), run_name="run", **overrides)
    run_dir, _ = dam.run(args)
    return run_dir, pd.read_csv(run_dir.path / "metrics.csv")


@pytest.mark.parametrize("method,model", [("baseline", "gaussian"), ("minvar", "mdn"), ("disc", "gaussian"),
                                          ("dam", "mdn")])
def test_each_method_runs_end_to_end(tmp_path, method, model):
    run_dir, df = _run(tmp_path, method=method, model=model)
    assert list(df["round"]) == [1, 2] and list(df["env_steps"]) == [25, 30]
    assert df["charts/episode_return"].notna().all()
    assert ("disc/loss" in df) == (method in ("disc", "dam"))
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["method"] == method


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TINY (the corrected method, mdn), seeds 0 and 1, through the command line; the in-process
    runs of the same config read its programs from the tests' shared cache (conftest.py)."""
    root = tmp_path_factory.mktemp("dam")
    done = subprocess.run([sys.executable, str(ROOT / "algorithms" / "dam.py"),
                           *as_cli({**TINY, "num_seeds": 2, "run_dir": str(root), "run_name": "run"})],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return types.SimpleNamespace(path=root / "run"), pd.read_csv(root / "run" / "metrics.csv")


def test_same_seed_identical_and_vmapped_seed_equals_single_run(reference, tmp_path):
    _, both = reference
    _, again = _run(tmp_path / "again", method="dam", model="mdn", num_seeds=2)
    cols = [c for c in both.columns if c != "charts/steps_per_second"]
    pd.testing.assert_frame_equal(both[cols], again[cols])
    _, single = _run(tmp_path / "single", method="dam", model="mdn", seed=1)
    seed1 = both[both.seed == 1].reset_index(drop=True)
    np.testing.assert_array_equal(seed1["charts/episode_return"], single["charts/episode_return"])
    # Losses to XLA's batch-dependent rounding (batch 2 vs 1; measured up to 1.2e-4 relative).
    for col in ["model/loss", "disc/loss", "plan/value_first_step"]:
        np.testing.assert_allclose(seed1[col], single[col], rtol=1e-3, atol=1e-5)


def test_the_final_state_holds_the_normalizer_of_all_collected_data(reference):
    """Alg. 3's order (plan, add, refit): the saved final state's normalizer is the one fitted on
    every episode the run collected, the last round's included (the model is fitted with it)."""
    run_dir, _ = reference
    args, _, state, _ = utils.load_saved(str(run_dir.path), dam.Args, dam.make_train, dam.seed_keys)
    for seed in range(args.num_seeds):
        runner = jax.tree.map(lambda x: np.asarray(x)[seed], state)
        assert int(runner.data.size) == args.init_episodes + args.rounds * args.episodes_per_round
        refit = dam.fit_normalizer(args, jax.tree.map(jnp.asarray, runner.data))
        for mine, truth in zip(runner.norm, refit):
            np.testing.assert_allclose(mine, truth, rtol=1e-5, atol=1e-6)


def test_killed_run_resumes_to_identical_results(reference, tmp_path, monkeypatch):
    original = utils.RunDir.write_metrics
    calls = []

    def dying_write(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # killed in round 2, after round 1's checkpoint
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(utils.RunDir, "write_metrics", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, method="dam", model="mdn", num_seeds=2)
    monkeypatch.setattr(utils.RunDir, "write_metrics", original)
    run_dir, _ = dam.run(dam.Args(resume=str(tmp_path / "run")))
    df = pd.read_csv(run_dir.path / "metrics.csv")
    cols = [c for c in df.columns if c != "charts/steps_per_second"]
    pd.testing.assert_frame_equal(df[cols], reference[1][cols])


def test_bad_arguments_fail_before_compiling():
    for overrides, message in [
        (dict(env_id="hopper"), "unknown env 'hopper' for DAM"),
        (dict(method="best"), "unknown --method"),
        (dict(model="flow"), "unknown --model"),
        (dict(weight="softmax"), "unknown --weight"),
        (dict(rounds=0), "--rounds must be positive"),
        (dict(horizon=-1), "--horizon must be positive"),
        (dict(model="mdn", mixture_components=1), "--mixture-components must be >= 2"),
        (dict(max_log_weight=0.0), "--max-log-weight must be positive"),
        (dict(model="true", method="dam"), "--model true plans with the env's own dynamics"),
        (dict(min_input_std=-1.0), "--min-input-std must be >= 0"),
        (dict(weight_power=1.5), "--weight-power must be in"),
        (dict(minvar_shift="zero"), "--minvar-shift must be data or worst"),
        (dict(weight_floor=-0.1), "--weight-floor must be >= 0"),
        (dict(disc_holdout=1.0), "--disc-holdout must be in"),
        (dict(disc_eval_every=33), "--disc-eval-every must be a positive divisor"),
        (dict(disc_holdout_batch=0), "--disc-holdout-batch must be positive"),
        (dict(init_episodes=1), "--disc-holdout needs --init-episodes >= 2"),
    ]:
        with pytest.raises(SystemExit, match=message):
            tiny_args(**overrides)


def test_cli_help_and_evaluate_saved(intersection_cli, tmp_path):
    """The command line (the Intersection run is its: `intersection_cli`), --help, the saved run
    evaluated in this process (the run's evaluation program, read from the tests' shared cache)
    and rendered from the command line."""
    summary, _ = intersection_cli
    shown = help_text(dam.Args)
    for flag in ["--method", "--model", "--num-sequences", "--horizon", "--rounds", "--mixture-components",
                 "--weight", "--max-log-weight", "--disc-lr", "--model-train-steps", "--num-seeds"]:
        assert flag in shown
    returns = dam.evaluate_saved(summary["run_dir"], eval_episodes=2)
    assert returns.shape == (4,) and np.isfinite(returns).all()
    rendered = subprocess.run([sys.executable, str(ROOT / "algorithms" / "dam.py"), "--render", summary["run_dir"]],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)  # --render, from the CLI
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    file = Path(json.loads(rendered.stdout.strip().splitlines()[-1])["render"])
    assert file == Path(summary["run_dir"]) / "episode.png" and file.stat().st_size > 10_000


def test_dam_learns_icy_road(tmp_path):
    """With the mixture model the planner learns to accelerate once and cruise (return 10)
    instead of acting at random (about -1 here): the final evaluation (20 planner episodes per
    seed, apart from data collection) averages > 5 over 4 seeds (measured 6.97)."""
    run_dir, df = _run(tmp_path, method="dam", model="mdn", rounds=3, init_episodes=20, num_seeds=4,
                       num_sequences=200, num_particles=10, model_width=64, disc_width=64, model_train_steps=1000,
                       disc_train_steps=500, model_batch_size=128, disc_batch_size=128)
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert len(summary["eval/return_per_seed"]) == 4 and summary["eval_episodes"] == 20
    assert summary["eval/return_mean"] > 5, summary
