"""DAM: Discriminator Augmented Model-Based RL (Haghgoo, Zhou, Sharma, Finn 2021), in one file:
a learned dynamics model q(s'|s, a), a discriminator D(s, a, s') whose logit estimates
log p/q, discriminator-corrected value estimates (Eq. 4, 8) in a random-shooting MPC planner
(Algorithm 1, 3), and the minimum-variance model objective (Eq. 10). The whole MBRL loop of
Algorithm 3 (rollout -> fit model -> fit discriminator, J rounds) is compiled by XLA and vmapped
over seeds.

    python algorithms/dam.py --env-id IcyRoad --method dam --model mdn --seed 0
    python algorithms/dam.py --env-id Intersection --method baseline --model gaussian --num-seeds 10
    python algorithms/dam.py --env-id Intersection --method baseline --model true   # the planner's ceiling
    python algorithms/dam.py --evaluate runs/<run-name>      # planner episodes with the saved model

Methods (Table 1): `baseline` = maximum-likelihood model, uncorrected values; `minvar` =
minimum-variance model only; `disc` = discriminator-corrected planning only; `dam` = both.
Models: `gaussian` (unimodal, diagonal; the MDN with K = 1) or `mdn` (mixture density network);
`true` plans with the env's own dynamics (nothing learned): the same planner's ceiling.

Fixed by the paper:
* ESTIMATEVALUE (Alg. 1, Eq. 4): rollouts through q; the reward of step t is multiplied by the
  product of the importance weights w = exp(logit) (Eq. 8) of the transitions up to and including
  t (a reward may depend on s'). Alg. 1's sigmoid(logit): `--weight sigmoid`.
* The discriminator: Alg. 2's classification loss, real (s, a, s') -> 1, (s, a, s' ~ q) at the
  same real (s, a) -> 0, so its logit estimates log p/q (Eq. 7).
* RSPLANNER (Alg. 3): K uniformly random sequences of the 3 discrete actions over horizon H, the
  best one's first action executed, replanning every step; J = 10 rounds of (roll out the
  planner, add the episode, retrain model and discriminator from fresh parameters).

Choices where the paper is silent (measured in benchmarks/README.md, "DAM"):
* Data starts from `init_episodes` random episodes (a model cannot be fitted to nothing); each
  round then goes as Alg. 3: plan, add, refit, so the final model saw every episode. The final
  model is evaluated on `eval_episodes` planner episodes per seed, not added to the data
  (Intersection: half with each turn; summary.json has the mean, per turn, and the crash share).
* A sequence's value is the mean over `num_particles` rollouts (Alg. 1 draws one); with
  `--common-noise` particle j of every sequence uses the same draws. A particle stops earning
  after a terminal transition (none on the default tasks); rewards past the episode's end are
  masked; returns are undiscounted.
* Eq. 10 needs R >= 0: returns are shifted by the lowest stored return (`--minvar-shift data`;
  `worst`: by the lowest possible one, T r_min), and the weights divided by their mean (Eq. 16).
* The running log-weight is capped at `max_log_weight`; products are kept in log space.
* Models predict the normalized s' - s from the normalized state and a one-hot action, scales
  `min_std` + softplus; a dimension whose std is below `min_input_std` is not scaled. The
  discriminator sees (normalized s, one-hot a, normalized s' - s).
* The discriminator holds out `disc_holdout` of the episodes at every fit and keeps the parameters
  with the lowest held-out loss (early stopping, as Grover et al. 2019); metrics.csv reports its
  held-out E_p[exp(-logit)] and E_q[exp(logit)] (both 1 when calibrated).
* Usable weights, as Grover et al. 2019 keep theirs, all off by default (Eq. 4 as written):
  `--self-normalize` (w / sum_p w over the particles), `--weight-power` alpha (w^alpha),
  `--weight-floor` beta (max(w, beta)).
* `--model true` samples p(s'|s, a) from an observation through `env.state_from_obs` (hidden
  variables drawn given it) and one `step_env`.
* Network sizes, learning rates, step counts, K, H and particles are ours (the paper gives none);
  the planner's are the cheapest that reach near the optimum with the true dynamics.
"""

import dataclasses
import json
import sys
from functools import partial
from typing import NamedTuple

import distrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from algorithms import utils

if __name__ == "__main__":  # join a multi-process run before `import envs` starts JAX's backend
    utils.join_processes(sys.argv[1:])

import envs  # noqa: E402

METHODS = ("baseline", "minvar", "disc", "dam")
MODELS = ("gaussian", "mdn", "true")
ENV_IDS = ("IcyRoad", "Intersection")
# Lowest possible per-step reward (paper Eq. 20, 21 with speeds >= 0): the shift of R(tau) >= 0.
MIN_REWARD = {"IcyRoad": -6.0, "Intersection": -10.0}
NUM_ACTIONS = 3


