"""PETS: the optimizers, trajectory sampling, the model fit, planning with the true dynamics and the
whole compiled loop on tiny configurations.

Few distinct whole-loop configurations on purpose: each costs ~20-40 s of compilation on CPU."""

import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
import test_brax_tasks

from algorithms import pets, utils

import probe
from helpers import as_cli, help_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import CASES  # noqa: E402

PETS_SMOKE = CASES["pets"][3]
TINY = dict(
    env_id="inverted_pendulum", backend="positional", num_trials=5, episode_length=100, horizon=15, population=50, num_elites=5,
    cem_iterations=3, num_particles=5, model_width=32, model_depth=2, model_weight_decay=(1e-5, 1e-5, 1e-5),
    # More and faster model training than the paper's 5 epochs at 1e-3: the pendulum's trials end
    # after ~10-40 steps at first, so 5 epochs would be a handful of SGD steps per trial.
    model_epochs=80, model_lr=3e-3, model_min_sgd_steps=0, progress=False,
)


def tiny_args(**overrides):
    return pets.resolve(pets.Args(**{**TINY, **overrides}))


@functools.lru_cache(maxsize=None)
def _trainer(**overrides):
    args = tiny_args(**overrides)
    return args, pets.make_train(args), *pets.make_env(args)


# --- optimizers ----------------------------------------------------------------------------------
LOWER, UPPER = -jnp.ones(2), jnp.ones(2)


def _quadratic(target):
    """Value of sequences (N, H, A): minus the squared distance to `target` (H, A)."""
    return lambda seqs, key: -jnp.sum((seqs - target) ** 2, axis=(1, 2))


def test_cem_finds_the_optimum_of_a_quadratic_and_samples_inside_the_bounds():
    target = jax.random.uniform(jax.random.PRNGKey(0), (6, 2), minval=-0.8, maxval=0.8)
    seen = []

    def value(seqs, key):
        jax.debug.callback(lambda s: seen.append(np.abs(s).max()), seqs)
        return _quadratic(target)(seqs, key)

    run = jax.jit(lambda key: pets.cem(value, jnp.zeros((6, 2)), key, population=300, num_elites=30, iterations=20,
                                       alpha=0.1, epsilon=0.0, lower=LOWER, upper=UPPER))
    mean, stats = run(jax.random.PRNGKey(1))
    np.testing.assert_allclose(mean, target, atol=0.03)
    assert int(stats["plan/iterations"]) == 20 and max(seen) <= 1.0
    assert float(stats["plan/best_value"]) > -0.05 and float(stats["plan/final_std"]) < 0.05
    # PETS' early stop: once the largest variance is below epsilon, no more iterations.
    _, stats = jax.jit(lambda key: pets.cem(_quadratic(target), jnp.zeros((6, 2)), key, population=300, num_elites=30,
                                            iterations=20, alpha=0.1, epsilon=1e-2, lower=LOWER, upper=UPPER))(
        jax.random.PRNGKey(1))
    assert 1 < int(stats["plan/iterations"]) < 20


def test_cem_reaches_a_bound_without_leaving_it():
    seen = []

    def value(seqs, key):  # optimum at the upper bound
        jax.debug.callback(lambda s: seen.append(np.abs(s).max()), seqs)
        return jnp.sum(seqs, axis=(1, 2))

    mean, _ = jax.jit(lambda key: pets.cem(value, jnp.zeros((4, 2)), key, population=100, num_elites=10,
                                           iterations=15, alpha=0.1, epsilon=0.0, lower=LOWER, upper=UPPER))(
        jax.random.PRNGKey(2))
    # The variance constraint (2 std inside the bounds) slows the approach to a bound, but it gets close.
    assert max(seen) <= 1.0 and np.all(np.asarray(mean) > 0.8)


def test_cem_iterations_replay_the_references_update_on_the_samples_it_drew():
    """Each iteration against handful-of-trials' CEM (dmbrl/misc/optimizers/cem.py) replayed in
    numpy on the samples CEM drew and the values it got: the constrained variance
    min((mean - lb)^2 / 4, (ub - mean)^2 / 4, var), samples within mean +- 2 sqrt(that) and
    strictly inside the bounds (the constraint, not a clip, keeps them there), elites by value,
    mean <- alpha mean + (1 - alpha) mean(elites), var likewise. The start is near a bound, where
    the constraint binds."""
    drawn = []

    def value(seqs, key):
        values = -jnp.sum((seqs - 0.3) ** 2, axis=(1, 2))
        jax.debug.callback(lambda s, v: drawn.append((np.asarray(s, np.float64), np.asarray(v))), seqs, values)
        return values

    init = jnp.full((3, 2), 0.85)  # (ub - mean) / 2 = 0.075: the constrained std, far below the initial 0.5
    alpha, elites, iterations = 0.1, 8, 4
    mean, stats = jax.jit(lambda key: pets.cem(value, init, key, population=64, num_elites=elites, iterations=iterations,
                                               alpha=alpha, epsilon=0.0, lower=LOWER, upper=UPPER))(jax.random.PRNGKey(3))
    assert len(drawn) == iterations
    lb, ub = np.asarray(LOWER, np.float64), np.asarray(UPPER, np.float64)
    ref_mean, ref_var = np.asarray(init, np.float64), np.full((3, 2), (2.0**2) / 16)
    for samples, values in drawn:
        constrained = np.minimum(np.minimum(((ref_mean - lb) / 2) ** 2, ((ub - ref_mean) / 2) ** 2), ref_var)
        reach = np.abs(samples - ref_mean) / np.sqrt(constrained)
        assert reach.max() <= 2.0 + 1e-3 and reach.max() > 1.5, reach.max()  # truncated at 2 std, and wide as that
        assert (samples > lb).all() and (samples < ub).all()
        top = samples[np.argsort(-values, kind="stable")[:elites]]
        ref_mean = alpha * ref_mean + (1 - alpha) * top.mean(0)
        ref_var = alpha * ref_var + (1 - alpha) * top.var(0)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["plan/final_std"], np.mean(np.sqrt(ref_var)), rtol=1e-3)


