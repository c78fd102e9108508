"""PETS: Probabilistic Ensembles with Trajectory Sampling (Chua, Calandra, McAllister, Levine 2018,
"Deep reinforcement learning in a handful of trials using probabilistic dynamics models"), in one
file, with each trial (an episode of MPC planning in the real env, then a model fit on all data)
compiled by XLA as one call and vmapped over seeds.

    python algorithms/pets.py --seed 0                           # inverted_pendulum (cartpole-like)
    python algorithms/pets.py --env-id pendulum --num-seeds 3    # swing-up, never terminates (as the paper's cartpole)
    python algorithms/pets.py --env-id halfcheetah --num-seeds 4
    python algorithms/pets.py --propagation ts1 --optimizer random
    python algorithms/pets.py --resume runs/<run-name>           # continue a killed run
    python algorithms/pets.py --evaluate runs/<run-name>         # one planning episode per seed with its model

Fixed by the paper and its reference code (kchua/handful-of-trials, configs per task):
* Model (PE): B = 5 swish MLPs predicting a diagonal Gaussian over next_obs - obs from
  normalized (obs, action), with the reference's per-task transforms (PREPROCESS; halfcheetah:
  sin/cos of the root angle in, the next x-velocity predicted itself); soft learned log-variance
  bounds (+0.01 * their gap as regularizer); weight decay 0.5 * wd * ||W||^2 per layer; one
  bootstrap resample per member; Adam 1e-3, batch 32, 5 epochs after every trial, continuing
  from the previous weights and Adam state; the normalizer refit on all data each time.
* Trajectory sampling, P = 20 particles per candidate: TS-inf, TS1, or expectation (the mean
  prediction, one particle); a candidate's value is its particles' mean summed reward; a
  non-finite return counts as -1e6 (the reference's NaN -> cost 1e6).
* CEM: 5 iterations, alpha 0.1, population/elites 400/40 or 500/50, a normal truncated at 2 std
  kept inside the action bounds, early stop when the largest variance < 1e-3, initial variance
  (ub - lb)^2 / 16, warm start shifted by one step; random shooting evaluates the same budget.
* Other optimizers (`--optimizer`): iCEM (Pinneri et al. 2020, as their code: colored noise,
  shrinking population, kept and shifted elites, the best sequence executed) and MPPI (as PDDM and
  mbrl-lib: smoothed noise, exp-weighted mean), defaults from their code and mbrl-lib's configs;
  `sequences_per_step` is each one's budget, to compare them at equal cost.
* MPC replans every step; one random trial first, then one planned trial per iteration; planning
  horizon 25 (30 on halfcheetah).

Choices where the paper is silent (the measurements behind them: benchmarks/README.md, "PETS"):
* Rewards and terminations are `envs`' `reward_fn` / `termination_fn` on predicted observations
  (`--learn-reward` learns the reward); a particle stops earning after its terminal step.
* Members are assigned in balanced groups (P / B particles per member and candidate, permuted per
  planning call for TS-inf, per step for TS1), as the reference does: P must be a multiple of B.
* Every shape is the full buffer's (num_trials x episode_length), the data size a traced value:
  nothing recompiles as data grows; a partial last minibatch is masked.
* One network for every task (4 x 200, the paper's halfcheetah model and decays).
* The paper's cartpole has two stand-ins, `pendulum` (never terminates, as cartpole) and Brax's
  inverted_pendulum (terminates, so its first trials hold 20-60 transitions: its preset sets a
  floor on SGD steps per fit, `--model-min-sgd-steps`, ours).
* A trial ends at termination or `episode_length`; `env_steps` counts the step budget
  ((trial + 1) x episode_length, what resume counts), `charts/env_steps_taken` the real steps.
* The normalizer gives std 1 to inputs whose spread is below `min_input_std` (1e-2; the
  reference: 1e-12): Brax reacher's near-constant inputs otherwise blew every particle up.
* `model/trial_mse`: the ensemble mean's one-step MSE on the trial's own transitions, before the
  model is fit on them (its error on the states its plans visit).
"""

import dataclasses
import json
import sys
from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from algorithms import utils

if __name__ == "__main__":  # join a multi-process run before `import envs` starts JAX's backend
    utils.join_processes(sys.argv[1:])

import envs  # noqa: E402

PROPAGATIONS = ("ts-inf", "ts1", "expectation")
OPTIMIZERS = ("cem", "icem", "mppi", "random")
NONFINITE_RETURN = -1e6  # the reference replaces NaN costs by 1e6