# ---------------------------------------------------------------------------------------------
# Arguments. `None` means "the preset of --env-id" (PRESETS below).
@dataclasses.dataclass
class Args(utils.Run):
    # experiment
    env_id: str = "IcyRoad"
    """IcyRoad or Intersection"""
    method: str = "dam"
    """baseline (MLE model, plain values), minvar (Eq. 10 model), disc (Eq. 4 corrected values), dam (both)"""
    model: str = "mdn"
    """gaussian (unimodal), mdn (mixture density network), or true: plan with the env's own dynamics (nothing is learned; the planner's ceiling; --method baseline)"""
    seed: int = 0
    """seed of the first run; vmapped seed i uses seed + i"""
    num_seeds: int = 1
    """independent seeds trained at once in one vmapped program"""
    evaluate: str | None = None
    """only run `eval_episodes` planner episodes with the model saved in this run directory"""
    render: str | None = None
    """only draw one planner episode of this run's first seed into its directory: episode.png"""
    eval_episodes: int = 20
    """planner episodes per seed evaluating the final model (and of --evaluate), apart from data collection; Intersection: half with each turn"""

    # MBRL loop (Algorithm 3)
    rounds: int = 10
    """J: rounds of (planner rollout, add trajectory, refit model and discriminator)"""
    init_episodes: int = 10
    """random-policy episodes in the initial dataset"""
    episodes_per_round: int = 1
    """planner episodes collected per round (Alg. 3: one trajectory)"""

    # planner (RSPLANNER + ESTIMATEVALUE)
    num_sequences: int | None = None
    """K: action sequences sampled per planning step (preset 500 IcyRoad, 1000 Intersection)"""
    horizon: int | None = None
    """H: planning horizon (preset 5 IcyRoad, 25 Intersection: the whole episode)"""
    num_particles: int | None = None
    """model rollouts averaged per sequence (preset 20 IcyRoad, 8 Intersection)"""
    common_noise: bool = True
    """common random numbers: particle j of every candidate sequence uses the same random draws, so candidates are compared on the same futures"""
    weight: str = "exp"
    """importance weight from the logit: exp (Eq. 8, default) or sigmoid (as written in Alg. 1)"""
    max_log_weight: float = 10.0
    """cap on the running log importance weight (overflow guard)"""
    self_normalize: bool = False
    """self-normalised importance weights: step h's reward is averaged over particles with weights w_{1..h} / sum_p w_{1..h}, so a discriminator whose ratios are off by a constant factor (E_q[exp(logit)] != 1) changes nothing"""
    weight_power: float = 1.0
    """flattening (Grover et al. 2019): the weight w_{1..h} raised to this power, in [0, 1] (1: Eq. 4; 0: no correction; their code tried 0.25, 0.5, 0.75)"""
    weight_floor: float = 0.0
    """clipping (Grover et al. 2019): the weight w_{1..h} is at least this (0: none; their code tried 0.001, 0.01, 0.1, 1)"""

    minvar_shift: str = "data"
    """Eq. 10 needs R >= 0. data: R' = R - min of the stored returns, the smallest shift that makes every return non-negative (the worst stored episode weighs 0); worst: R' = R - T r_min, the lowest possible return (r_min: IcyRoad -6, Intersection -10), which on Intersection adds ~250 and flattens the weights"""

    # dynamics model
    model_width: int = 128
    model_depth: int = 2
    mixture_components: int = 3
    """K of the MDN (IcyRoad has 3 outcomes at speed: stay, swerve +y, swerve -y)"""
    min_std: float = 0.01
    """lower bound of the predicted standard deviations (normalized units)"""
    min_input_std: float = 0.01
    """state (and state-change) dimensions whose std over the data is below this are not scaled (std 1)"""
    model_lr: float = 1e-3
    model_batch_size: int = 256
    model_train_steps: int = 2000
    """Adam steps per fit (from fresh parameters every round, Alg. 2)"""

    # discriminator
    disc_width: int = 128
    disc_depth: int = 2
    disc_lr: float = 1e-3
    disc_batch_size: int = 256
    disc_train_steps: int = 1000
    """Adam steps per fit (from fresh parameters every round, Alg. 2)"""
    disc_holdout: float = 0.2
    """share of the stored episodes (at least one) held out of each discriminator fit: the fit keeps the parameters with the lowest held-out loss (early stopping) and reports its held-out calibration (disc/holdout_*); 0: every episode trained on, the last parameters kept (the paper gives no details)"""
    disc_eval_every: int = 50
    """Adam steps between held-out evaluations (a divisor of --disc-train-steps)"""
    disc_holdout_batch: int = 1024
    """held-out transitions per evaluation, drawn once per fit from the held-out episodes, each with one model sample"""


PRESETS = {
    "IcyRoad": dict(num_sequences=500, horizon=5, num_particles=20),
    "Intersection": dict(num_sequences=1000, horizon=25, num_particles=8),
}