def test_random_shooting_returns_the_best_of_its_budget():
    target = jnp.full((5, 2), 0.3)
    calls = []

    def value(seqs, key):
        jax.debug.callback(lambda s: calls.append(s.shape[0]), seqs)
        return _quadratic(target)(seqs, key)

    best, stats = jax.jit(lambda key: pets.random_shooting(value, (5, 2), key, population=64, iterations=4,
                                                           lower=LOWER, upper=UPPER))(jax.random.PRNGKey(0))
    assert calls == [64] * 4  # iterations x population sequences, as CEM's budget
    np.testing.assert_allclose(float(stats["plan/best_value"]), float(value(best[None], None)[0]), rtol=1e-6)
    assert np.all(np.abs(np.asarray(best)) <= 1.0)


@pytest.mark.parametrize("beta", [0.0, 0.25, 2.0])
def test_colored_noise_has_the_power_law_spectrum_of_its_exponent(beta):
    """iCEM's samples: the mean periodogram along the horizon falls as 1 / f^beta (log-log slope
    -beta over the frequencies 1/H .. 1/2 - 1/H), and the variance is the generator's (1 with
    the f = 0 term left out of the normalisation, as Timmer & Koenig's code: 1.02 for white
    noise at H = 30, 1.16 for beta 2)."""
    horizon = 30
    noise = np.asarray(pets.colored_noise(jax.random.PRNGKey(0), beta, (4000, horizon, 2)), np.float64)
    power = np.mean(np.abs(np.fft.rfft(noise, axis=1)) ** 2, axis=(0, 2))
    k = np.arange(1, horizon // 2)
    slope = np.polyfit(np.log(k), np.log(power[k]), 1)[0]
    assert abs(slope + beta) < 0.1, slope
    s = np.maximum(np.fft.rfftfreq(horizon), 1 / horizon) ** (-beta / 2)
    dc_share = s[0] ** 2 / (4 * np.sum(s[1:-1] ** 2) + s[-1] ** 2)
    np.testing.assert_allclose(noise.var(), 1 + dc_share, rtol=0.03)


def _recording(value_fn, log):
    def value(seqs, key):
        values = value_fn(seqs, key)
        jax.debug.callback(lambda s, v: log.append((np.asarray(s), np.asarray(v))), seqs, values)
        return values
    return value


def _icem(value, state, key, **overrides):
    kw = dict(population=200, num_elites=20, iterations=10, alpha=0.1, decay=1.25, beta=0.0, lower=LOWER, upper=UPPER)
    return jax.jit(lambda key: pets.icem(value, state, key, **{**kw, **overrides}))(key)


def _icem_state(horizon, keep, elites=None):
    mean = jnp.zeros((horizon, 2))
    if elites is None:
        return mean, jnp.zeros((keep, horizon, 2)), jnp.bool_(False)
    return mean, elites, jnp.bool_(True)


def test_icem_finds_the_optimum_of_a_quadratic_with_a_shrinking_population():
    """A known optimum inside the bounds; the population per iteration is the paper's schedule
    (200, 160, 128, 102, 81, 64, 51, then 40: / 1.25, at least 2 elites' worth), plus the 6
    shifted elites in the first; the kept elites are not evaluated again."""
    target = jax.random.uniform(jax.random.PRNGKey(0), (6, 2), minval=-0.8, maxval=0.8)
    log = []
    best, stats, (next_mean, kept, ok) = _icem(_recording(_quadratic(target), log), _icem_state(6, 6),
                                               jax.random.PRNGKey(1), iterations=20)
    assert [len(v) for _, v in log] == [206, 160, 128, 102, 81, 64, 51] + [40] * 13
    np.testing.assert_allclose(best, target, atol=0.03)
    assert float(stats["plan/best_value"]) > -0.002 and kept.shape == (6, 6, 2) and bool(ok)
    assert np.array_equal(next_mean[-1], next_mean[-2])  # shifted, the last step repeated


def test_icem_replays_their_update_executes_the_best_sequence_and_tries_the_mean_last():
    """Against the iCEM code (martius-lab/iCEM, controllers/icem.py) replayed in numpy on the
    samples it drew and their values: elites by value among the new samples and the kept ones,
    mean and std smoothed by alpha, the best 30% of the elites kept with their values; the last
    iteration's first sample is the mean; the executed sequence is the best of all evaluated,
    not the mean."""
    target = jnp.full((5, 2), 0.4)
    log = []
    alpha, elites, keep = 0.1, 10, 3
    best, stats, (next_mean, kept, _) = _icem(_recording(_quadratic(target), log), _icem_state(5, keep),
                                              jax.random.PRNGKey(2), population=40, num_elites=elites,
                                              iterations=4, beta=2.0, alpha=alpha)
    mean, kept_samples, kept_values = np.zeros((5, 2)), None, None
    for i, (samples, values) in enumerate(log):
        if i == len(log) - 1:
            np.testing.assert_allclose(samples[0], mean, atol=1e-5)
        if i == 0:
            values = np.where(np.arange(len(values)) < 40, values, -np.inf)  # no previous step's elites yet
        else:
            samples, values = np.concatenate([samples, kept_samples]), np.concatenate([values, kept_values])
        order = np.argsort(-values, kind="stable")[:elites]
        mean = alpha * mean + (1 - alpha) * samples[order].mean(0)
        kept_samples, kept_values = samples[order[:keep]], values[order[:keep]]
    np.testing.assert_allclose(next_mean[:-1], mean[1:], atol=1e-5)
    np.testing.assert_allclose(kept, kept_samples, atol=1e-6)
    every = np.concatenate([s for s, _ in log]), np.concatenate([v for _, v in log])
    np.testing.assert_allclose(best, every[0][np.argmax(every[1])])
    assert float(stats["plan/best_value"]) == every[1].max()


def test_icem_evaluates_the_last_steps_elites_one_step_later():
    """A value whose optimum is the previous step's elite shifted by one step (any last action):
    the shifted elite is evaluated in the first iteration and found; not when no previous step
    has elites (an episode's first step), nor with the mutant that does not shift."""
    elite = jax.random.uniform(jax.random.PRNGKey(3), (1, 8, 2), minval=-0.9, maxval=0.9)
    value = lambda seqs, key: -jnp.sum((seqs[:, :-1] - elite[0, 1:]) ** 2, axis=(1, 2))
    kw = dict(population=4, num_elites=2, iterations=1)
    best, stats, _ = _icem(value, _icem_state(8, 1, elite), jax.random.PRNGKey(4), **kw)
    assert float(stats["plan/best_value"]) > -1e-10
    np.testing.assert_allclose(best[:-1], elite[0, 1:])
    _, stats, _ = _icem(value, _icem_state(8, 1), jax.random.PRNGKey(4), **kw)
    assert float(stats["plan/best_value"]) < -0.5


def test_mppi_replays_the_references_update_and_finds_a_quadratics_optimum():
    """Against mbrl-lib's MPPIOptimizer replayed in numpy: each new mean is the average of the
    iteration's samples weighted by exp(gamma (value - max)); with (almost) no noise the samples
    are the smoothed mean u_t = beta mean_t + (1 - beta) u_(t-1), from the last action. Then with
    noise, a sharp gamma and no smoothing (beta 1: smoothing biases each step towards the one
    before) it reaches a known optimum inside the bounds."""
    target = jnp.linspace(-0.5, 0.5, 12).reshape(6, 2)
    start = (jnp.full((6, 2), 0.2), jnp.array([0.9, -0.9]))
    log = []
    mean, stats, (next_mean, last) = jax.jit(lambda key: pets.mppi(
        _recording(_quadratic(target), log), start, key, population=64, iterations=3, gamma=2.0, sigma=1e-6,
        beta=0.7, lower=LOWER, upper=UPPER))(jax.random.PRNGKey(5))
    ref_mean = np.asarray(start[0], np.float64)
    for samples, values in log:
        u, smoothed = np.asarray(start[1], np.float64), []
        for t in range(6):
            u = 0.7 * ref_mean[t] + 0.3 * u
            smoothed.append(u)
        np.testing.assert_allclose(samples, np.broadcast_to(smoothed, samples.shape), atol=1e-5)
        w = np.exp(2.0 * (values - values.max()))
        ref_mean = np.einsum("n,nha->ha", w, samples) / w.sum()
    np.testing.assert_allclose(mean, ref_mean, atol=1e-5)
    np.testing.assert_allclose(next_mean[:-1], mean[1:])
    np.testing.assert_allclose(last, mean[0])
    mean, _, _ = jax.jit(lambda key: pets.mppi(_quadratic(target), (jnp.zeros((6, 2)), jnp.zeros(2)), key,
                                               population=300, iterations=20, gamma=20.0, sigma=0.1, beta=1.0,
                                               lower=LOWER, upper=UPPER))(jax.random.PRNGKey(6))
    np.testing.assert_allclose(mean, target, atol=0.05)


def test_mppi_stays_finite_when_every_value_overflowed():
    """A first model can blow every particle up: the means over particles then overflow to -inf
    (measured on pendulum's trial 1: NaN actions from there on). MPPI's mean stays finite: all -inf
    values weigh equally; NaN and +inf count as the reference's very bad value."""
    start = (jnp.full((4, 2), 0.3), jnp.zeros(2))
    for bad in [lambda seqs, key: jnp.full(seqs.shape[0], -jnp.inf),
                lambda seqs, key: jnp.where(jnp.arange(seqs.shape[0]) % 2 == 0, jnp.nan, jnp.inf)]:
        mean, _, (_, last) = jax.jit(lambda key: pets.mppi(bad, start, key, population=16, iterations=2, gamma=0.9,
                                                           sigma=0.5, beta=0.9, lower=LOWER, upper=UPPER))(jax.random.PRNGKey(0))
        assert np.isfinite(np.asarray(mean)).all() and np.isfinite(np.asarray(last)).all()


def test_plan_executes_the_first_step_and_warm_starts_from_the_shifted_solution():
    args, _, env, params = _trainer()
    target = jax.random.uniform(jax.random.PRNGKey(3), (args.horizon, 1), minval=-0.5, maxval=0.5)
    prev = jnp.full((args.horizon, 1), 0.2)
    plan = jax.jit(functools.partial(pets.plan, args, env, params), static_argnums=0)
    action, next_plan, _ = plan(_quadratic(target), prev, jax.random.PRNGKey(4))
    solution, _ = pets.cem(_quadratic(target), prev, jax.random.PRNGKey(4), population=args.population,
                           num_elites=args.num_elites, iterations=args.cem_iterations, alpha=args.cem_alpha,
                           epsilon=args.cem_epsilon, lower=-jnp.ones(1), upper=jnp.ones(1))
    np.testing.assert_allclose(action, solution[0], atol=1e-5)
    np.testing.assert_allclose(next_plan[:-1], solution[1:], atol=1e-5)
    assert float(next_plan[-1, 0]) == 0.0  # the middle of [-1, 1]


# --- trajectory sampling ---------------------------------------------------------------------------
def _two_member_ensemble(deltas, obs_size, action_size):
    """A noise-free ensemble: member b predicts next_obs = obs + deltas[b] whatever the input (zero
    weights, the delta as the last bias, log-variance pinned at -80: std ~ 4e-18)."""
    model = pets.Ensemble(jax.random.PRNGKey(0), len(deltas), obs_size + action_size, obs_size, 8, 1)
    last = jnp.concatenate([jnp.asarray(deltas, jnp.float32), jnp.zeros((len(deltas), obs_size))], -1)
    pinned = jnp.full((obs_size,), -80.0, jnp.float32)
    return eqx.tree_at(lambda m: (m.weights, m.biases[-1], m.max_logvar, m.min_logvar), model,
                       ([jnp.zeros_like(w) for w in model.weights], last, pinned, pinned))


@pytest.mark.parametrize("propagation", ["ts-inf", "ts1", "expectation"])
def test_model_value_of_a_noise_free_ensemble_is_known_exactly(propagation):
    """Pendulum from upright at rest, 2 members that add +1 / -1 to the angular velocity, 2
    particles, horizon 3, zero torque. The exact candidate values, from `reward_fn` on states rolled
    by hand: TS-inf, each particle keeps its member: -(0 + 0.1 + 0.4) = -0.5 on every draw; TS1,
    the members are redrawn every step: -0.5 if step 2 repeats step 1's assignment, else -(0 + 0.1
    + 0) = -0.1, and over 64 draws both occur; expectation, the mean prediction (+0): 0."""
    args = pets.resolve(pets.Args(env_id="pendulum", ensemble_size=2, num_particles=2, horizon=3, population=4,
                                  num_elites=2, propagation=propagation, model_width=8, model_depth=1,
                                  model_weight_decay=(0.0, 0.0), progress=False))
    env, _ = pets.make_env(args)
    model = _two_member_ensemble([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], env.obs_size, env.action_size)
    upright = jnp.array([1.0, 0.0, 0.0])
    actions = jnp.zeros((1, 3, env.action_size))

    def by_hand(sequence):  # particle A's members per step; particle B has the other member
        values = []
        for first in (0, 1):
            obs, total = np.array([1.0, 0.0, 0.0]), 0.0
            for m in sequence:
                member = m if first == 0 else 1 - m
                nxt = obs + np.array([0.0, 0.0, 1.0 if member == 0 else -1.0])
                total += float(env.reward_fn(jnp.asarray(obs), jnp.zeros(1), jnp.asarray(nxt)))
                obs = nxt
            values.append(total)
        return np.mean(values)

    values = np.asarray(jax.jit(jax.vmap(lambda k: pets.model_value(args, env, model, upright, actions, k)[0]))(
        jax.random.split(jax.random.PRNGKey(1), 64)))
    if propagation == "ts-inf":
        np.testing.assert_allclose(values, by_hand([0, 0, 0]), atol=1e-5)
        assert by_hand([0, 0, 0]) == pytest.approx(-0.5)
    elif propagation == "ts1":
        same, swapped = by_hand([0, 0, 0]), by_hand([0, 1, 0])
        assert same == pytest.approx(-0.5) and swapped == pytest.approx(-0.1)
        near = lambda v: np.isclose(values, v, atol=1e-5)  # noqa: E731
        assert (near(same) | near(swapped)).all() and near(same).any() and near(swapped).any(), values
    else:
        np.testing.assert_allclose(values, 0.0, atol=1e-5)


def test_ts_inf_keeps_each_particles_member_and_ts1_resamples_it():
    h, n, p, b = 8, 6, 10, 5
    inf = np.asarray(pets.particle_members(jax.random.PRNGKey(0), "ts-inf", h, n, p, b))
    one = np.asarray(pets.particle_members(jax.random.PRNGKey(0), "ts1", h, n, p, b))
    assert inf.shape == one.shape == (h, n, p)
    assert np.all(inf == inf[0])  # fixed over the horizon
    assert not np.all(one == one[0]) and np.mean(one[1:] != one[:-1]) > 0.5  # resampled every step
    for members in (inf, one):  # balanced: P / B particles per member, candidate and step
        counts = np.stack([(members == m).sum(-1) for m in range(b)])
        assert np.all(counts == p // b)
    assert not np.all(inf[0] == inf[0, 0])  # random assignments differ across candidates


def _member_index_model(b, out, in_size=5):
    """An ensemble whose member m predicts exactly m for every output (no noise to speak of)."""
    model = pets.Ensemble(jax.random.PRNGKey(0), b, in_size, out, 8, 1)
    model = pets.eqx.tree_at(lambda m: m.weights, model, [jnp.zeros_like(w) for w in model.weights])
    bias = jnp.concatenate([jnp.repeat(jnp.arange(b, dtype=jnp.float32)[:, None], out, 1), jnp.full((b, out), -100.0)], 1)
    return pets.eqx.tree_at(lambda m: (m.biases[-1], m.min_logvar), model, (bias, jnp.full(out, -40.0)))


@pytest.mark.parametrize("propagation", ["ts-inf", "ts1", "expectation"])
def test_model_step_propagates_each_particle_with_its_member(propagation):
    args = tiny_args(propagation=propagation, learn_reward=True, num_particles=10)
    n, p, b = 3, args.num_particles, args.ensemble_size
    model = _member_index_model(b, 5)  # 4 observation deltas + the reward
    members = pets.particle_members(jax.random.PRNGKey(1), propagation, 1, n, p, b)[0]
    obs = jnp.ones((n, p, 4))
    step = jax.jit(functools.partial(pets.model_step, args))
    next_obs, reward = step(model, obs, jnp.zeros((n, p, 1)), members, jax.random.PRNGKey(2))
    expected = np.full((n, p), (b - 1) / 2) if propagation == "expectation" else np.asarray(members, np.float32)
    np.testing.assert_allclose(next_obs, 1.0 + np.repeat(expected[..., None], 4, -1), atol=1e-4)
    np.testing.assert_allclose(reward, expected, atol=1e-4)


def test_particles_earn_no_reward_after_termination_and_blown_up_particles_count_as_very_bad():
    def step(state, action, t, key):  # state counts steps; terminates at step 3 (reward 1 per step)
        state = state + 1.0
        reward = jnp.ones_like(state) + action[..., 0]
        # particle 0 of candidate 1 blows up
        reward = reward.at[1, 0].set(jnp.where(t == 5, jnp.nan, reward[1, 0]))
        return state, reward, state >= 3

    seqs = jnp.zeros((2, 10, 1)).at[0].set(0.5)
    values = pets.trajectory_values(step, jnp.float32(0.0), seqs, jax.random.PRNGKey(0), num_particles=4)
    np.testing.assert_allclose(values, [3 * 1.5, 3.0], rtol=1e-6)  # the NaN comes after termination: ignored
    values = pets.trajectory_values(lambda s, a, t, k: step(s, a, t, k)[:2] + (s < -1,), jnp.float32(0.0), seqs,
                                    jax.random.PRNGKey(0), num_particles=4)
    np.testing.assert_allclose(values, [15.0, (3 * 10.0 + pets.NONFINITE_RETURN) / 4], rtol=1e-6)


# --- the model -----------------------------------------------------------------------------------
def _noisy_buffer(key, n, capacity):
    """next_obs - obs = sin(2 obs_0) + noise with std 0.05; reward = obs_1 + a (noiseless); obs_3 near-constant."""
    k1, k2, k3 = jax.random.split(key, 3)
    obs = jax.random.uniform(k1, (n, 4), minval=-1, maxval=1)
    obs = obs.at[:, 3].set(0.3 + 1e-3 * obs[:, 2])  # spread 6e-4, like reacher's z coordinate
    action = jax.random.uniform(k2, (n, 1), minval=-1, maxval=1)
    next_obs = obs + jnp.sin(2 * obs[:, :1]) + 0.05 * jax.random.normal(k3, (n, 4))
    pad = lambda x: jnp.zeros((capacity, *x.shape[1:]), x.dtype).at[:n].set(x)
    return pets.Buffer(pets.Transition(pad(obs), pad(action), pad(obs[:, 1] + action[:, 0]), pad(next_obs),
                                       jnp.zeros(capacity, bool)), jnp.int32(n))


def test_fit_learns_obs_and_reward_and_compiles_once_as_the_buffer_grows():
    # The floor of 500 SGD steps binds at 100 transitions (4 minibatches: 125 epochs), not at 400.
    args = tiny_args(learn_reward=True, num_trials=4, episode_length=100, model_epochs=60,
                             model_min_sgd_steps=500)
    traces = []

    def counted(*a):
        traces.append(1)
        return pets.fit_model(args, *a)

    fit = jax.jit(counted)
    full = _noisy_buffer(jax.random.PRNGKey(0), 400, 400)
    model = pets.Ensemble(jax.random.PRNGKey(1), args.ensemble_size, 5, 5, args.model_width, args.model_depth)
    opt = optax.adam(args.model_lr).init(pets.eqx.filter(model, pets.eqx.is_array))
    for size, epochs in ((100, 125), (400, args.model_epochs)):  # continuing on more data, as after each trial
        model, opt, metrics = fit(model, opt, full._replace(size=jnp.int32(size)), jax.random.PRNGKey(size))
        assert int(metrics["model/sgd_steps"]) == epochs * math.ceil(size / args.model_batch_size)
    assert len(traces) == 1
    # Near-constant inputs are not divided by their tiny spread (that made reacher explode).
    assert float(model.input_std[3]) == 1.0 and float(model.input_std[0]) < 1.0
    x = jnp.array([[0.5, 0.2, 0.0, 0.3, 0.8], [-0.5, -0.3, 0.0, 0.3, -0.8]])
    mean, logvar = model(jnp.broadcast_to(x, (args.ensemble_size, 2, 5)))
    np.testing.assert_allclose(mean.mean(0)[:, :4], np.repeat(np.sin([[1.0], [-1.0]]), 4, 1), atol=0.1)
    np.testing.assert_allclose(mean.mean(0)[:, 4], [1.0, -1.1], atol=0.1)
    assert float(metrics["model/train_mse"]) < 0.01


# --- the reference's per-task preprocessing -----------------------------------------------------------
def _reference_halfcheetah(obs, next_obs):
    """dmbrl/config/halfcheetah.py's obs_preproc and targ_proc, and its obs_postproc as a function,
    on the reference's layout [x-velocity, root z, root angle, joints (6), qvel (9)] (MODEL_IN 24
    with the 6 actions, MODEL_OUT 18)."""
    preproc = np.concatenate([obs[:, 1:2], np.sin(obs[:, 2:3]), np.cos(obs[:, 2:3]), obs[:, 3:]], axis=1)
    targ = np.concatenate([next_obs[:, :1], next_obs[:, 1:] - obs[:, 1:]], axis=1)
    postproc = lambda o, pred: np.concatenate([pred[:, :1], o[:, 1:] + pred[:, 1:]], axis=1)
    return preproc, targ, postproc


# In the group of Brax's positional halfcheetah (conftest.py, by the id), whose stepping program
# test_brax_tasks.py compiles (tests/probe.py): its transitions cost no compile of their own.
@pytest.mark.parametrize("task,backend", [("halfcheetah", "positional")])
def test_halfcheetah_preprocessing_is_the_references_and_gives_back_the_observation_layout(task, backend):
    """Oracles: the reference's transforms (its config, on its observation layout) and real
    transitions of the env: postprocess(obs, target(obs, next_obs)) must be the env's next
    observation, on which `reward_fn` gives `step`'s reward."""
    env, _ = probe.env_of(task, backend)
    preprocess, target, postprocess = pets.transforms(pets.PREPROCESS[task], env.obs_size)
    horizon, steps = test_brax_tasks.horizon(task, backend), 30  # one env's first 30 random steps
    actions = jax.random.uniform(jax.random.PRNGKey(1), (probe.BATCH, horizon, env.action_size), minval=-1, maxval=1)
    _, states = probe.reset(env, jax.random.PRNGKey(0), probe.params_of(env))
    _, out = probe.runner(env, horizon)[0](states, actions, probe.step_keys(jax.random.PRNGKey(2), horizon), steps,
                                           probe.params_of(env))
    obs, next_obs, reward = (np.array(out[k][0, :steps]) for k in ("obs", "final_obs", "reward"))
    action = np.asarray(actions[0, :steps])
    obs[:, 1] += np.linspace(-4, 4, len(obs))  # root angles of a flipped cheetah too
    next_obs[:, 1] += np.linspace(-4, 4, len(obs))
    # Ours keeps Brax's layout with the x-velocity appended (index 17); the reference's has it first.
    to_reference = np.r_[17, 0:17]
    ref_in, ref_target, ref_postproc = _reference_halfcheetah(obs[:, to_reference], next_obs[:, to_reference])
    ours_in = np.asarray(preprocess(obs))
    assert ours_in.shape[1] + env.action_size == 24 and np.asarray(target(obs, next_obs)).shape[1] == 18
    for column in ref_in.T:  # the same model inputs (the order of an MLP's inputs is immaterial)
        assert np.any(np.all(np.isclose(ours_in, column[:, None], rtol=0, atol=1e-6), 0)), column[:3]
    np.testing.assert_allclose(np.asarray(target(obs, next_obs))[:, to_reference], ref_target, atol=1e-6)
    predicted = np.asarray(postprocess(obs, target(obs, next_obs)))
    np.testing.assert_allclose(predicted[:, to_reference], ref_postproc(obs[:, to_reference], ref_target), atol=1e-6)
    np.testing.assert_array_equal(predicted[:, 17], next_obs[:, 17])  # predicted directly, not as a delta
    np.testing.assert_allclose(predicted, next_obs, atol=1e-5)
    np.testing.assert_allclose(env.reward_fn(obs, action, predicted), reward, atol=1e-4)
    # The raw form: observation in, next - obs out.
    raw_in, raw_target, raw_post = pets.transforms({}, env.obs_size)
    np.testing.assert_array_equal(raw_in(obs), obs)
    np.testing.assert_allclose(raw_post(obs, raw_target(obs, next_obs)), next_obs, atol=1e-5)


@pytest.mark.parametrize("preprocess", [True, False])
def test_model_step_and_model_fit_use_the_tasks_transforms(preprocess):
    """A constant model c (zero weights) moves every particle to postprocess(obs, c); the model's
    inputs are the preprocessed observation and the action, its targets the task's."""
    args = pets.resolve(pets.Args(env_id="halfcheetah", backend="positional", preprocess=preprocess, num_trials=1, episode_length=10,
                                  propagation="expectation", model_width=8, model_depth=1,
                                  model_weight_decay=(0.0, 0.0)))
    model = _member_index_model(args.ensemble_size, 18, in_size=24)  # member m predicts m; the mean is 2
    obs = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 18))
    next_obs, _ = pets.model_step(args, model, obs, jnp.zeros((2, 1, 6)), jnp.zeros((2, 1), jnp.int32), None)
    expected = np.asarray(obs) + 2.0
    if preprocess:
        expected[..., 17] = 2.0
    np.testing.assert_allclose(next_obs, expected, atol=1e-4)
    state = jax.eval_shape(pets.make_train(args).init, jax.random.PRNGKey(0))
    assert state.model.weights[0].shape == (args.ensemble_size, 24, 8)
    # What the fit regresses on (model_io): the reference's targ_proc, the next x-velocity itself
    # (index 17) and every other entry as next - obs, from the preprocessed inputs; raw: deltas.
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    empty = pets.Buffer.empty(7, 18, 6)
    buffer = empty._replace(data=empty.data._replace(obs=jax.random.normal(k1, (7, 18)), next_obs=jax.random.normal(k2, (7, 18)),
                                                     action=jax.random.normal(k3, (7, 6))))
    inputs, targets = (np.asarray(x) for x in pets.model_io(args, buffer))
    delta = np.array(buffer.data.next_obs - buffer.data.obs)
    if preprocess:
        delta[:, 17] = np.asarray(buffer.data.next_obs[:, 17])
    np.testing.assert_allclose(targets, delta, atol=1e-6)
    np.testing.assert_allclose(inputs[:, -6:], buffer.data.action)
    np.testing.assert_allclose(inputs[:, :-6], pets.task_transforms(args, 18)[0](buffer.data.obs), atol=1e-6)