# ---------------------------------------------------------------------------------------------
# Arguments. `None` means "the preset of --env-id" (PRESETS below, from the paper's configuration).
@dataclasses.dataclass
class Args(utils.Run):
    # experiment
    env_id: str = "inverted_pendulum"
    """task: inverted_pendulum, pendulum, reacher, pusher, halfcheetah (presets), or any envs.CONTINUOUS"""
    seed: int = 0
    """seed of the first run; vmapped seed i uses seed + i"""
    num_seeds: int = 1
    """independent seeds trained at once in one vmapped program"""
    num_trials: int | None = None
    """trials (episodes) including the first random-action one (preset: 15 (inverted_)pendulum, 100 reacher/pusher, 300 halfcheetah)"""
    episode_length: int | None = None
    """task horizon: env steps per trial unless it terminates (preset: 200 (inverted_)pendulum, 50 reacher, 150 pusher, 1000 halfcheetah)"""
    backend: str = envs.DEFAULT_BACKEND
    """physics: gymnasium (Gymnasium's v4 task on MJX, the papers' task) or Brax's positional / generalized / spring / mjx (other tasks); recorded with the run; unused by pendulum"""
    evaluate: str | None = None
    """only run one planning episode per seed with the model saved in this run directory and print the returns"""
    render: str | None = None
    """only write one planning episode of this run's first seed into its directory: episode.html (Brax's viewer)"""

    # model
    ensemble_size: int = 5
    """B, members of the probabilistic ensemble"""
    model_width: int = 200
    """hidden units per layer"""
    model_depth: int = 4
    """hidden layers"""
    model_weight_decay: tuple[float, ...] = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    """L2 coefficient per layer (hidden layers then output), 0.5 * wd * ||W||^2"""
    model_lr: float = 1e-3
    """Adam learning rate of the model"""
    model_batch_size: int = 32
    """minibatch size per member"""
    model_epochs: int = 5
    """epochs over all data after every trial (continuing from the previous weights)"""
    min_input_std: float = 1e-2
    """inputs whose std over the data is below this are not scaled (std 1); see the docstring's input normalizer"""
    learn_reward: bool = False
    """learn the reward as an extra model output and plan with it instead of the env's reward_fn"""
    preprocess: bool = True
    """the task's model input/target transforms (PREPROCESS, the reference's); False: raw obs in, next - obs out"""
    model_min_sgd_steps: int | None = None
    """floor on SGD steps per fit, in whole epochs (ours; 0: --model-epochs only; preset: 0, inverted_pendulum 500)"""

    # planning
    propagation: str = "ts-inf"
    """particle propagation: ts-inf (member fixed per particle), ts1 (resampled every step), expectation (mean, no sampling)"""
    num_particles: int = 20
    """P, particles per candidate action sequence (a multiple of --ensemble-size for ts-inf/ts1)"""
    optimizer: str = "cem"
    """action-sequence optimizer: cem (PETS'), icem (Pinneri et al. 2020), mppi (PDDM's / mbrl-lib's), random (shooting)"""
    horizon: int | None = None
    """planning horizon H in steps (preset: 25; 30 halfcheetah)"""
    population: int | None = None
    """candidate sequences per CEM iteration (preset: 400; 500 pusher/halfcheetah)"""
    num_elites: int | None = None
    """CEM elites (preset: 40; 50 pusher/halfcheetah)"""
    cem_iterations: int = 5
    """iterations per planning step of cem, icem and mppi (random shooting: batches of --population, the same budget)"""
    cem_alpha: float = 0.1
    """CEM and iCEM smoothing: new = alpha * old + (1 - alpha) * elite statistics"""
    cem_epsilon: float = 1e-3
    """CEM stops early once its largest variance is below this"""
    icem_decay: float = 1.25
    """iCEM: the population shrinks by this factor per iteration, to at least 2 x --num-elites (the paper's 1.25)"""
    icem_noise_beta: float | None = None
    """iCEM: colored-noise exponent, power ~ 1/f^beta along the horizon (preset 0.25 halfcheetah, the paper's; 2 else, mbrl-lib's)"""
    icem_keep_fraction: float = 0.3
    """iCEM: share of the elites kept into the next iteration and shifted into the next step (the paper's 0.3)"""
    mppi_gamma: float = 0.9
    """MPPI: weights exp(gamma * (value - max value)) (mbrl-lib's halfcheetah config)"""
    mppi_sigma: float = 1.0
    """MPPI: std of the action noise, a normal truncated at 2 std (mbrl-lib's)"""
    mppi_beta: float = 0.9
    """MPPI: smoothing, u_t = beta (mean_t + noise_t) + (1 - beta) u_(t-1) (mbrl-lib's)"""


PRESETS = {  # PETS' reference configuration per task (see the module docstring for the stand-ins)
    # inverted_pendulum: a floor of 500 SGD steps per fit (ours, see the docstring).
    "inverted_pendulum": dict(num_trials=15, episode_length=200, horizon=25, population=400, num_elites=40,
                              model_min_sgd_steps=500),
    "pendulum": dict(num_trials=15, episode_length=200, horizon=25, population=400, num_elites=40),
    "reacher": dict(num_trials=100, episode_length=50, horizon=25, population=400, num_elites=40),
    "pusher": dict(num_trials=100, episode_length=150, horizon=25, population=500, num_elites=50),
    "halfcheetah": dict(num_trials=300, episode_length=1000, horizon=30, population=500, num_elites=50,
                        icem_noise_beta=0.25),
}
DEFAULTS = dict(num_trials=100, horizon=25, population=400, num_elites=40, model_min_sgd_steps=0, icem_noise_beta=2.0)  # + envs' episode length

# The model's input and target per task (the reference's obs_preproc / targ_proc / obs_postproc),
# indices into envs' observation: `angles` enter the model as (sin, cos), `dropped` do not enter
# it, `absolute` are predicted as their next value (the rest as next - obs). Tasks not listed: raw.
PREPROCESS = {
    "halfcheetah": dict(angles=(1,), dropped=(17,), absolute=(17,)),  # root angle; x-velocity feature
}


def transforms(spec, obs_size):
    """(preprocess(obs) -> model input, target(obs, next_obs) -> model target, postprocess(obs,
    prediction) -> next_obs) of a PREPROCESS entry ({}: raw), batched over leading dims."""
    angles = np.array(spec.get("angles", ()), int)
    kept = np.array([i for i in range(obs_size) if i not in (*spec.get("angles", ()), *spec.get("dropped", ()))], int)
    absolute = np.isin(np.arange(obs_size), spec.get("absolute", ()))

    def preprocess(obs):
        return jnp.concatenate([obs[..., kept], jnp.sin(obs[..., angles]), jnp.cos(obs[..., angles])], -1)

    def target(obs, next_obs):
        return jnp.where(absolute, next_obs, next_obs - obs)

    def postprocess(obs, prediction):
        return jnp.where(absolute, prediction, obs + prediction)

    return preprocess, target, postprocess