def resolve(args: Args) -> Args:
    """Fill `None` fields from the env's preset and check every argument (one-line errors)."""
    check = utils.check
    check(args.env_id in ENV_IDS, f"unknown env {args.env_id!r} for DAM; valid: {', '.join(ENV_IDS)}")
    check(args.method in METHODS, f"unknown --method {args.method!r}; valid: {', '.join(METHODS)}")
    check(args.model in MODELS, f"unknown --model {args.model!r}; valid: {', '.join(MODELS)}")
    check(args.weight in ("exp", "sigmoid"), f"unknown --weight {args.weight!r}; valid: exp, sigmoid")
    args = Args(**{k: (PRESETS[args.env_id].get(k) if v is None else v) for k, v in dataclasses.asdict(args).items()})
    for name in ["num_seeds", "eval_episodes", "rounds", "init_episodes", "episodes_per_round", "num_sequences",
                 "horizon", "num_particles", "model_width", "model_depth", "mixture_components", "model_batch_size",
                 "model_train_steps", "disc_width", "disc_depth", "disc_batch_size", "disc_train_steps"]:
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["min_std", "model_lr", "disc_lr", "max_log_weight"]:
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check(args.model != "mdn" or args.mixture_components >= 2,
          "--mixture-components must be >= 2 for --model mdn (1 component is --model gaussian)")
    check(args.model != "true" or args.method == "baseline",
          "--model true plans with the env's own dynamics (nothing to correct): use --method baseline")
    check(args.min_input_std >= 0, f"--min-input-std must be >= 0, got {args.min_input_std}")
    check(0 <= args.weight_power <= 1, f"--weight-power must be in [0, 1], got {args.weight_power}")
    check(args.weight_floor >= 0, f"--weight-floor must be >= 0, got {args.weight_floor}")
    check(args.minvar_shift in ("data", "worst"), f"--minvar-shift must be data or worst, got {args.minvar_shift}")
    check(0 <= args.disc_holdout < 1, f"--disc-holdout must be in [0, 1), got {args.disc_holdout}")
    check(args.disc_eval_every > 0 and args.disc_train_steps % args.disc_eval_every == 0,
          f"--disc-eval-every must be a positive divisor of --disc-train-steps {args.disc_train_steps}, got {args.disc_eval_every}")
    check(args.disc_holdout_batch > 0, f"--disc-holdout-batch must be positive, got {args.disc_holdout_batch}")
    check(args.disc_holdout == 0 or args.method not in ("disc", "dam") or args.init_episodes >= 2,
          "--disc-holdout needs --init-episodes >= 2 (one to train the first discriminator on, one to hold out)")
    return args


# ---------------------------------------------------------------------------------------------
# Networks
class MLP(eqx.Module):
    """ReLU MLP on any leading dims (x @ W + b); uniform(+-1/sqrt(fan_in)) init like torch."""

    weights: list
    biases: list

    def __init__(self, key, in_size, out_size, width, depth):
        sizes = [in_size] + [width] * depth + [out_size]
        keys = jax.random.split(key, 2 * (len(sizes) - 1))
        bounds = [1.0 / np.sqrt(n) for n in sizes[:-1]]
        self.weights = [jax.random.uniform(k, (i, o), minval=-s, maxval=s)
                        for k, i, o, s in zip(keys[::2], sizes[:-1], sizes[1:], bounds)]
        self.biases = [jax.random.uniform(k, (o,), minval=-s, maxval=s) for k, o, s in zip(keys[1::2], sizes[1:], bounds)]

    def __call__(self, x):
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            x = jax.nn.relu(x @ w + b)
        return x @ self.weights[-1] + self.biases[-1]


class Normalizer(NamedTuple):
    """Per-dimension statistics of the dataset's states and state changes (refit every round)."""

    obs_mean: jax.Array
    obs_std: jax.Array
    delta_mean: jax.Array
    delta_std: jax.Array


class Dataset(NamedTuple):
    """Whole episodes in preallocated arrays (episodes, T, ...): returns per trajectory are sums."""

    obs: jax.Array  # (E, T, d)
    action: jax.Array  # (E, T) int32
    reward: jax.Array  # (E, T)
    next_obs: jax.Array  # (E, T, d)
    size: jax.Array  # episodes stored

    def add(self, episodes):
        """Append a batch of episodes (obs, action, reward, next_obs), each (n, T, ...)."""
        n = episodes[0].shape[0]
        new = [jax.lax.dynamic_update_slice_in_dim(x, y, self.size, axis=0) for x, y in zip(self[:4], episodes)]
        return Dataset(*new, self.size + n)

    def sample(self, key, n, among=None):
        """n transitions uniformly from the stored episodes, or from the episodes order[lo:hi] when
        `among` = (order, lo, hi): (obs, action, next_obs, episode index)."""
        episode_key, step_key = jax.random.split(key)
        if among is None:
            e = jax.random.randint(episode_key, (n,), 0, self.size)
        else:
            order, lo, hi = among
            e = order[jax.random.randint(episode_key, (n,), lo, hi)]
        t = jax.random.randint(step_key, (n,), 0, self.obs.shape[1])
        return self.obs[e, t], self.action[e, t], self.next_obs[e, t], e


class RunnerState(NamedTuple):
    data: Dataset
    model: MLP  # outputs the mixture parameters of q(s' - s | s, a)
    disc: MLP  # outputs the logit of D(s, a, s')
    norm: Normalizer
    key: jax.Array


# ---------------------------------------------------------------------------------------------
# The phases, in data order: COLLECT (Alg. 3's rollouts), FIT (normalizer, model, discriminator),
# PLAN (Alg. 1's value estimate, Alg. 3's random shooting), then one round and the evaluation.
def make_env(args: Args):
    return envs.make(args.env_id)


def obs_size_of(env, env_params):
    return env.observation_space(env_params).shape[0]