def _true_dynamics_episode(args, env, params, key, steps, start=lambda state: state):
    """`steps` MPC steps of the planner using the real env as its model, from `start` of a reset
    state: (terminated, obs) per step."""

    def true_step(states, actions, t, key):
        obs, states, reward, terminated, _ = jax.vmap(jax.vmap(env.step_env, (None, 0, 0, None)), (None, 0, 0, None))(
            key, states, actions, params)
        return states, reward, terminated

    @jax.jit
    def episode(key):
        state = start(env.reset(key, params)[1])

        def step(carry, key):
            state, plan_mean = carry
            plan_key, step_key = jax.random.split(key)
            value = lambda seqs, k: pets.trajectory_values(true_step, state, seqs, k, num_particles=1)
            action, plan_mean, stats = pets.plan(args, env, params, value, plan_mean, plan_key)
            obs, state, reward, terminated, _ = env.step_env(step_key, state, action, params)
            return (state, plan_mean), (terminated, obs)

        init = (state, pets.init_plan(args, env, params))
        return jax.lax.scan(step, init, jax.random.split(key, steps))[1]

    return map(np.asarray, episode(key))


def test_planner_with_the_true_dynamics_balances_inverted_pendulum():
    """The planner (CEM + particle values with termination) using the real env as its model."""
    args = tiny_args(population=64, num_elites=8, horizon=12, cem_iterations=3)
    env, params = pets.envs.make("inverted_pendulum", backend="positional", max_steps_in_episode=1000)
    terminated, obs = _true_dynamics_episode(args, env, params, jax.random.PRNGKey(0), 80)
    assert not np.any(terminated) and np.max(np.abs(obs[:, 1])) < 0.2