def resolve(args: Args) -> Args:
    """Fill `None` fields from the env's preset and check every argument (one-line errors)."""
    check = utils.check
    check(args.env_id in envs.NAMES, f"unknown env {args.env_id!r}; valid: {', '.join(envs.NAMES)}")
    check(args.env_id in envs.CONTINUOUS, f"PETS needs a continuous-action task ({', '.join(envs.CONTINUOUS)}), "
                                          f"not {args.env_id}")
    preset = {**DEFAULTS, "episode_length": envs.brax_tasks.EPISODE_LENGTH.get(args.env_id),
              **PRESETS.get(args.env_id, {})}
    filled = {k: (preset[k] if v is None and k in preset else v) for k, v in dataclasses.asdict(args).items()}
    args = Args(**filled)
    check(args.propagation in PROPAGATIONS, f"unknown --propagation {args.propagation!r}; valid: {', '.join(PROPAGATIONS)}")
    check(args.optimizer in OPTIMIZERS, f"unknown --optimizer {args.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    check(args.backend in envs.BACKENDS, f"unknown backend {args.backend!r}; valid: {', '.join(envs.BACKENDS)}")
    for name in ["num_seeds", "num_trials", "episode_length", "ensemble_size", "model_width", "model_depth",
                 "model_batch_size", "model_epochs", "num_particles", "horizon", "population", "num_elites",
                 "cem_iterations"]:
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check(args.num_elites <= args.population, f"--num-elites {args.num_elites} > --population {args.population}")
    if args.propagation in ("ts-inf", "ts1"):
        check(args.num_particles % args.ensemble_size == 0,
              f"--num-particles {args.num_particles} must be a multiple of --ensemble-size {args.ensemble_size} "
              f"for --propagation {args.propagation} (each member propagates P / B particles)")
    check(0.0 <= args.cem_alpha < 1.0, f"--cem-alpha must be in [0, 1), got {args.cem_alpha}")
    if args.optimizer == "icem":
        check(2 * args.num_elites <= args.population,
              f"--optimizer icem needs --population >= 2 x --num-elites, got {args.population} and {args.num_elites}")
    check(args.icem_decay >= 1.0, f"--icem-decay must be >= 1, got {args.icem_decay}")
    check(args.icem_noise_beta >= 0.0, f"--icem-noise-beta must be >= 0, got {args.icem_noise_beta}")
    check(0.0 <= args.icem_keep_fraction <= 1.0, f"--icem-keep-fraction must be in [0, 1], got {args.icem_keep_fraction}")
    check(args.mppi_gamma > 0.0, f"--mppi-gamma must be positive, got {args.mppi_gamma}")
    check(args.mppi_sigma > 0.0, f"--mppi-sigma must be positive, got {args.mppi_sigma}")
    check(0.0 < args.mppi_beta <= 1.0, f"--mppi-beta must be in (0, 1], got {args.mppi_beta}")
    check(0.0 <= args.cem_epsilon < 0.25,  # 0.25 = CEM's initial variance (ub - lb)^2 / 16 for [-1, 1] actions
          f"--cem-epsilon must be in [0, 0.25) (below CEM's initial variance), got {args.cem_epsilon}")
    check(args.model_lr > 0.0, f"--model-lr must be positive, got {args.model_lr}")
    check(args.min_input_std >= 0.0, f"--min-input-std must be >= 0, got {args.min_input_std}")
    check(args.model_min_sgd_steps >= 0, f"--model-min-sgd-steps must be >= 0, got {args.model_min_sgd_steps}")
    check(len(args.model_weight_decay) == args.model_depth + 1,
          f"--model-weight-decay needs {args.model_depth + 1} values (hidden layers + output)")
    return args


def make_env(args):
    """The task with the run's time limit (and physics backend)."""
    backend = {"backend": args.backend} if args.env_id in envs.MUJOCO_TASKS else {}
    return envs.make(args.env_id, max_steps_in_episode=args.episode_length, **backend)


# ---------------------------------------------------------------------------------------------
# Network
class Ensemble(eqx.Module):
    """B Gaussian MLPs in stacked weights (einsum over the member axis), with input normalizer."""

    weights: list  # (B, in, out) per layer
    biases: list  # (B, out)
    max_logvar: jax.Array  # (out,), shared by the members as in the reference
    min_logvar: jax.Array
    input_mean: jax.Array  # normalizer, refit on all data at every fit (not trained)
    input_std: jax.Array

    def __init__(self, key, num_members, in_size, out_size, width, depth):
        sizes = [in_size] + [width] * depth + [2 * out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        # Truncated normal with std 1 / (2 sqrt(fan_in)), as the reference's FC layers.
        self.weights = [
            jax.random.truncated_normal(k, -2.0, 2.0, (num_members, n_in, n_out)) / (2.0 * np.sqrt(n_in))
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])
        ]
        self.biases = [jnp.zeros((num_members, n_out)) for n_out in sizes[1:]]
        self.max_logvar = jnp.full((out_size,), 0.5, jnp.float32)  # strong dtype: no retrace after a fit
        self.min_logvar = jnp.full((out_size,), -10.0, jnp.float32)
        self.input_mean, self.input_std = jnp.zeros(in_size), jnp.ones(in_size)

    def __call__(self, inputs):
        """inputs (B, N, in) -> mean, logvar (B, N, out): member b predicts for inputs[b]."""
        x = (inputs - jax.lax.stop_gradient(self.input_mean)) / jax.lax.stop_gradient(self.input_std)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = jnp.einsum("bni,bio->bno", x, w) + b[:, None]
            if i < len(self.weights) - 1:
                x = jax.nn.swish(x)
        mean, raw_logvar = jnp.split(x, 2, axis=-1)
        # Soft bounds (PETS' reference model): smooth clamp of the log-variance into [min_logvar,
        # max_logvar], so that it cannot collapse or explode away from the data.
        logvar = self.max_logvar - jax.nn.softplus(self.max_logvar - raw_logvar)
        logvar = self.min_logvar + jax.nn.softplus(logvar - self.min_logvar)
        return mean, logvar


# ---------------------------------------------------------------------------------------------
# Buffer: preallocated for the whole run (num_trials x episode_length), traced size. PETS keeps
# every transition ("train on all data"), so it is never overwritten.
class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array  # the true next observation
    terminated: jax.Array


class Buffer(NamedTuple):
    data: Transition  # preallocated rows
    size: jax.Array

    @staticmethod
    def empty(capacity, obs_size, action_size):
        f = partial(jnp.zeros, dtype=jnp.float32)
        return Buffer(Transition(f((capacity, obs_size)), f((capacity, action_size)), f(capacity),
                                 f((capacity, obs_size)), jnp.zeros(capacity, bool)), jnp.int32(0))

    def add(self, transition: Transition):
        data = jax.tree.map(lambda rows, row: rows.at[self.size].set(row, mode="drop"), self.data, Transition(*transition))
        return Buffer(data, self.size + 1)


class RunnerState(NamedTuple):
    buffer: Buffer
    model: Ensemble
    model_opt: optax.OptState
    key: jax.Array