# --- COLLECT (Alg. 3, ROLLOUT) ----------------------------------------------------------------
def run_episode(env, env_params, policy, key, turn_left=None):
    """One fixed-horizon episode; `policy(obs, t, key) -> (action, info)`: exactly T steps of
    `step_env`, no auto-reset (where a reading of Intersection ends the episode at a crash, the
    frozen cars earn 0 after it, so the return is the terminated episode's). `turn_left` fixes
    Intersection's hidden turn."""
    reset_key, key = jax.random.split(key)
    obs, env_state = env.reset(reset_key, env_params)
    if turn_left is not None and hasattr(env_state, "turn_left"):
        env_state = env_state.replace(turn_left=turn_left)

    def step(carry, t):
        obs, env_state, key = carry
        key, action_key, step_key = jax.random.split(key, 3)
        action, info = policy(obs, t, action_key)
        next_obs, env_state, reward, _, _ = env.step_env(step_key, env_state, action, env_params)
        return (next_obs, env_state, key), (obs, action, reward, next_obs, info)

    _, (obs, action, reward, next_obs, info) = jax.lax.scan(step, (obs, env_state, key),
                                                            jnp.arange(env_params.max_steps_in_episode))
    return (obs, action.astype(jnp.int32), reward, next_obs), info


def random_policy(obs, t, key):
    return jax.random.randint(key, (), 0, NUM_ACTIONS), {}


# --- dynamics model q(s'|s, a) ------------------------------------------------------------
def num_components(args):
    return 1 if args.model == "gaussian" else args.mixture_components


def predictive(args, model, norm, obs, action):
    """The mixture q(z | s, a) over the normalized change z = (s' - s - mean) / std."""
    k, obs_size = num_components(args), obs.shape[-1]
    x = jnp.concatenate([(obs - norm.obs_mean) / norm.obs_std, jax.nn.one_hot(action, NUM_ACTIONS)], -1)
    out = model(x)
    lead = out.shape[:-1]
    logits = out[..., :k]
    loc = out[..., k: k * (1 + obs_size)].reshape(*lead, k, obs_size)
    raw_scale = out[..., k * (1 + obs_size):].reshape(*lead, k, obs_size)
    return distrax.MixtureSameFamily(
        mixture_distribution=distrax.Categorical(logits=logits),
        components_distribution=distrax.MultivariateNormalDiag(loc, args.min_std + jax.nn.softplus(raw_scale)),
    )


def sample_model(args, model, norm, obs, action, key):
    """s' ~ q(.|s, a) for a batch of (s, a)."""
    z = predictive(args, model, norm, obs, action).sample(seed=key)
    return obs + norm.delta_mean + norm.delta_std * z


def new_model(args, key, obs_size):
    """An MLP that outputs the mixture's parameters: logits, means, raw scales."""
    return MLP(key, obs_size + NUM_ACTIONS, num_components(args) * (1 + 2 * obs_size), args.model_width,
               args.model_depth)


def new_discriminator(args, key, obs_size):
    return MLP(key, 2 * obs_size + NUM_ACTIONS, 1, args.disc_width, args.disc_depth)


def fit_normalizer(args, data):
    mask = (jnp.arange(data.obs.shape[0]) < data.size)[:, None, None].astype(jnp.float32)
    count = data.size * data.obs.shape[1]

    def stats(x):
        mean = jnp.sum(x * mask, (0, 1)) / count
        std = jnp.sqrt(jnp.sum((x - mean) ** 2 * mask, (0, 1)) / count)
        return mean, jnp.where(std < args.min_input_std, 1.0, std)  # (near-)constant: unscaled

    return Normalizer(*stats(data.obs), *stats(data.next_obs - data.obs))


# --- FIT MODEL (Alg. 2, TRAINMODEL; Eq. 10) ---------------------------------------------------
def trajectory_weights(args, data):
    """Per-episode weight of the log-likelihood: R'(tau) / mean R' with R' = R - shift >= 0
    (minimum-variance objective, Eq. 10; `minvar_shift`), or 1 (maximum likelihood). Equal
    returns (R' all 0) weigh 1 each: Eq. 9's q* is then p itself."""
    slots = data.obs.shape[0]
    if args.method not in ("minvar", "dam"):
        return jnp.ones(slots)
    returns, stored = jnp.sum(data.reward, 1), jnp.arange(slots) < data.size
    if args.minvar_shift == "data":
        shift = jnp.min(jnp.where(stored, returns, jnp.inf))
    else:
        shift = data.obs.shape[1] * MIN_REWARD[args.env_id]
    shifted = jnp.where(stored, returns - shift, 0.0)
    mean = jnp.sum(shifted) / data.size
    return jnp.where(stored, jnp.where(mean > 0, shifted / jnp.maximum(mean, 1e-8), 1.0), 0.0)


def model_loss(args, model, norm, obs, action, next_obs, weight):
    """-mean_i weight_i log q(s'_i | s_i, a_i) (Eq. 10 with the episode weights; MLE if 1)."""
    z = (next_obs - obs - norm.delta_mean) / norm.delta_std
    return -jnp.mean(weight * predictive(args, model, norm, obs, action).log_prob(z))