@pytest.mark.parametrize("optimizer", pets.OPTIMIZERS)
def test_planner_with_the_true_dynamics_swings_up_pendulum(optimizer):
    """The pendulum curve's planner (50 candidates, H = 25, 5 iterations; each optimizer) with the
    real env as its model swings the pole up from hanging at rest (several swings: the torque is
    too weak to lift it) and holds it (angle 0 is up)."""
    args = tiny_args(env_id="pendulum", population=50, num_elites=5, horizon=25, cem_iterations=5, optimizer=optimizer)
    env, params = pets.envs.make("pendulum")
    hanging = lambda state: state.replace(theta=jnp.float32(np.pi - 0.01), theta_dot=jnp.float32(0.0))
    _, obs = _true_dynamics_episode(args, env, params, jax.random.PRNGKey(0), 200, start=hanging)
    angle = np.arctan2(obs[:, 1], obs[:, 0])
    assert np.max(np.abs(angle[-20:])) < 0.1, angle[::10]  # up by step 180 (about 9 s)


# --- the whole loop ----------------------------------------------------------------------------------
def _run(tmp_path, **overrides):
    args = dataclasses.replace(tiny_args(**overrides), run_dir=str(tmp_path))
    run_dir, metrics = pets.run(args)
    return run_dir, pd.read_csv(run_dir.path / "metrics.csv")