# ---------------------------------------------------------------------------------------------
# Planning pieces that do not depend on the arguments (tested on their own).
def particle_members(key, propagation, horizon, num_candidates, num_particles, ensemble_size):
    """Member index of every particle at every planning step, (H, N, P) int32.

    Balanced: each candidate's P particles are split P / B per member (a random permutation of
    [0..B-1] repeated), which lets `model_step` run each member on one block of inputs.
    TS-inf draws one permutation per candidate for the whole horizon (a particle keeps its
    bootstrap); TS1 draws a fresh one at every step. Expectation uses no members (zeros)."""
    if propagation == "expectation":
        return jnp.zeros((horizon, num_candidates, num_particles), jnp.int32)
    base = jnp.arange(num_particles, dtype=jnp.int32) % ensemble_size
    steps = 1 if propagation == "ts-inf" else horizon
    perm = jnp.argsort(jax.random.uniform(key, (steps, num_candidates, num_particles)), axis=-1)
    members = base[perm]
    return jnp.broadcast_to(members, (horizon, num_candidates, num_particles))


def trajectory_values(step_fn, state, action_seqs, key, num_particles):
    """Value of each candidate: the mean over its particles of the summed rewards over the horizon.

    `step_fn(states, actions, t, key) -> (next_states, rewards, terminated)` on (N, P)-batched
    states (a learned model or, in tests, the real env). `state` is one state, broadcast to all
    particles. A particle earns no reward after the step that terminates it."""
    n, horizon, _ = action_seqs.shape
    states = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, num_particles, *jnp.shape(x))), state)

    def step(carry, inputs):
        states, alive, total = carry
        action, t, step_key = inputs
        actions = jnp.broadcast_to(action[:, None], (n, num_particles, action.shape[-1]))
        states, reward, terminated = step_fn(states, actions, t, step_key)
        total = total + jnp.where(alive, reward, 0.0)
        return (states, alive & ~terminated, total), None

    init = (states, jnp.ones((n, num_particles), bool), jnp.zeros((n, num_particles)))
    xs = (jnp.swapaxes(action_seqs, 0, 1), jnp.arange(horizon), jax.random.split(key, horizon))
    (_, _, total), _ = jax.lax.scan(step, init, xs)
    # PETS replaces NaN costs by a large cost: a blown-up particle makes its candidate unattractive.
    total = jnp.where(jnp.isfinite(total), total, NONFINITE_RETURN)
    return jnp.mean(total, axis=1)


def cem(value_fn, init_mean, key, *, population, num_elites, iterations, alpha, epsilon, lower, upper):
    """Cross-entropy method over action sequences (H, A), PETS-style (see the module docstring).
    `value_fn(seqs (N, H, A), key) -> (N,)` is maximized. Returns (final mean, stats)."""
    init_var = jnp.broadcast_to(jnp.square(upper - lower) / 16.0, init_mean.shape)

    def body(carry):
        i, mean, var, best, _, key = carry
        key, sample_key, value_key = jax.random.split(key, 3)
        # Constrain the variance so that the 2-std truncation stays inside the bounds.
        constrained = jnp.minimum(jnp.minimum(jnp.square((mean - lower) / 2), jnp.square((upper - mean) / 2)), var)
        noise = jax.random.truncated_normal(sample_key, -2.0, 2.0, (population, *mean.shape))
        samples = jnp.clip(mean + jnp.sqrt(constrained) * noise, lower, upper)
        values = value_fn(samples, value_key)
        elite_values, elite_index = jax.lax.top_k(values, num_elites)
        elites = samples[elite_index]
        mean = alpha * mean + (1 - alpha) * jnp.mean(elites, 0)
        var = alpha * var + (1 - alpha) * jnp.var(elites, 0)
        return i + 1, mean, var, jnp.maximum(best, elite_values[0]), jnp.mean(values), key

    def keep_going(carry):
        i, _, var = carry[:3]
        return (i < iterations) & (jnp.max(var) > epsilon)

    init = (jnp.int32(0), init_mean, init_var, jnp.float32(-jnp.inf), jnp.float32(jnp.nan), key)
    i, mean, var, best, mean_value, _ = jax.lax.while_loop(keep_going, body, init)
    stats = {"plan/best_value": best, "plan/mean_value": mean_value, "plan/iterations": i,
             "plan/final_std": jnp.mean(jnp.sqrt(var))}
    return mean, stats


def random_shooting(value_fn, shape, key, *, population, iterations, lower, upper):
    """`iterations` batches of `population` uniform sequences; returns (best sequence, stats)."""

    def batch(carry, key):
        best_seq, best = carry
        sample_key, value_key = jax.random.split(key)
        samples = jax.random.uniform(sample_key, (population, *shape), minval=lower, maxval=upper)
        values = value_fn(samples, value_key)
        i = jnp.argmax(values)
        better = values[i] > best
        return (jnp.where(better, samples[i], best_seq), jnp.where(better, values[i], best)), jnp.mean(values)

    init = (jnp.zeros(shape), jnp.float32(-jnp.inf))
    (best_seq, best), mean_values = jax.lax.scan(batch, init, jax.random.split(key, iterations))
    stats = {"plan/best_value": best, "plan/mean_value": mean_values[-1], "plan/iterations": jnp.int32(iterations),
             "plan/final_std": jnp.mean((upper - lower) / np.sqrt(12.0))}  # std of the uniform it samples
    return best_seq, stats


def colored_noise(key, beta, shape):
    """Gaussian noise of unit variance whose power spectrum along axis -2 (the horizon) falls as
    1 / f^beta (Timmer & Koenig 1995, the generator iCEM uses): beta 0 is white noise, larger beta
    gives smoother action sequences. Frequencies below 1 / H get the power of 1 / H."""
    *batch, horizon, action_size = shape
    if horizon == 1:
        return jax.random.normal(key, shape)
    freqs = jnp.fft.rfftfreq(horizon)
    scale = jnp.maximum(freqs, 1.0 / horizon) ** (-beta / 2.0)
    # The output's std, to normalise it: the Nyquist term counts once when H is even.
    weights = scale[1:].at[-1].multiply((1 + horizon % 2) / 2.0)
    sigma = 2.0 * jnp.sqrt(jnp.sum(weights**2)) / horizon
    real_key, imag_key = jax.random.split(key)
    real = jax.random.normal(real_key, (*batch, action_size, freqs.size)) * scale
    imag = jax.random.normal(imag_key, (*batch, action_size, freqs.size)) * scale
    imag = imag.at[..., 0].set(0.0)  # the mean (f = 0) is real, and so is the Nyquist term
    if horizon % 2 == 0:
        imag = imag.at[..., -1].set(0.0)
    noise = jnp.fft.irfft(real + 1j * imag, n=horizon, axis=-1) / sigma
    return jnp.swapaxes(noise, -1, -2)