def fit_model(args, data, norm, key):
    init_key, key = jax.random.split(key)
    model = new_model(args, init_key, data.obs.shape[-1])
    weights = trajectory_weights(args, data)
    optimizer = optax.adam(args.model_lr)

    def sgd_step(carry, key):
        model, opt_state = carry
        obs, action, next_obs, episode = data.sample(key, args.model_batch_size)
        loss, grads = jax.value_and_grad(partial(model_loss, args))(model, norm, obs, action, next_obs, weights[episode])
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(model, updates), opt_state), loss

    (model, _), losses = jax.lax.scan(sgd_step, (model, optimizer.init(model)),
                                      jax.random.split(key, args.model_train_steps))
    return model, {"model/loss": jnp.mean(losses[-100:])}


# --- FIT DISCRIMINATOR (Alg. 2, TRAINDISCRIMINATOR) ----------------------------------------
def disc_logit(disc, norm, obs, action, next_obs):
    """Logit of D(s, a, s'), an estimate of log p(s'|s, a) / q(s'|s, a) (Eq. 7)."""
    delta = (next_obs - obs - norm.delta_mean) / norm.delta_std
    x = jnp.concatenate([(obs - norm.obs_mean) / norm.obs_std, jax.nn.one_hot(action, NUM_ACTIONS), delta], -1)
    return disc(x)[..., 0]


def holdout_split(args, data, key):
    """(order, count): the stored episodes in a random order (the empty slots after them), the
    first `count` held out of a discriminator fit: a `disc_holdout` share, at least one, and at
    least one left to train on."""
    capacity = data.obs.shape[0]
    order = jnp.argsort(jnp.where(jnp.arange(capacity) < data.size, jax.random.uniform(key, (capacity,)), 2.0))
    return order, jnp.clip(jnp.floor(args.disc_holdout * data.size).astype(jnp.int32), 1, data.size - 1)


def disc_scores(disc, norm, obs, action, real, fake):
    """Alg. 2's loss (-log D on real, -log(1 - D) on model samples), accuracy, and the two
    calibration checks: E_p[exp(-logit)] = E_p[q/p] and E_q[exp(logit)] = E_q[p/q], both 1 for a
    calibrated density ratio (a large one means the ratio is wrong where the other side has mass)."""
    real_logit, fake_logit = disc_logit(disc, norm, obs, action, real), disc_logit(disc, norm, obs, action, fake)
    loss = jnp.mean(jax.nn.softplus(-real_logit)) + jnp.mean(jax.nn.softplus(fake_logit))
    accuracy = 0.5 * (jnp.mean(real_logit > 0) + jnp.mean(fake_logit < 0))
    ratio_real, ratio_model = (jnp.mean(jnp.exp(jnp.minimum(x, 30.0))) for x in (-real_logit, fake_logit))
    return loss, (accuracy, ratio_real, ratio_model)


def fit_discriminator(args, data, norm, sample_fake, key):
    """Real (s, a, s') -> 1, (s, a, s'~sample_fake(s, a)) at the same real (s, a) -> 0. With
    `disc_holdout`, on the episodes not held out, keeping the parameters whose held-out loss is
    lowest (evaluated every `disc_eval_every` steps on one held-out batch)."""
    init_key, key = jax.random.split(key)
    disc = new_discriminator(args, init_key, data.obs.shape[-1])
    optimizer = optax.adam(args.disc_lr)
    held_out, train_on = None, None
    if args.disc_holdout > 0:
        key, split_key, batch_key, fake_key = jax.random.split(key, 4)
        order, count = holdout_split(args, data, split_key)
        held_out, train_on = (order, 0, count), (order, count, data.size)
        obs, action, real, _ = data.sample(batch_key, args.disc_holdout_batch, held_out)
        held_batch = (obs, action, real, sample_fake(obs, action, fake_key))

    def sgd_step(carry, key):
        disc, opt_state = carry
        batch_key, fake_key = jax.random.split(key)
        obs, action, real, _ = data.sample(batch_key, args.disc_batch_size, train_on)
        fake = jax.lax.stop_gradient(sample_fake(obs, action, fake_key))
        (loss, (accuracy, _, ratio)), grads = jax.value_and_grad(disc_scores, has_aux=True)(disc, norm, obs, action,
                                                                                          real, fake)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(disc, updates), opt_state), (loss, accuracy, ratio)

    keys = jax.random.split(key, args.disc_train_steps)
    if held_out is None:
        (disc, _), (losses, accuracies, ratios) = jax.lax.scan(sgd_step, (disc, optimizer.init(disc)), keys)
        held_metrics = {}
    else:
        def block(carry, keys):  # `disc_eval_every` steps, then the held-out loss: keep the best
            disc, opt_state, best, best_loss, best_step, step = carry
            (disc, opt_state), stats = jax.lax.scan(sgd_step, (disc, opt_state), keys)
            step = step + keys.shape[0]
            loss = disc_scores(disc, norm, *held_batch)[0]
            better = loss < best_loss
            best = jax.tree.map(lambda new, old: jnp.where(better, new, old), disc, best)
            return (disc, opt_state, best, jnp.where(better, loss, best_loss), jnp.where(better, step, best_step),
                    step), stats

        init = (disc, optimizer.init(disc), disc, jnp.float32(jnp.inf), jnp.int32(0), jnp.int32(0))
        blocks = keys.reshape(-1, args.disc_eval_every, *keys.shape[1:])
        (_, _, disc, _, best_step, _), stats = jax.lax.scan(block, init, blocks)
        losses, accuracies, ratios = (x.reshape(-1) for x in stats)
        loss, (accuracy, ratio_real, ratio_model) = disc_scores(disc, norm, *held_batch)
        held_metrics = {"disc/holdout_loss": loss, "disc/holdout_accuracy": accuracy,
                        "disc/holdout_ratio_real": ratio_real, "disc/holdout_ratio_model": ratio_model,
                        "disc/best_step": best_step}
    # In-sample (the last 100 training batches): optimistic; the held-out metrics are the check.
    return disc, {"disc/loss": jnp.mean(losses[-100:]), "disc/accuracy": jnp.mean(accuracies[-100:]),
                  "disc/ratio_on_model_samples": jnp.mean(ratios[-100:]), **held_metrics}