@functools.lru_cache(maxsize=None)
def _reference_run(tmp_root):
    return _run(Path(tmp_root) / "reference")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference_run(str(tmp_path_factory.mktemp("pets")))


def test_run_writes_metrics_summary_and_checkpoint(reference):
    run_dir, df = reference
    assert list(df["trial"]) == [0, 1, 2, 3, 4] and list(df["env_steps"]) == [100, 200, 300, 400, 500]
    assert list(df["charts/env_steps_taken"]) == list(np.cumsum(df["charts/trial_length"]))
    assert df.loc[0, ["plan/best_value", "plan/mean_value"]].isna().all()  # trial 0 is random
    assert df.loc[1:, ["plan/best_value", "plan/mean_value", "plan/final_std"]].notna().all().all()
    assert list(df["model/sgd_steps"]) == [TINY["model_epochs"] * math.ceil(n / 32) for n in df["charts/env_steps_taken"]]
    assert df["model/train_mse"].notna().all() and df["model/trial_mse"].notna().all()
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["trials"] == 5 and summary["backend"] == "positional"
    assert (run_dir.path / "checkpoint.eqx").exists()
    # The whole run is also one pure function (traced here, not compiled).
    args, trainer, _, _ = _trainer()
    _, metrics = jax.eval_shape(trainer.train, jax.random.PRNGKey(0))
    assert metrics["charts/trial_return"].shape == (args.num_trials,)