def icem_sizes(population, num_elites, iterations, decay):
    """iCEM's population per iteration: divided by `decay` each time, at least 2 x elites (as the paper's code)."""
    sizes = [population]
    for _ in range(iterations - 1):
        sizes.append(max(2 * num_elites, int(sizes[-1] / decay)))
    return sizes


def icem(value_fn, plan_state, key, *, population, num_elites, iterations, alpha, decay, beta, lower, upper):
    """iCEM (Pinneri et al. 2020, "Sample-efficient cross-entropy method for real-time planning"),
    as their code: colored-noise samples clipped to the bounds (no truncation), a population
    that shrinks every iteration, the best elites kept into the next iteration (with their values,
    not re-evaluated), the last step's kept elites shifted by one step (a fresh last action) into
    the first iteration, the mean as a sample in the last iteration, and the best sequence seen
    executed, not the mean (theirs: the last iteration's best, the same whenever an elite is kept). `plan_state` = (mean (H, A), kept elites (K, H, A), whether they are
    from a previous step). Returns (best sequence, stats, next plan_state)."""
    mean, shifted, shifted_ok = plan_state
    std = jnp.broadcast_to((upper - lower) / 4.0, mean.shape)  # as CEM's initial variance (ub - lb)^2 / 16
    keep = shifted.shape[0]
    kept = kept_values = None
    best_seq, best = mean, jnp.float32(-jnp.inf)
    for i, size in enumerate(icem_sizes(population, num_elites, iterations, decay)):  # shapes differ: unrolled
        key, noise_key, end_key, value_key = jax.random.split(key, 4)
        samples = jnp.clip(mean + std * colored_noise(noise_key, beta, (size, *mean.shape)), lower, upper)
        if i == iterations - 1:
            samples = samples.at[0].set(mean)
        if i == 0:  # last step's elites, one step later, with a last action drawn from the new distribution
            end = jnp.clip(mean[-1] + std[-1] * jax.random.normal(end_key, (keep, mean.shape[-1])), lower, upper)
            samples = jnp.concatenate([samples, jnp.concatenate([shifted[:, 1:], end[:, None]], 1)])
            values = value_fn(samples, value_key)
            values = values.at[size:].set(jnp.where(shifted_ok, values[size:], -jnp.inf))
        else:
            values = jnp.concatenate([value_fn(samples, value_key), kept_values])
            samples = jnp.concatenate([samples, kept])
        elite_values, elite_index = jax.lax.top_k(values, num_elites)
        elites = samples[elite_index]
        mean = alpha * mean + (1 - alpha) * jnp.mean(elites, 0)
        std = alpha * std + (1 - alpha) * jnp.std(elites, 0)
        kept, kept_values = elites[:keep], elite_values[:keep]
        better = elite_values[0] > best
        best_seq, best = jnp.where(better, elites[0], best_seq), jnp.maximum(best, elite_values[0])
    stats = {"plan/best_value": best, "plan/mean_value": jnp.mean(values), "plan/iterations": jnp.int32(iterations),
             "plan/final_std": jnp.mean(std)}
    next_mean = jnp.concatenate([mean[1:], mean[-1:]])  # shifted; the last step repeated, as their code
    return best_seq, stats, (next_mean, kept, jnp.bool_(True))


def mppi(value_fn, plan_state, key, *, population, iterations, gamma, sigma, beta, lower, upper):
    """MPPI as PDDM (Nagabandi et al. 2019) and mbrl-lib's MPPIOptimizer: `iterations` refinements,
    each sampling sequences u_t = beta (mean_t + noise_t) + (1 - beta) u_(t-1), u_(-1) the last
    executed action, noise ~ sigma x a normal truncated at 2 std, clipped to the bounds; the new
    mean is their average weighted by exp(gamma (value - max value)). `plan_state` = (mean (H, A),
    last action (A,)). Returns (mean, stats, next plan_state): the mean's first action is executed."""
    mean, last_action = plan_state

    def refine(carry, key):
        mean, best = carry
        noise_key, value_key = jax.random.split(key)
        noisy = mean + sigma * jax.random.truncated_normal(noise_key, -2.0, 2.0, (population, *mean.shape))

        def smooth(previous, noisy_t):
            u = beta * noisy_t + (1 - beta) * previous
            return u, u

        _, samples = jax.lax.scan(smooth, jnp.broadcast_to(last_action, (population, mean.shape[-1])),
                                  jnp.swapaxes(noisy, 0, 1))
        samples = jnp.clip(jnp.swapaxes(samples, 0, 1), lower, upper)
        # A mean over blown-up particles can overflow to -inf (every one: max - max = NaN): the
        # lowest finite value instead, so such sequences get no weight unless all are such.
        values = value_fn(samples, value_key)
        values = jnp.nan_to_num(values, nan=NONFINITE_RETURN, posinf=NONFINITE_RETURN, neginf=jnp.finfo(values.dtype).min)
        weights = jnp.exp(gamma * (values - jnp.max(values)))
        mean = jnp.einsum("n,nha->ha", weights, samples) / (jnp.sum(weights) + 1e-10)
        return (mean, jnp.maximum(best, jnp.max(values))), (jnp.mean(values), jnp.mean(jnp.std(samples, 0)))

    (mean, best), (mean_values, stds) = jax.lax.scan(refine, (mean, jnp.float32(-jnp.inf)), jax.random.split(key, iterations))
    stats = {"plan/best_value": best, "plan/mean_value": mean_values[-1], "plan/iterations": jnp.int32(iterations),
             "plan/final_std": stds[-1]}
    return mean, stats, (jnp.concatenate([mean[1:], mean[-1:]]), mean[0])


# ---------------------------------------------------------------------------------------------
# What the phases derive from the arguments and the task
def action_bounds(env, env_params):
    """(lower, upper, middle), each (A,) float32: the planner's box and its warm-start default."""
    space = env.action_space(env_params)
    lower = jnp.broadcast_to(jnp.asarray(space.low, jnp.float32), (env.action_size,))
    upper = jnp.broadcast_to(jnp.asarray(space.high, jnp.float32), (env.action_size,))
    return lower, upper, (lower + upper) / 2


def task_transforms(args, obs_size):
    """The model's (preprocess, target, postprocess) for this task (`--no-preprocess`: raw)."""
    return transforms(PREPROCESS.get(args.env_id, {}) if args.preprocess else {}, obs_size)