# --- PLAN (Alg. 1 ESTIMATEVALUE, Alg. 3 RSPLANNER) -------------------------------------------
def estimate_values(args, env, env_params, sample_next, step_log_weight, obs, t, sequences, key):
    """Eq. 4: mean over particles of sum_h w_{1..h} r_h along model rollouts of each sequence
    (N, H) from `obs` at episode step t; w multiplies the weights of every transition up to
    and including h, in log space, capped at `max_log_weight`. Steps past the episode's end,
    and after a particle's first terminal transition (a crash, where the env's reading ends
    the episode there), earn nothing.
    With `common_noise`, particle j of every sequence is sampled with the same key, so all
    candidates meet the same futures. Returns (values (N,), mean log-weight of the last step)."""
    n, p = sequences.shape[0], args.num_particles
    states = jnp.broadcast_to(obs, (n, p, obs.shape[-1]))
    actions = jnp.broadcast_to(sequences[:, None, :], (n, p, sequences.shape[1]))

    def step(carry, inputs):
        state, log_w, total, ended = carry
        h, action, key = inputs
        keys = jnp.broadcast_to(key, (n, *key.shape)) if args.common_noise else jax.random.split(key, n)
        next_state = jax.vmap(sample_next)(state, action, keys)  # one key per sequence: its p particles
        log_w = jnp.minimum(log_w + step_log_weight(state, action, next_state), args.max_log_weight)
        reward = env.reward_fn(state, action, next_state, env_params)
        weight = importance_weight(args, log_w)
        total = total + jnp.where((t + h < env_params.max_steps_in_episode) & ~ended, weight * reward, 0.0)
        ended = ended | env.termination_fn(state, action, next_state, env_params)
        return (next_state, log_w, total, ended), None

    horizon = sequences.shape[1]
    init = (states, jnp.zeros((n, p)), jnp.zeros((n, p)), jnp.zeros((n, p), bool))
    steps = (jnp.arange(horizon), jnp.moveaxis(actions, 2, 0), jax.random.split(key, horizon))
    (_, log_w, total, _), _ = jax.lax.scan(step, init, steps)
    return jnp.mean(total, 1), jnp.mean(log_w)


def importance_weight(args, log_w):
    """w_{1..h} from its log (N, P): the plain product (Eq. 4); flattened to the power
    `weight_power` and clipped from below at `weight_floor` (Grover et al. 2019); then, with
    `self_normalize`, normalised over the particles (times P, so that the mean over particles is
    their weighted sum)."""
    if args.weight_power != 1.0:
        log_w = args.weight_power * log_w
    if args.weight_floor > 0.0:
        log_w = jnp.maximum(log_w, jnp.log(args.weight_floor))
    return log_w.shape[1] * jax.nn.softmax(log_w, axis=1) if args.self_normalize else jnp.exp(log_w)


def sample_true(env, env_params, obs, action, key):
    """s' ~ p(.|s, a) of the env itself for a batch: a state with each observation (hidden
    variables drawn given it, `state_from_obs`), then one `step_env`."""
    def one(obs, action, key):
        state_key, step_key = jax.random.split(key)
        return env.step_env(step_key, env.state_from_obs(obs, state_key, env_params), action, env_params)[0]

    return jax.vmap(one)(obs, action, jax.random.split(key, obs.shape[0]))


def log_weight_fn(args, runner):
    """log w of one transition: logit (Eq. 8), log sigmoid(logit) (Alg. 1), or 0 (uncorrected)."""
    if args.method not in ("disc", "dam"):
        return lambda obs, action, next_obs: jnp.zeros(obs.shape[:-1])
    logit = lambda obs, action, next_obs: disc_logit(runner.disc, runner.norm, obs, action, next_obs)
    if args.weight == "sigmoid":
        return lambda *transition: jax.nn.log_sigmoid(logit(*transition))
    return logit


def plan(args, env, env_params, runner, obs, t, key):
    """RSPLANNER: the first action of the best of K uniformly random sequences."""
    sequence_key, value_key = jax.random.split(key)
    sequences = jax.random.randint(sequence_key, (args.num_sequences, args.horizon), 0, NUM_ACTIONS)
    if args.model == "true":
        sample_next = partial(sample_true, env, env_params)
    else:
        sample_next = partial(sample_model, args, runner.model, runner.norm)
    values, log_w = estimate_values(args, env, env_params, sample_next, log_weight_fn(args, runner), obs, t,
                                    sequences, value_key)
    best = jnp.argmax(values)
    return sequences[best, 0], {"plan/value": values[best], "plan/log_weight": log_w}