def test_pets_learns_inverted_pendulum(reference):
    """Random actions keep the pole up for ~10-40 steps; PETS' planned trials must do clearly better."""
    _, df = reference
    returns = df["charts/trial_return"].tolist()
    assert returns[0] < 50 and max(returns[1:]) >= 90 and returns[-1] >= 2 * returns[0], returns


def test_vmapped_seed_equals_single_run(tmp_path):
    """Seed 1 of a 2-seed vmapped run vs seed 1 alone. XLA's kernels at batch 2 and batch 1 round
    differently (Brax's physics too: ~3e-5 after 40 steps), and training amplifies such
    differences, so we compare where they are still rounding-sized: the random first trial (the
    same trajectory, and the same error of the initial model on it). Its fit (160 Adam steps on
    ~40 transitions) is chaotic: the same data fitted in 1, 2 or 4 vmapped copies gave train MSEs
    5.4e-4, 4.9e-4 and 6.3e-4, so fit metrics are only compared loosely."""
    _, both_seeds = _run(tmp_path / "both", num_seeds=2)
    _, single = _run(tmp_path / "single", seed=1)
    both = both_seeds[both_seeds.seed == 1].reset_index(drop=True)
    for col in ["charts/trial_return", "charts/trial_length", "model/sgd_steps"]:
        assert both.loc[0, col] == single.loc[0, col], col
    np.testing.assert_allclose(both.loc[0, "model/trial_mse"], single.loc[0, "model/trial_mse"], rtol=1e-4)
    for col in ["model/train_nll", "model/train_mse"]:
        np.testing.assert_allclose(both.loc[0, col], single.loc[0, col], rtol=0.3)
    # The two vmapped seeds are different seeds (no constant key inside `train`).
    seed0 = both_seeds[both_seeds.seed == 0].reset_index(drop=True)
    assert seed0.loc[0, "model/trial_mse"] != both.loc[0, "model/trial_mse"]