def init_plan(args, env, env_params):
    """What the planner carries from one step to the next, at an episode's start: the warm start
    (H, A) at the middle of the action box; iCEM adds its kept elites (none valid yet), MPPI the
    last action."""
    middle = action_bounds(env, env_params)[2]
    mean = jnp.broadcast_to(middle, (args.horizon, env.action_size))
    if args.optimizer == "icem":
        keep = int(args.icem_keep_fraction * args.num_elites)  # rounded down, as their code
        return mean, jnp.broadcast_to(mean, (keep, *mean.shape)), jnp.bool_(False)
    if args.optimizer == "mppi":
        return mean, middle
    return mean


def sequences_per_step(args):
    """Action sequences a planning step evaluates at most (each through `particles(args)` particles
    for the horizon): the budget to compare optimizers at."""
    if args.optimizer == "icem":
        return (sum(icem_sizes(args.population, args.num_elites, args.cem_iterations, args.icem_decay))
                + int(args.icem_keep_fraction * args.num_elites))
    return args.population * args.cem_iterations


def particles(args):
    """Particles per candidate. Expectation propagation is deterministic: all particles would be
    equal, so it uses one (as the reference)."""
    return 1 if args.propagation == "expectation" else args.num_particles


def model_optimizer(args):
    return optax.adam(args.model_lr)


# ---------------------------------------------------------------------------------------------
# INIT
def init(args, env, env_params, key):
    """A fresh run: an empty buffer for every trial's steps and a fresh ensemble."""
    key, model_key = jax.random.split(key)
    preprocess = task_transforms(args, env.obs_size)[0]
    model_in = preprocess(jnp.zeros(env.obs_size)).shape[-1] + env.action_size
    model_out = env.obs_size + int(args.learn_reward)  # (next_obs - obs, or the task's target[, reward])
    model = Ensemble(model_key, args.ensemble_size, model_in, model_out, args.model_width, args.model_depth)
    return RunnerState(buffer=Buffer.empty(args.num_trials * args.episode_length, env.obs_size, env.action_size),
                       model=model, model_opt=model_optimizer(args).init(eqx.filter(model, eqx.is_array)), key=key)


# ---------------------------------------------------------------------------------------------
# COLLECT
def episode(args, env, env_params, runner, random_actions, key):
    """One trial in the real env until termination or the time limit: random actions, or MPC
    with the runner's model. Adds every transition (with the true next observation) to the
    buffer; `random_actions` must be unbatched (a real branch under vmap)."""
    lower, upper, _ = action_bounds(env, env_params)
    preprocess, _, postprocess = task_transforms(args, env.obs_size)
    reset_key, key = jax.random.split(key)
    obs, env_state = env.reset(reset_key, env_params)
    plan_mean = init_plan(args, env, env_params)

    def act(obs, plan_mean, key):
        def mpc_branch():
            return plan(args, env, env_params, partial(model_value, args, env, runner.model, obs), plan_mean, key)

        no_plan = utils.nan_like(jax.eval_shape(mpc_branch)[2])

        def random_branch():
            return jax.random.uniform(key, (env.action_size,), minval=lower, maxval=upper), plan_mean, no_plan

        return jax.lax.cond(random_actions, random_branch, mpc_branch)

    def step(carry):
        t, env_state, obs, plan_mean, buffer, total, sq_err, sums, _, key = carry
        key, act_key, step_key = jax.random.split(key, 3)
        action, plan_mean, stats = act(obs, plan_mean, act_key)
        next_obs, env_state, reward, terminated, truncated, info = env.step(step_key, env_state, action, env_params)
        # The model learns from the true next observation, never the post-reset one.
        true_next = info["final_observation"]
        buffer = buffer.add(Transition(obs, action, reward, true_next, terminated))
        inputs = jnp.concatenate([preprocess(obs), action])
        predicted, _ = runner.model(jnp.broadcast_to(inputs, (args.ensemble_size, 1, inputs.shape[-1])))
        sq_err = sq_err + jnp.mean((postprocess(obs, jnp.mean(predicted[:, 0, :env.obs_size], 0)) - true_next) ** 2)
        sums = jax.tree.map(jnp.add, sums, stats)
        return t + 1, env_state, next_obs, plan_mean, buffer, total + reward, sq_err, sums, terminated | truncated, key

    stat_sums = jax.tree.map(lambda x: jnp.zeros((), x.dtype), jax.eval_shape(act, obs, plan_mean, key)[2])
    init = (jnp.int32(0), env_state, obs, plan_mean, runner.buffer, jnp.float32(0), jnp.float32(0), stat_sums,
            jnp.bool_(False), key)
    t, _, _, _, buffer, total, sq_err, sums, _, _ = jax.lax.while_loop(
        lambda c: ~c[-2] & (c[0] < args.episode_length), step, init)
    metrics = {"charts/trial_return": total, "charts/trial_length": t, "model/trial_mse": sq_err / t,
               **{k: v / t for k, v in sums.items()}}
    return buffer, metrics


# ---------------------------------------------------------------------------------------------
# FIT MODEL
def model_io(args, buffer):
    """Inputs (preprocessed obs, action) and targets (the task's target of next_obs[, reward]) of
    every row: the layout `model_step` decodes."""
    data = buffer.data
    preprocess, model_target, _ = task_transforms(args, data.obs.shape[-1])
    inputs = jnp.concatenate([preprocess(data.obs), data.action], -1)
    targets = model_target(data.obs, data.next_obs)
    if args.learn_reward:
        targets = jnp.concatenate([targets, data.reward[:, None]], -1)
    return inputs, targets


def model_loss(args, model, inputs, targets, mask):
    """Gaussian NLL per member (mean over valid rows and dims) + log-var bound term + weight decay."""
    mean, logvar = model(inputs)
    per_row = jnp.mean((mean - targets) ** 2 * jnp.exp(-logvar) + logvar, -1)
    nll = jnp.sum(per_row * mask, -1) / jnp.sum(mask)
    mse = jnp.sum(jnp.mean((mean - targets) ** 2, -1) * mask, -1) / jnp.sum(mask)
    bounds = 0.01 * (jnp.sum(model.max_logvar) - jnp.sum(model.min_logvar))
    decay = sum(0.5 * wd * jnp.sum(w**2) for wd, w in zip(args.model_weight_decay, model.weights))
    return jnp.sum(nll) + bounds + decay, (nll, mse)