# --- init and one round ---------------------------------------------------------------------
def fit(args, runner, key):
    """Refit the normalizer, the model and (if the method uses it) the discriminator."""
    model_key, disc_key = jax.random.split(key)
    norm = fit_normalizer(args, runner.data)
    if args.model == "true":  # nothing is learned: the planner samples the env itself
        return runner._replace(norm=norm), {}
    model, metrics = fit_model(args, runner.data, norm, model_key)
    runner = runner._replace(model=model, norm=norm)
    if args.method in ("disc", "dam"):
        sample_fake = partial(sample_model, args, model, norm)
        disc, disc_metrics = fit_discriminator(args, runner.data, norm, sample_fake, disc_key)
        runner, metrics = runner._replace(disc=disc), {**metrics, **disc_metrics}
    return runner, metrics


def start(args, env, env_params, key):
    """The data's first `init_episodes` random-policy episodes and fresh networks; returns them with
    the key of their first fit."""
    key, data_key, model_key, disc_key, fit_key = jax.random.split(key, 5)
    obs_size, horizon_T = obs_size_of(env, env_params), env_params.max_steps_in_episode
    capacity = args.init_episodes + args.rounds * args.episodes_per_round
    empty = Dataset(jnp.zeros((capacity, horizon_T, obs_size)), jnp.zeros((capacity, horizon_T), jnp.int32),
                    jnp.zeros((capacity, horizon_T)), jnp.zeros((capacity, horizon_T, obs_size)), jnp.int32(0))
    episodes, _ = jax.vmap(partial(run_episode, env, env_params, random_policy))(
        jax.random.split(data_key, args.init_episodes))
    norm = Normalizer(jnp.zeros(obs_size), jnp.ones(obs_size), jnp.zeros(obs_size), jnp.ones(obs_size))
    runner = RunnerState(data=empty.add(episodes), norm=norm, key=key, model=new_model(args, model_key, obs_size),
                         disc=new_discriminator(args, disc_key, obs_size))
    return runner, fit_key


def init(args, env, env_params, key):
    """The first episodes and the model (+ discriminator) fitted on them: the model the first round
    plans with."""
    return fit(args, *start(args, env, env_params, key))[0]


def collect(args, env, env_params, runner, round_index):
    """Algorithm 3's rollout: the planner with the current model in the real env; the trajectories
    are added to the data. Returns the runner, the key of the refit that follows, and metrics."""
    key, rollout_key, fit_key = jax.random.split(runner.key, 3)
    policy = partial(plan, args, env, env_params, runner)
    episodes, info = jax.vmap(partial(run_episode, env, env_params, policy))(
        jax.random.split(rollout_key, args.episodes_per_round))
    returns = jnp.sum(episodes[2], 1)
    metrics = {
        "round": round_index + 1,
        "env_steps": (args.init_episodes + (round_index + 1) * args.episodes_per_round) * env_params.max_steps_in_episode,
        "charts/episode_return": jnp.mean(returns),
        "plan/value_first_step": jnp.mean(info["plan/value"][:, 0]),
        "plan/mean_log_weight": jnp.mean(info["plan/log_weight"]),
    }
    return runner._replace(key=key, data=runner.data.add(episodes)), fit_key, metrics


def round_(args, env, env_params, runner, round_index):
    """One round of Algorithm 3 in its order: roll out and add the trajectories, then refit the
    model (+ discriminator) on all data, so every state a round leaves (the final one is evaluated
    and saved) holds a model of all its data."""
    runner, fit_key, metrics = collect(args, env, env_params, runner, round_index)
    runner, fit_metrics = fit(args, runner, fit_key)
    return runner, {**metrics, **fit_metrics}  # the refit's metrics: on all data, this round's included


def train(args, env, env_params, key):
    """The whole run: init, then J rounds. Returns (final state, metrics stacked over rounds)."""
    return jax.lax.scan(partial(round_, args, env, env_params), init(args, env, env_params, key), jnp.arange(args.rounds))


def evaluate(args, env, env_params, runner, key, per_episode=False):
    """`eval_episodes` planner episodes with the state's model/discriminator, apart from data
    collection (nothing is added); on Intersection half with each turn (even: left).
    Returns the mean return and per-turn means and the share of crashed episodes."""
    policy = partial(plan, args, env, env_params, runner)
    left = jnp.arange(args.eval_episodes) % 2 == 0
    episodes, _ = jax.vmap(partial(run_episode, env, env_params, policy))(jax.random.split(key, args.eval_episodes), left)
    obs, action, reward, next_obs = episodes
    returns = jnp.sum(reward, 1)
    # Intersection's crash_fn: the cars in collision at s', whether or not its reading ends the episode
    crashed = jnp.any(getattr(env, "crash_fn", env.termination_fn)(obs, action, next_obs, env_params), 1)
    metrics = {"eval/return": jnp.mean(returns)}
    if args.env_id == "Intersection":
        metrics.update({
            "eval/return_left_turn": jnp.sum(jnp.where(left, returns, 0)) / jnp.sum(left),
            "eval/return_right_turn": jnp.sum(jnp.where(left, 0, returns)) / jnp.maximum(jnp.sum(~left), 1),
            "eval/crash_frac": jnp.mean(crashed)})
    if per_episode:  # for benchmarks: every episode's return (and crash)
        metrics.update({"eval/episode_returns": returns, "eval/episode_crashed": crashed})
    return jnp.mean(returns), metrics