def test_killed_run_resumes_to_identical_results(reference, tmp_path, monkeypatch):
    calls = []
    original = utils.RunDir.write_metrics

    def dying_write(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # killed during the third trial, after two checkpoints
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(utils.RunDir, "write_metrics", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    monkeypatch.setattr(utils.RunDir, "write_metrics", original)
    killed_dir = next(tmp_path.iterdir())
    assert len(pd.read_csv(killed_dir / "metrics.csv")) == 2
    run_dir, _ = pets.run(pets.Args(resume=str(killed_dir)))
    df = pd.read_csv(run_dir.path / "metrics.csv")
    pd.testing.assert_frame_equal(df.drop(columns="charts/steps_per_second"),
                                  reference[1].drop(columns="charts/steps_per_second"))


@pytest.mark.parametrize("optimizer", ["icem", "mppi"])
def test_icem_and_mppi_plan_every_step_of_a_run_with_the_learned_model(tmp_path, optimizer):
    """The whole loop with the other optimizers (their carried state through the trial's scan and
    the random first trial's branch) on a tiny pendulum run: every planned step ran all its
    iterations and every value is finite; MPPI's sampling spread is its sigma's, iCEM's shrinks."""
    args = dataclasses.replace(tiny_args(env_id="pendulum", optimizer=optimizer, num_trials=2, episode_length=30,
                                         horizon=8, population=20, num_elites=4, num_particles=5),
                               run_dir=str(tmp_path))
    run_dir, _ = pets.run(args)
    df = pd.read_csv(run_dir.path / "metrics.csv")
    planned = df[df.trial > 0]
    assert (planned["plan/iterations"] == args.cem_iterations).all()
    assert np.isfinite(planned[["plan/best_value", "plan/mean_value", "charts/trial_return", "model/train_mse"]]).all().all()
    assert (planned["plan/final_std"] < 0.5).all() if optimizer == "icem" else (planned["plan/final_std"] > 0.3).all()


def test_bad_arguments_fail_before_compiling():
    for overrides, message in [
        (dict(env_id="Hopper-v4"), "unknown env"),
        (dict(env_id="IcyRoad"), "continuous-action task"),
        (dict(num_particles=7), "--num-particles 7 must be a multiple of --ensemble-size 5 for --propagation ts-inf"),
        (dict(num_particles=7, propagation="ts1"), "multiple of --ensemble-size"),
        (dict(num_elites=60), "--num-elites 60 > --population 50"),
        (dict(propagation="ts-2"), "unknown --propagation"),
        (dict(optimizer="cma-es"), "unknown --optimizer"),
        (dict(num_trials=0), "--num-trials must be positive"),
        (dict(horizon=-1), "--horizon must be positive"),
        (dict(population=0), "--population must be positive"),
        (dict(model_epochs=0), "--model-epochs must be positive"),
        (dict(cem_alpha=1.0), "--cem-alpha"),
        (dict(cem_epsilon=0.3), "--cem-epsilon"),
        (dict(model_weight_decay=(1e-5,)), "--model-weight-decay needs 3 values"),
        (dict(backend="nope"), "unknown backend"),
        (dict(min_input_std=-1.0), "--min-input-std must be >= 0"),
        (dict(model_min_sgd_steps=-1), "--model-min-sgd-steps must be >= 0"),
        (dict(optimizer="icem", num_elites=30), "--optimizer icem needs --population >= 2 x --num-elites"),
        (dict(icem_decay=0.9), "--icem-decay must be >= 1"),
        (dict(icem_noise_beta=-1.0), "--icem-noise-beta must be >= 0"),
        (dict(icem_keep_fraction=1.5), "--icem-keep-fraction must be in"),
        (dict(mppi_gamma=0.0), "--mppi-gamma must be positive"),
        (dict(mppi_sigma=-1.0), "--mppi-sigma must be positive"),
        (dict(mppi_beta=0.0), "--mppi-beta must be in"),
    ]:
        with pytest.raises(SystemExit, match=message):
            tiny_args(**overrides)
    # Expectation propagation needs no particle/member relation.
    assert tiny_args(num_particles=7, propagation="expectation").num_particles == 7


def test_presets_fill_unset_fields_and_the_cli_overrides_them():
    args = pets.resolve(pets.Args())
    assert (args.env_id, args.episode_length, args.horizon, args.population, args.num_elites) == (
        "inverted_pendulum", 200, 25, 400, 40)
    assert (args.num_particles, args.propagation, args.cem_iterations, args.cem_alpha, args.ensemble_size) == (
        20, "ts-inf", 5, 0.1, 5)
    assert args.model_min_sgd_steps == 500 and args.preprocess  # the stand-in's floor (ours)
    cheetah = pets.resolve(pets.Args(env_id="halfcheetah", horizon=10))
    assert (cheetah.episode_length, cheetah.horizon, cheetah.population, cheetah.num_elites) == (1000, 10, 500, 50)
    assert cheetah.model_min_sgd_steps == 0


def test_nonfinite_metrics_are_reported_with_where():
    with pytest.raises(utils.NonFiniteError, match=r"model/train_nll at trial 3 \(seeds \[1\]\)"):
        utils.assert_finite({"model/train_nll": np.array([1.0, np.nan])}, "trial 3")


def test_cli_with_the_other_options_and_evaluate_saved_model(tmp_path):
    """The non-default paths end to end (TS1, random shooting, learned reward), from another
    directory: the GPU check's PETS smoke case, 2 seeds on pendulum, the same program (the tests'
    shared cache compiles it once for both, whichever runs first)."""
    cli = as_cli({**PETS_SMOKE, "num_seeds": 2, "run_dir": str(tmp_path), "progress": False})
    done = subprocess.run([sys.executable, str(ROOT / "algorithms" / "pets.py"), *cli],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    df = pd.read_csv(Path(summary["run_dir"]) / "metrics.csv")
    assert len(df) == 2 * PETS_SMOKE["num_trials"] and df["charts/trial_return"].notna().all()
    assert df.loc[df.trial > 0, ["plan/best_value", "model/train_mse"]].notna().all().all()
    shown = help_text(pets.Args)
    for flag in ["--propagation", "--optimizer", "--num-particles", "--learn-reward", "--horizon", "--population",
                 "--cem-alpha", "--num-seeds", "--resume"]:
        assert flag in shown
    bad = subprocess.run([sys.executable, str(ROOT / "algorithms" / "pets.py"), "--num-particles", "7"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "multiple of --ensemble-size" in bad.stderr
    returns = pets.evaluate_saved(summary["run_dir"])
    assert returns.shape == (2,) and np.isfinite(returns).all()
    pets.render_saved(summary["run_dir"])  # --render: one MPC episode (pendulum: its trajectory plot)
    assert (Path(summary["run_dir"]) / "episode.png").stat().st_size > 1000