def model_sgd_step(args, model, opt_state, inputs, targets, mask):
    """One Adam step of every member on its own minibatch (inputs[b], targets[b]); rows where
    `mask` is False (the padding of an epoch's last minibatch) do not count."""
    (_, (nll, mse)), grads = eqx.filter_value_and_grad(partial(model_loss, args), has_aux=True)(
        model, inputs, targets, mask)
    updates, opt_state = model_optimizer(args).update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, nll, mse


def fit_model(args, model, opt_state, buffer, key):
    """`model_epochs` epochs (or more, up to `model_min_sgd_steps` SGD steps) over all n stored
    transitions, each member on its own bootstrap resample (n draws with replacement,
    reshuffled every epoch). Shapes are those of the full buffer; the number of minibatches,
    ceil(n / batch) per epoch, and of epochs are traced."""
    capacity, members, bs = buffer.data.obs.shape[0], args.ensemble_size, args.model_batch_size
    padded = -(-capacity // bs) * bs  # bootstrap index rows, a whole number of minibatches
    n = buffer.size
    valid = (jnp.arange(capacity) < n).astype(jnp.float32)[:, None]
    inputs, targets = model_io(args, buffer)
    mean = jnp.sum(inputs * valid, 0) / n
    std = jnp.sqrt(jnp.sum((inputs - mean) ** 2 * valid, 0) / n)
    # Near-constant inputs are not scaled (std 1): dividing by a tiny spread turns the model's
    # own sampling noise into inputs hundreds of std out of the data (see the docstring).
    std = jnp.where(std < args.min_input_std, 1.0, std)
    model = eqx.tree_at(lambda m: (m.input_mean, m.input_std), model, (mean, std))

    boot_key, key = jax.random.split(key)
    boot = jax.random.randint(boot_key, (members, padded), 0, n)  # member b's resample: boot[b, :n]
    steps_per_epoch = (n + bs - 1) // bs
    num_epochs = jnp.maximum(args.model_epochs, -(-args.model_min_sgd_steps // steps_per_epoch))

    def epoch(_, carry):
        model, opt_state, key, _ = carry
        key, perm_key = jax.random.split(key)
        # Shuffle each member's first n entries (the padding sorts last).
        rank = jnp.where(jnp.arange(padded) < n, jax.random.uniform(perm_key, (members, padded)), 2.0)
        order = jnp.take_along_axis(boot, jnp.argsort(rank, -1), -1)

        def sgd_step(j, carry):
            model, opt_state, sums = carry
            index = jax.lax.dynamic_slice_in_dim(order, j * bs, bs, axis=1)  # (B, bs)
            mask = (j * bs + jnp.arange(bs) < n).astype(jnp.float32)
            model, opt_state, nll, mse = model_sgd_step(args, model, opt_state, inputs[index], targets[index], mask)
            return model, opt_state, (sums[0] + jnp.mean(nll), sums[1] + jnp.mean(mse))

        model, opt_state, (nll, mse) = jax.lax.fori_loop(
            0, steps_per_epoch, sgd_step, (model, opt_state, (jnp.float32(0), jnp.float32(0))))
        return model, opt_state, key, (nll / steps_per_epoch, mse / steps_per_epoch)

    init = (model, opt_state, key, (jnp.float32(jnp.nan), jnp.float32(jnp.nan)))
    model, opt_state, _, (nll, mse) = jax.lax.fori_loop(0, num_epochs, epoch, init)
    metrics = {"model/train_nll": nll, "model/train_mse": mse, "model/sgd_steps": num_epochs * steps_per_epoch}
    return model, opt_state, metrics


# ---------------------------------------------------------------------------------------------
# PLAN
def model_step(args, model, obs, action, members, key):
    """One model step of (N, P) particles: next_obs (N, P, obs) (the model's output through the
    task's postprocess) and predicted reward (N, P) (zeros unless --learn-reward). TS: particle
    (n, p) is propagated by member members[n, p], sampling the Gaussian; expectation: the mean
    over members of their mean predictions."""
    obs_size, B = obs.shape[-1], args.ensemble_size
    preprocess, _, postprocess = task_transforms(args, obs_size)
    n, p = members.shape
    inputs = jnp.concatenate([preprocess(obs), action], -1)
    if args.propagation == "expectation":
        flat = inputs.reshape(1, n * p, -1)
        mean, _ = model(jnp.broadcast_to(flat, (B, *flat.shape[1:])))
        out = jnp.mean(mean, 0).reshape(n, p, -1)
    else:
        # Group each candidate's particles by member (P / B each, see particle_members) so that
        # every member runs once on its block: (N, P, in) -> (B, N * P / B, in).
        k = p // B
        order = jnp.argsort(members, axis=-1, stable=True)
        grouped = jnp.take_along_axis(inputs, order[..., None], 1)
        grouped = grouped.reshape(n, B, k, -1).transpose(1, 0, 2, 3).reshape(B, n * k, -1)
        mean, logvar = model(grouped)
        sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        sample = sample.reshape(B, n, k, -1).transpose(1, 0, 2, 3).reshape(n, p, -1)
        out = jnp.take_along_axis(sample, jnp.argsort(order, axis=-1)[..., None], 1)  # undo the grouping
    reward = out[..., obs_size] if args.learn_reward else jnp.zeros((n, p))
    return postprocess(obs, out[..., :obs_size]), reward


def model_value(args, env, model, obs, action_seqs, key):
    """Values (N,) of candidate action sequences (N, H, A) from `obs` by trajectory sampling."""
    member_key, key = jax.random.split(key)
    n, horizon, _ = action_seqs.shape
    members = particle_members(member_key, args.propagation, horizon, n, particles(args), args.ensemble_size)

    def step(obs, action, t, key):
        next_obs, model_reward = model_step(args, model, obs, action, members[t], key)
        reward = model_reward if args.learn_reward else env.reward_fn(obs, action, next_obs)
        return next_obs, reward, env.termination_fn(obs, action, next_obs)

    return trajectory_values(step, obs, action_seqs, key, particles(args))


def plan(args, env, env_params, value_fn, plan_mean, key):
    """MPC: optimize the action sequence (warm-started from `plan_mean`, what `init_plan` gives
    and `plan` returns), return its first action and the next warm start (CEM, random shooting:
    shifted one step, the new last step at the middle; iCEM and MPPI: their own)."""
    lower, upper, middle = action_bounds(env, env_params)
    if args.optimizer == "icem":
        solution, stats, next_plan = icem(value_fn, plan_mean, key, population=args.population,
                                          num_elites=args.num_elites, iterations=args.cem_iterations,
                                          alpha=args.cem_alpha, decay=args.icem_decay, beta=args.icem_noise_beta,
                                          lower=lower, upper=upper)
        return solution[0], next_plan, stats
    if args.optimizer == "mppi":
        solution, stats, next_plan = mppi(value_fn, plan_mean, key, population=args.population,
                                          iterations=args.cem_iterations, gamma=args.mppi_gamma,
                                          sigma=args.mppi_sigma, beta=args.mppi_beta, lower=lower, upper=upper)
        return solution[0], next_plan, stats
    if args.optimizer == "cem":
        solution, stats = cem(value_fn, plan_mean, key, population=args.population, num_elites=args.num_elites,
                              iterations=args.cem_iterations, alpha=args.cem_alpha, epsilon=args.cem_epsilon,
                              lower=lower, upper=upper)
    else:
        solution, stats = random_shooting(value_fn, plan_mean.shape, key, population=args.population,
                                          iterations=args.cem_iterations, lower=lower, upper=upper)
    next_plan = jnp.concatenate([solution[1:], middle[None]])
    return solution[0], next_plan, stats


# ---------------------------------------------------------------------------------------------
# One trial
def chunk(args, env, env_params, runner, trial):
    """Trial `trial`: COLLECT (random actions for trial 0, PETS' initial rollout; MPC after),
    then FIT MODEL on all data, continuing from the current weights. `trial` is shared by all
    seeds (unbatched), so the random/planned switch is a real branch even under `vmap`."""
    key, episode_key, fit_key = jax.random.split(runner.key, 3)
    buffer, episode_metrics = episode(args, env, env_params, runner, trial == 0, episode_key)
    model, model_opt, fit_metrics = fit_model(args, runner.model, runner.model_opt, buffer, fit_key)
    runner = RunnerState(buffer=buffer, model=model, model_opt=model_opt, key=key)
    metrics = {"trial": trial, "env_steps": (trial + 1) * args.episode_length,
               "charts/env_steps_taken": buffer.size, **episode_metrics, **fit_metrics}
    return runner, metrics


def evaluate(args, env, env_params, runner, key):
    """Return of one planning episode with the runner's model (the data it collects is dropped)."""
    return episode(args, env, env_params, runner, jnp.bool_(False), key)[1]["charts/trial_return"]


# ---------------------------------------------------------------------------------------------
class Trainer(NamedTuple):
    init: callable  # init(key) -> RunnerState
    chunk: callable  # chunk(state, trial) -> (state, metrics): one trial
    evaluate: callable  # evaluate(state, key) -> the return of one planning episode
    train: callable  # train(key) -> (state, metrics of every trial): the whole run, jax.vmap-able
    num_chunks: int


def make_train(args: Args) -> Trainer:
    """The phases above bound to `args` and its env."""
    env, env_params = make_env(args)

    def train(key):
        return jax.lax.scan(partial(chunk, args, env, env_params), init(args, env, env_params, key),
                            jnp.arange(args.num_trials))

    return Trainer(partial(init, args, env, env_params), partial(chunk, args, env, env_params),
                   partial(evaluate, args, env, env_params), train, args.num_trials)


# ---------------------------------------------------------------------------------------------
def seed_keys(args):
    return jnp.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])


def run(args: Args):
    """Train: the host loop of utils over compiled trials (log, check, checkpoint, resume)."""
    args, run_dir = utils.open_run(args, Args, "pets", resolve)
    trainer = make_train(args)
    mesh = utils.seed_mesh(args)  # seeds split over the devices: each trains its own
    state = utils.over_devices(jax.vmap(trainer.init), mesh, donate=False)(utils.on_devices(seed_keys(args), mesh))
    chunk = utils.over_devices(jax.vmap(trainer.chunk, in_axes=(0, None)), mesh, replicated=1)

    def check(metrics, trials):
        # Trial 0 has random actions: no planning statistics (NaN by design); all else must be finite.
        utils.assert_finite({k: v for k, v in metrics.items() if trials > 1 or not k.startswith("plan/")},
                            f"trial {trials - 1} (env steps taken {metrics['charts/env_steps_taken'].tolist()})")

    state, metrics, _ = utils.train_loop(run_dir, args, state, chunk, args.num_trials, unit="trial",
                                         check_metrics=check, show="charts/trial_return")
    run_dir.write_summary({"env_id": args.env_id, "backend": args.backend, "trials": args.num_trials,
                           "env_steps": args.num_trials * args.episode_length,
                           "env_steps_taken_per_seed": [int(x) for x in metrics["charts/env_steps_taken"]],
                           "final_trial_return_mean": float(np.mean(metrics["charts/trial_return"])),
                           "final_trial_return_per_seed": [float(x) for x in metrics["charts/trial_return"]]})
    return run_dir, metrics


def evaluate_saved(path):
    args, trainer, state, steps = utils.load_saved(path, Args, make_train, seed_keys)
    keys = jax.vmap(jax.random.fold_in, (0, None))(seed_keys(args), 12345)
    returns = jax.jit(jax.vmap(trainer.evaluate))(state, keys)
    print(json.dumps({"run_dir": path, "env_steps": steps, "eval_return_per_seed": [float(r) for r in returns]}))
    return returns


def render_saved(path):
    """--render: one MPC episode with the first seed's saved model, written into the run dir."""
    args, trainer, state, _ = utils.load_saved(path, Args, make_train, seed_keys)
    model = utils.first_seed(state.model)
    env, env_params = make_env(args)

    def policy(obs, plan_mean, key):  # the planner's warm start is the carried state
        action, plan_mean, _ = plan(args, env, env_params, partial(model_value, args, env, model, obs), plan_mean, key)
        return action, plan_mean

    file, total = envs.render_episode(env, policy, init_plan(args, env, env_params), jax.random.PRNGKey(args.seed), path)
    print(json.dumps({"render": str(file), "episode_return": total}))


def main():
    args = utils.cli(Args)
    with utils.reported_failures():
        if args.render:
            render_saved(args.render)
        elif args.evaluate:
            evaluate_saved(args.evaluate)
        else:
            run(args)


if __name__ == "__main__":
    main()