class Trainer(NamedTuple):
    """The phases above bound to `args` and its env."""

    init: callable  # key -> RunnerState
    train: callable  # key -> (state, metrics of every round)
    evaluate: callable  # (state, key, per_episode=False) -> (mean return, metrics)
    start: callable  # key -> (RunnerState before its first fit, the fit's key): init = fit(*start(key))
    collect: callable  # (state, round_index) -> (state, fit key, metrics): a round (`round_`) = collect, then fit
    fit: callable  # (state, key) -> (state, metrics)
    env: object
    env_params: object


def make_train(args: Args) -> Trainer:
    env, env_params = make_env(args)
    return Trainer(*(partial(phase, args, env, env_params) for phase in (init, train, evaluate, start, collect)),
                   partial(fit, args), env, env_params)


# ---------------------------------------------------------------------------------------------
def seed_keys(args):
    return jnp.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])


def eval_keys(args):
    """Keys of the final evaluation: per seed, apart from every key training used."""
    return jax.vmap(jax.random.fold_in, (0, None))(seed_keys(args), 12345)


def run(args: Args):
    """Train: the host loop of utils over compiled rounds (log, check, checkpoint, resume)."""
    args, run_dir = utils.open_run(args, Args, f"dam-{args.method}-{args.model}", resolve)
    trainer = make_train(args)
    mesh = utils.seed_mesh(args)  # seeds split over the devices: each trains its own
    # Init and each round as two programs, collect and fit: the fit is then one compile, shared by
    # init and every round (a round's single program held a second copy of it: ~5 s of compile).
    # (Not donated: the key cannot be, and the state is small: the episodes and two small networks.)
    refit = utils.over_devices(jax.vmap(lambda runner_and_key: trainer.fit(*runner_and_key)), mesh, donate=False)
    collect = utils.over_devices(jax.vmap(trainer.collect, in_axes=(0, None)), mesh, replicated=1)
    started = utils.over_devices(jax.vmap(trainer.start), mesh, donate=False)(utils.on_devices(seed_keys(args), mesh))
    state = refit(started)[0]

    def one_round(state, round_index):
        state, fit_key, metrics = collect(state, round_index)
        state, fit_metrics = refit((state, fit_key))
        return state, {**metrics, **fit_metrics}

    state, metrics, _ = utils.train_loop(run_dir, args, state, one_round, args.rounds, unit="round",
                                         check_metrics=lambda m, rounds: utils.assert_finite(m, f"round {rounds}"),
                                         show="charts/episode_return")
    final = metrics.get("charts/episode_return", np.full(args.num_seeds, np.nan))
    # The final model, evaluated apart from data collection (`eval_episodes` per seed).
    _, evaluation = jax.jit(jax.vmap(trainer.evaluate))(utils.on_devices(state, mesh), eval_keys(args))
    evaluation = jax.tree.map(np.asarray, evaluation)
    utils.assert_finite(evaluation, "the final evaluation")
    run_dir.write_summary({"env_id": args.env_id, "method": args.method, "model": args.model, "rounds": args.rounds,
                           "final_return_mean": float(np.mean(final)), "final_return_per_seed": [float(x) for x in final],
                           "eval_episodes": args.eval_episodes,
                           **{f"{k}_per_seed": [float(x) for x in v] for k, v in evaluation.items()},
                           "eval/return_mean": float(np.mean(evaluation["eval/return"]))})
    return run_dir, metrics


def evaluate_saved(path, eval_episodes):
    args, trainer, state, steps = utils.load_saved(path, Args, make_train, seed_keys, eval_episodes=eval_episodes)
    returns, _ = jax.jit(jax.vmap(trainer.evaluate))(state, eval_keys(args))
    print(json.dumps({"run_dir": path, "env_steps": steps, "eval_return_per_seed": [float(r) for r in returns]}))
    return returns


def render_saved(path):
    """--render: one planner episode with the first seed's saved model (and discriminator): a PNG."""
    args, trainer, state, _ = utils.load_saved(path, Args, make_train, seed_keys)
    runner = utils.first_seed(state)
    policy = lambda obs, t, key: (plan(args, trainer.env, trainer.env_params, runner, obs, t, key)[0], t + 1)  # carry: t
    file, total = envs.render_episode(trainer.env, policy, jnp.int32(0), jax.random.PRNGKey(args.seed), path)
    print(json.dumps({"render": str(file), "episode_return": total}))


def main():
    args = utils.cli(Args)
    with utils.reported_failures():
        if args.render:
            render_saved(args.render)
        elif args.evaluate:
            evaluate_saved(args.evaluate, args.eval_episodes)
        else:
            run(args)


if __name__ == "__main__":
    main()
