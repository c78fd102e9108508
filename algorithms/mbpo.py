"""MBPO: Model-Based Policy Optimization (Janner, Fu, Zhang, Levine 2019, "When to trust your
model"), Algorithm 2, in one file, with the whole collect -> fit model -> model rollout -> SAC
update iteration compiled by XLA and vmapped over seeds.

    python algorithms/mbpo.py --seed 0                         # hopper, the paper's settings
    python algorithms/mbpo.py --env-id inverted_pendulum --num-seeds 4
    python algorithms/mbpo.py --resume runs/<run-name>         # continue a killed run
    python algorithms/mbpo.py --evaluate runs/<run-name>       # evaluate its saved policy

What the paper (Sec. 5, App. C) and its reference code (jannerm/mbpo) fix, and we follow:
* Model: bootstrapped ensemble of B = 7 probabilistic MLPs (4 x 200 swish) predicting a diagonal
  Gaussian over (next_obs - obs, reward) from normalized (obs, action); log-variance softly
  bounded by learned max/min bounds (+0.01 * their difference as regularizer); per-layer weight
  decay; Adam 1e-3, batch 256; 20% holdout (at most 5000); 5 elites.
* The bootstrap as in the reference's `bnn.py`: at every fit each member draws one resample of
  the training rows with replacement (~63% distinct rows), and every epoch is one pass over it
  in a new order. Early stopping as its `_save_best`: stop once *more than* 5 epochs passed
  without any member improving its holdout loss by > 1%; each member keeps its best weights.
* Every `model_train_freq` (250) env steps: fit the model, then branch `rollout_batch_size`
  (100k) rollouts of length k from real-buffer states with the current policy, a random elite
  per sample and step, and termination from `envs`' `termination_fn` on predicted observations.
* k follows `rollout_schedule` over epochs counted, as in the reference, from the end of the
  `init_steps` random-action steps (epoch 0 = env steps 5000-6000 on hopper). Metrics and curves
  count all env steps, random ones included.
* The model buffer holds `retain_epochs` epochs of rollouts at the current k; when k changes it
  is reallocated as the reference's `_reallocate_model_pool` does (old rows kept, in place), so
  SAC never samples a row that was never written. k never decreases (no preset's does; `resolve`
  rejects such a schedule), so the pool only grows.
* SAC with G updates per env step on batches of int(real_ratio x 256) = 12 real rows and the rest
  model data.
* Real transitions join the data that fits, rollout starts and SAC's real rows see when their
  episode ends (`--add-at-episode-end`, the default), as the reference's sampler adds whole
  paths. Its random phase runs on until a path ends with >= 5000 rows pooled; ours is exactly
  `init_steps` steps (a random hopper episode lasts 25-40 steps; halfcheetah's end at 5000).

Choices where the paper is silent (and why):
* Holdout loss is the MSE of the mean prediction, as in the reference code, which ranks the
  elites by it; the training loss is the Gaussian NLL.
* The members share one reshuffle order per epoch (each walks its own resample in a random
  order): one sort instead of B. `model_max_epochs` bounds a fit (a `while_loop` needs one).
* Seeds vmapped together fit their models one seed after another (`--sequential-fit`, the CPU
  default; `jax.custom_batching.sequential_vmap`): a vmapped early-stopping loop would step
  every seed until the slowest seed stops. Everything else stays vmapped.
* The buffers are preallocated for the largest k (no recompile as k grows); their memory is
  estimated and printed before anything is allocated, and a run that cannot fit stops.
* A non-finite model prediction ends its rollout and is not stored (the reference's termination
  functions end it too, but store the NaNs); the count is logged. The run stops only if every
  rollout of a branch is non-finite at its first step, or a loss of SAC or the model is.
* Bootstrapping: the critic target uses (1 - terminated), never truncated (time limits).
* The model predicts the reward features `envs` appends to Brax observations like any other entry.
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
from tqdm import tqdm

from algorithms import utils

if __name__ == "__main__":  # join a multi-process run before `import envs` starts JAX's backend
    utils.join_processes(sys.argv[1:])

import envs  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Arguments. `None` means "the preset of --env-id" (PRESETS below, from the paper's App. C).
@dataclasses.dataclass
class Args(utils.Run):
    # experiment
    env_id: str = "hopper"
    """task: hopper, walker2d, halfcheetah, ant, humanoid, inverted_pendulum (presets), or any of envs.CONTINUOUS (pendulum: actions rescaled to its torque bounds)"""
    seed: int = 0
    """seed of the first run; vmapped seed i uses seed + i"""
    num_seeds: int = 1
    """independent seeds trained at once in one compiled program"""
    seed_batch: int | None = None
    """seeds vmapped together; more seeds run batch after batch in the same program (lax.map). Default: all seeds on an accelerator; 1 on CPU, so seed i of any run equals a single run of seed i bit for bit (with --sequential-fit a larger batch costs no more per seed there)"""
    sequential_fit: bool | None = None
    """inside a vmapped seed batch, fit each seed's model alone, one seed after another: a vmapped fit trains every seed until the slowest seed's early stopping fires. Default: on CPU, where that extra work costs time; off on an accelerator, where seeds run in parallel"""
    total_timesteps: int | None = None
    """env steps (preset: 125_000 hopper, 300_000 walker2d/ant/humanoid, 400_000 halfcheetah, 20_000 inverted_pendulum)"""
    backend: str = envs.DEFAULT_BACKEND
    """physics: gymnasium (Gymnasium's v4 task on MJX, the papers' task) or Brax's positional / generalized / spring / mjx (other tasks); recorded with the run"""
    epoch_length: int | None = None
    """env steps per epoch: the unit of the k schedule, evaluation and checkpoints (preset 1000; 250 inverted_pendulum)"""
    init_steps: int | None = None
    """random-action steps before learning starts (preset 5000; 500 inverted_pendulum)"""
    eval_episodes: int = 5
    """deterministic-policy episodes per evaluation, at the end of every epoch"""
    evaluate: str | None = None
    """only evaluate the policy saved in this run directory and print the returns"""
    render: str | None = None
    """only write one episode of this run's saved policy into its directory: episode.html (Brax's viewer)"""

    # model
    ensemble_size: int = 7
    """B, members of the bootstrapped ensemble"""
    num_elites: int = 5
    """members with the lowest holdout loss used for rollouts"""
    model_width: int | None = None
    """hidden units per layer (preset 200; 400 humanoid)"""
    model_depth: int = 4
    """hidden layers"""
    model_weight_decay: tuple[float, ...] = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    """L2 coefficient per layer (hidden layers then output), 0.5 * wd * ||W||^2"""
    model_lr: float = 1e-3
    model_batch_size: int = 256
    holdout_ratio: float = 0.2
    max_holdout: int = 5000
    model_patience: int = 5
    """stop fitting after more than this many epochs without a >1% holdout improvement of any member (the reference's `> 5`)"""
    model_max_epochs: int = 1000
    """upper bound on epochs per fit"""
    model_train_freq: int | None = None
    """env steps between model fits (and rollout branches) (preset 250; 1000 humanoid)"""

    # model rollouts
    rollout_batch_size: int = 100_000
    """model rollouts branched at every fit (the reference's rollout_batch_size): M = this / model_train_freq per env step (400; humanoid 100)"""
    rollout_schedule: tuple[int, int, int, int] | None = None
    """[epoch_start, epoch_end, k_start, k_end]: k linear in epoch, clipped (preset per task)"""
    retain_epochs: int | None = None
    """epochs of model rollouts the model buffer keeps (preset 1; 5 humanoid)"""

    # agent (SAC)
    real_ratio: float = 0.05
    """share of real transitions in each SAC batch"""
    add_at_episode_end: bool = True
    """real transitions become visible to fits, rollout starts and SAC only when their episode ends, as the reference's sampler adds whole paths (at least one episode must end within init_steps); --no-add-at-episode-end: at once"""
    updates_per_step: int | None = None
    """G, SAC gradient updates per env step (preset 20; 40 halfcheetah; 10 inverted_pendulum)"""
    target_entropy: float | None = None
    """SAC's entropy target (preset per task)"""
    init_alpha: float = 1.0
    """the temperature alpha at the start (softlearning's and the SAC paper's: 1)"""
    gamma: float = 0.99
    tau: float = 5e-3
    sac_lr: float = 3e-4
    sac_batch_size: int = 256
    sac_width: int = 256
    sac_depth: int = 2


PRESETS = {  # MBPO App. C / reference configuration; epoch = 1000 env steps unless noted
    "inverted_pendulum": dict(total_timesteps=20_000, epoch_length=250, init_steps=500, updates_per_step=10,
                              rollout_schedule=(1, 15, 1, 1), target_entropy=-0.05),
    "hopper": dict(total_timesteps=125_000, updates_per_step=20, rollout_schedule=(20, 150, 1, 15), target_entropy=-1.0),
    "walker2d": dict(total_timesteps=300_000, updates_per_step=20, rollout_schedule=(20, 150, 1, 1), target_entropy=-3.0),
    "halfcheetah": dict(total_timesteps=400_000, updates_per_step=40, rollout_schedule=(20, 150, 1, 1), target_entropy=-3.0),
    "ant": dict(total_timesteps=300_000, updates_per_step=20, rollout_schedule=(20, 100, 1, 25), target_entropy=-4.0),
    # Humanoid fits every 1000 steps, so its 100k rollouts per fit are M = 100 per env step.
    "humanoid": dict(total_timesteps=300_000, updates_per_step=20, rollout_schedule=(20, 300, 1, 25), target_entropy=-2.0,
                     model_width=400, model_train_freq=1000, retain_epochs=5),
}
DEFAULTS = dict(epoch_length=1000, init_steps=5000, model_width=200, model_train_freq=250, retain_epochs=1,
                total_timesteps=100_000, updates_per_step=20, rollout_schedule=(20, 100, 1, 1))


def make_env(args: Args):
    """(env, params); `backend` picks the physics of the MuJoCo tasks (pendulum has one)."""
    return envs.make(args.env_id, **({"backend": args.backend} if args.env_id in envs.MUJOCO_TASKS else {}))


def resolve(args: Args) -> Args:
    """Fill `None` fields from the env's preset and check every argument (one-line errors)."""
    check = utils.check
    check(args.env_id in envs.NAMES, f"unknown env {args.env_id!r}; valid: {', '.join(envs.NAMES)}")
    check(args.env_id in envs.CONTINUOUS, f"MBPO needs a continuous-action task, not {args.env_id}")
    preset = {**DEFAULTS, **PRESETS.get(args.env_id, {})}
    filled = {k: (preset[k] if v is None and k in preset else v) for k, v in dataclasses.asdict(args).items()}
    if filled["seed_batch"] is None:
        filled["seed_batch"] = filled["num_seeds"] if jax.default_backend() != "cpu" else 1
    if filled["sequential_fit"] is None:
        filled["sequential_fit"] = jax.default_backend() == "cpu"
    if filled["target_entropy"] is None:  # the usual SAC heuristic: -|A|
        filled["target_entropy"] = -float(make_env(args)[0].action_size)
    args = Args(**filled)
    for name in ["num_seeds", "seed_batch", "total_timesteps", "epoch_length", "eval_episodes", "ensemble_size", "num_elites",
                 "model_width", "model_depth", "model_batch_size", "max_holdout", "model_patience",
                 "model_max_epochs", "model_train_freq", "rollout_batch_size", "retain_epochs",
                 "updates_per_step", "sac_batch_size", "sac_width", "sac_depth"]:
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check(args.init_steps >= args.model_train_freq, "--init-steps must be >= --model-train-freq (data for the first fit)")
    check(args.backend in envs.BACKENDS, f"unknown backend {args.backend!r}; valid: {', '.join(envs.BACKENDS)}")
    check(args.seed_batch <= args.num_seeds, f"--seed-batch {args.seed_batch} > --num-seeds {args.num_seeds}")
    check(args.num_elites <= args.ensemble_size, f"--num-elites {args.num_elites} > --ensemble-size {args.ensemble_size}")
    check(0.0 <= args.real_ratio <= 1.0, f"--real-ratio must be in [0, 1], got {args.real_ratio}")
    check(0.0 < args.holdout_ratio < 1.0, f"--holdout-ratio must be in (0, 1), got {args.holdout_ratio}")
    check(0.0 < args.gamma <= 1.0 and 0.0 < args.tau <= 1.0, "--gamma and --tau must be in (0, 1]")
    check(args.init_alpha > 0, f"--init-alpha must be positive, got {args.init_alpha}")
    check(len(args.model_weight_decay) == args.model_depth + 1,
          f"--model-weight-decay needs {args.model_depth + 1} values (hidden layers + output)")
    e0, e1, k0, k1 = args.rollout_schedule
    check(e1 > e0 and k0 >= 1 and k1 >= 1, f"--rollout-schedule needs epoch_end > epoch_start and k >= 1, got {args.rollout_schedule}")
    # The model pool only grows (no preset's k decreases; the reference's shrinking copy is left out).
    check(k1 >= k0, f"--rollout-schedule: k must not decrease (k_end {k1} < k_start {k0})")
    check(args.epoch_length % args.model_train_freq == 0, "--epoch-length must be a multiple of --model-train-freq")
    check(args.init_steps % args.model_train_freq == 0, "--init-steps must be a multiple of --model-train-freq")
    check(args.total_timesteps % args.epoch_length == 0, "--total-timesteps must be a multiple of --epoch-length")
    check(args.total_timesteps > args.init_steps, "--total-timesteps must exceed --init-steps")
    check(args.sac_batch_size <= args.total_timesteps, "--sac-batch-size larger than the real buffer can hold")
    check(int(args.init_steps * args.holdout_ratio) >= 1,
          "too few steps before the first model fit for a train/holdout split")
    return args


def check_memory(args: Args):
    """Estimate the preallocated buffers (real + model) of the seeds that share one memory (a
    device's, or this host's) before anything is allocated; print it, and stop with a one-line
    error if it exceeds that memory."""
    env = make_env(args)[0]
    row = 4 * (2 * env.obs_size + env.action_size + 1) + 1  # obs, action, reward, next_obs (f32), terminated
    model_rows = model_capacity(args)
    have, where, seeds = utils.available_memory(args)
    real, model = seeds * args.total_timesteps * row, seeds * model_rows * row
    line = (f"buffers: {(real + model) / 2**30:.2f} GiB for {seeds} seed(s) = {real / 2**30:.2f} real + "
            f"{model / 2**30:.2f} model ({model_rows:,} rows per seed at the largest k); {where}: {have / 2**30:.1f} GiB")
    print(line, flush=True)
    utils.check(real + model <= have, f"{line}: too little memory; lower --rollout-batch-size, --retain-epochs, "
                                      f"the largest k of --rollout-schedule, --num-seeds or --total-timesteps")


# ---------------------------------------------------------------------------------------------
# Networks
class Ensemble(eqx.Module):
    """B Gaussian MLPs in stacked weights (einsum over the member axis), with input normalizer."""

    weights: list  # (B, in, out) per layer
    biases: list  # (B, out)
    max_logvar: jax.Array  # (out,), shared by the members as in the reference
    min_logvar: jax.Array
    input_mean: jax.Array  # normalizer, refit on the training inputs at every fit (not trained)
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
        self.max_logvar = jnp.full((out_size,), 0.5, jnp.float32)  # strong dtype, as a restored checkpoint's:
        self.min_logvar = jnp.full((out_size,), -10.0, jnp.float32)  # a resumed run reuses the compiled chunk
        self.input_mean, self.input_std = jnp.zeros(in_size), jnp.ones(in_size)

    def __call__(self, inputs):
        """inputs (B, N, in) -> mean, logvar (B, N, out): member b predicts for inputs[b]."""
        x = (inputs - jax.lax.stop_gradient(self.input_mean)) / jax.lax.stop_gradient(self.input_std)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = jnp.einsum("bni,bio->bno", x, w) + b[:, None]
            if i < len(self.weights) - 1:
                x = jax.nn.swish(x)
        mean, raw_logvar = jnp.split(x, 2, axis=-1)
        # Soft bounds (MBPO/PETS): smooth clamp of the log-variance into [min_logvar, max_logvar].
        logvar = self.max_logvar - jax.nn.softplus(self.max_logvar - raw_logvar)
        logvar = self.min_logvar + jax.nn.softplus(logvar - self.min_logvar)
        return mean, logvar

    def members(self, index):
        """The sub-ensemble of members `index` (e.g. the elites)."""
        return eqx.tree_at(lambda m: (m.weights, m.biases), self,
                           ([w[index] for w in self.weights], [b[index] for b in self.biases]))

    def with_members_from(self, other, take):
        """This ensemble, with the members where `take` (B,) replaced by `other`'s."""
        def pick(mine, theirs):
            return jnp.where(take.reshape((-1,) + (1,) * (mine.ndim - 1)), theirs, mine)
        return eqx.tree_at(lambda m: (m.weights, m.biases), self,
                           (jax.tree.map(pick, self.weights, other.weights), jax.tree.map(pick, self.biases, other.biases)))


class MLP(eqx.Module):
    """ReLU MLP. (Not eqx.nn.MLP: its activation-function leaf cannot be carried by lax.scan.)"""

    layers: list

    def __init__(self, key, in_size, out_size, width, depth):
        sizes = [in_size] + [width] * depth + [out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [eqx.nn.Linear(i, o, key=k) for k, i, o in zip(keys, sizes[:-1], sizes[1:])]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class Actor(eqx.Module):
    net: MLP

    def __call__(self, obs):
        mean, log_std = jnp.split(self.net(obs), 2)
        return mean, jnp.clip(log_std, -20.0, 2.0)


class Critics(eqx.Module):
    """Two Q networks stacked on a leading axis (clipped double Q)."""

    nets: MLP

    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action])
        return eqx.filter_vmap(lambda net: net(x)[0])(self.nets)


def sample_action(actor, obs, key):
    """tanh-Gaussian action and its log-probability (with the tanh change of variables)."""
    mean, log_std = actor(obs)
    pre_tanh = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    log_prob = jnp.sum(
        -0.5 * ((pre_tanh - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), numerically stable
        - 2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))
    )
    return jnp.tanh(pre_tanh), log_prob


def deterministic_action(actor, obs):
    return jnp.tanh(actor(obs)[0])


# ---------------------------------------------------------------------------------------------
# Buffers: preallocated arrays, traced insert position and size.
class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array  # the true next observation, never the post-reset one
    terminated: jax.Array  # the task's own termination only; truncation is not stored


class Buffer(NamedTuple):
    data: Transition  # preallocated rows
    insert_pos: jax.Array
    size: jax.Array
    capacity: jax.Array  # the ring's size (traced, <= the allocated rows); the model buffer's follows k

    @staticmethod
    def empty(rows, obs_size, action_size):
        f = partial(jnp.zeros, dtype=jnp.float32)
        return Buffer(Transition(f((rows, obs_size)), f((rows, action_size)), f(rows), f((rows, obs_size)),
                                 jnp.zeros(rows, bool)), jnp.int32(0), jnp.int32(0), jnp.int32(rows))

    def add_batch(self, transition: Transition, valid):
        """Write the rows of `transition` where `valid`, consecutively, into the ring: invalid rows
        are dropped, nothing is overwritten by them."""
        rank = jnp.cumsum(valid) - 1
        index = jnp.where(valid, (self.insert_pos + rank) % self.capacity, self.data.obs.shape[0])
        data = jax.tree.map(lambda rows, new: rows.at[index].set(new, mode="drop"), self.data, Transition(*transition))
        n = jnp.sum(valid, dtype=jnp.int32)
        return self._replace(data=data, insert_pos=(self.insert_pos + n) % self.capacity,
                             size=jnp.minimum(self.size + n, self.capacity))

    def resize(self, capacity):
        """The reference's `_reallocate_model_pool` for a pool that grows (k never decreases,
        `resolve`): the old rows [0, size) stay where they are and the next row goes to `size`, so
        the rows `sample` draws from were all written. An unchanged capacity leaves the pool as is."""
        capacity = jnp.asarray(capacity, jnp.int32)

        def reallocate(buffer):
            return buffer._replace(insert_pos=buffer.size % capacity, size=jnp.minimum(buffer.size, capacity),
                                   capacity=capacity)

        return jax.lax.cond(capacity != self.capacity, reallocate, lambda b: b, self)

    def sample(self, key, n) -> Transition:
        index = jax.random.randint(key, (n,), 0, jnp.maximum(self.size, 1))
        return jax.tree.map(lambda rows: rows[index], self.data)


class SACState(NamedTuple):
    actor: Actor
    critics: Critics
    target_critics: Critics
    log_alpha: jax.Array
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState


class RunnerState(NamedTuple):
    env_state: object
    obs: jax.Array
    real: Buffer
    model_data: Buffer
    model: Ensemble
    model_opt: optax.OptState
    elites: jax.Array
    sac: SACState
    episode_return: jax.Array
    unfinished: jax.Array  # the newest real rows, of the episode in progress (0 with --no-add-at-episode-end)
    key: jax.Array


def rollout_length(args, env_step):
    """k for the fit at `env_step` (traced): the reference's `_set_rollout_length`, linear from
    k_start at epoch_start to k_end at epoch_end, clipped, truncated to an int; its epochs count
    from the end of the `init_steps` random-action steps."""
    e0, e1, k0, k1 = args.rollout_schedule
    epoch = (env_step - args.init_steps) // args.epoch_length
    k = k0 + (epoch - e0) / (e1 - e0) * (k1 - k0)
    return jnp.clip(k, min(k0, k1), max(k0, k1)).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# INIT
def sac_optimizer(args):
    return optax.adam(args.sac_lr)


def model_optimizer(args):
    return optax.adam(args.model_lr)


def rollouts_per_epoch(args):
    """Model rows branched per epoch at k = 1: the reference's rollout_batch_size at every fit."""
    return args.rollout_batch_size * (args.epoch_length // args.model_train_freq)


def model_capacity(args):
    """Rows allocated for the model pool: `retain_epochs` epochs of rollouts at the largest k."""
    return args.retain_epochs * max(args.rollout_schedule[2:]) * rollouts_per_epoch(args)


def init(args, env, env_params, key):
    """A fresh run: the env's first state, SAC's networks (target critics = critics, alpha = 1),
    a fresh ensemble and empty real and model buffers."""
    key, env_key, model_key, actor_key, critic_key = jax.random.split(key, 5)
    obs, env_state = env.reset(env_key, env_params)
    obs_size, action_size = env.obs_size, env.action_size
    actor = Actor(MLP(actor_key, obs_size, 2 * action_size, args.sac_width, args.sac_depth))
    critics = Critics(eqx.filter_vmap(lambda k: MLP(k, obs_size + action_size, 1, args.sac_width, args.sac_depth))(
        jax.random.split(critic_key, 2)))
    log_alpha = jnp.float32(np.log(args.init_alpha))
    adam = sac_optimizer(args)
    sac = SACState(actor, critics, critics, log_alpha, adam.init(eqx.filter(actor, eqx.is_array)),
                   adam.init(eqx.filter(critics, eqx.is_array)), adam.init(log_alpha))
    model = Ensemble(model_key, args.ensemble_size, obs_size + action_size, obs_size + 1, args.model_width,
                     args.model_depth)
    return RunnerState(
        env_state=env_state, obs=obs,
        real=Buffer.empty(args.total_timesteps, obs_size, action_size),
        model_data=Buffer.empty(model_capacity(args), obs_size, action_size),
        model=model, model_opt=model_optimizer(args).init(eqx.filter(model, eqx.is_array)),
        elites=jnp.arange(args.num_elites), sac=sac, episode_return=jnp.float32(0.0), unfinished=jnp.int32(0), key=key,
    )


# ---------------------------------------------------------------------------------------------
# COLLECT
def collect(args, env, env_params, runner, random_actions, key):
    """One env step with a uniform-random or policy action; returns the finished episode's
    return (NaN if the episode goes on)."""
    action_key, step_key = jax.random.split(key)
    action = jax.lax.cond(
        random_actions,
        lambda: jax.random.uniform(action_key, (env.action_size,), minval=-1.0, maxval=1.0),
        lambda: sample_action(runner.sac.actor, runner.obs, action_key)[0],
    )
    # Actions live in [-1, 1] (tanh policy, random phase, buffers, model); the env gets them on its own bounds.
    next_obs, env_state, reward, terminated, truncated, info = env.step(
        step_key, runner.env_state, utils.to_env_actions(env, env_params)(action), env_params)
    # The model learns from the true next observation, never the post-reset one.
    transition = Transition(runner.obs[None], action[None], reward[None], info["final_observation"][None], terminated[None])
    real = runner.real.add_batch(transition, jnp.ones(1, bool))
    done = terminated | truncated
    episode_return = runner.episode_return + reward
    unfinished = jnp.where(done, 0, runner.unfinished + 1) if args.add_at_episode_end else runner.unfinished
    runner = runner._replace(env_state=env_state, obs=next_obs, real=real, unfinished=unfinished,
                             episode_return=jnp.where(done, 0.0, episode_return))
    return runner, jnp.where(done, episode_return, jnp.nan)


def pooled(runner):
    """The real rows the learner sees: all but the episode in progress (its rows are the newest;
    the real buffer holds every env step, so it never wraps and they are [size - unfinished, size))."""
    return runner.real._replace(size=runner.real.size - runner.unfinished)


# ---------------------------------------------------------------------------------------------
# FIT MODEL
def model_io(buffer, index):
    """Inputs (obs, action) and targets (next_obs - obs, reward) of the rows `index`: the
    layout the ensemble predicts, which `model_step` decodes."""
    obs, action, reward, next_obs, _ = jax.tree.map(lambda rows: rows[index], buffer.data)
    return jnp.concatenate([obs, action], -1), jnp.concatenate([next_obs - obs, reward[..., None]], -1)


def model_loss(args, model, inputs, targets, weights):
    """Gaussian NLL per member (mean over its valid rows and the dims) + log-var bound term +
    weight decay. `weights` (B, N) masks the rows past the data in an epoch's last minibatch."""
    mean, logvar = model(inputs)
    per_row = jnp.mean((mean - targets) ** 2 * jnp.exp(-logvar) + logvar, axis=-1)
    nll = jnp.sum(per_row * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)
    bounds = 0.01 * (jnp.sum(model.max_logvar) - jnp.sum(model.min_logvar))
    decay = sum(0.5 * wd * jnp.sum(w**2) for wd, w in zip(args.model_weight_decay, model.weights))
    return jnp.sum(nll) + bounds + decay, nll


def model_sgd_step(args, model, opt_state, inputs, targets, weights):
    """One Adam step of every member on its own minibatch (inputs[b], targets[b])."""
    (_, nll), grads = eqx.filter_value_and_grad(partial(model_loss, args), has_aux=True)(model, inputs, targets, weights)
    updates, opt_state = model_optimizer(args).update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, nll


def early_stopping(best_loss, since, loss):
    """The reference's `_save_best`: a member improves if its holdout loss drops by > 1% of its
    best; `since` counts epochs in which none did, and the fit stops once since > patience."""
    improved = (best_loss - loss) / best_loss > 0.01
    return improved, jnp.where(improved, loss, best_loss), jnp.where(improved.any(), 0, since + 1)


def minibatch_rows(resample, order, j, batch_size, n_train):
    """Minibatch `j` of an epoch: (rows (B, batch_size), valid (batch_size,)). Member b trains on
    its resample at the positions order[j * bs : (j + 1) * bs]; positions >= n_train are padding.
    So an epoch, j = 0 .. ceil(n_train / bs) - 1, walks each member's resample once."""
    position = jax.lax.dynamic_slice_in_dim(order, j * batch_size, batch_size)
    return resample[:, position], j * batch_size + jnp.arange(batch_size) < n_train


class FitLoop(NamedTuple):
    model: Ensemble
    opt_state: optax.OptState
    best: Ensemble  # each member's weights at its best holdout loss so far
    best_loss: jax.Array  # (B,)
    since: jax.Array  # epochs since any member improved
    epochs: jax.Array
    key: jax.Array
    history: jax.Array  # (model_max_epochs, B) holdout loss per epoch, NaN after the last
    train_nll: jax.Array  # (B,) of the last minibatch


def fit_model(args, model, opt_state, buffer, key):
    """Fit on the real buffer until no member improved its holdout MSE by >1% for more than
    `model_patience` epochs; each member keeps its best weights. Shapes are static: the split
    is a random ranking of the buffer slots, masked by the traced size.
    Returns (model, opt_state, elites, diagnostics, metrics)."""
    capacity, members, bs = buffer.data.obs.shape[0], args.ensemble_size, args.model_batch_size
    perm_key, boot_key, key = jax.random.split(key, 3)
    # Random ranking of the filled slots (empty slots rank last): slots[:n_hold] is the holdout.
    slots = jnp.argsort(jnp.where(jnp.arange(capacity) < buffer.size, jax.random.uniform(perm_key, (capacity,)), 2.0))
    n_hold = jnp.minimum((buffer.size * args.holdout_ratio).astype(jnp.int32), args.max_holdout)
    n_train = buffer.size - n_hold
    hold_size = min(args.max_holdout, capacity)
    hold_in, hold_target = model_io(buffer, slots[:hold_size])
    hold_mask = jnp.arange(hold_size) < n_hold

    # Input normalizer from the training inputs (masked mean/std over the whole buffer).
    rank = jnp.zeros(capacity, jnp.int32).at[slots].set(jnp.arange(capacity))
    train_mask = ((rank >= n_hold) & (rank < buffer.size)).astype(jnp.float32)[:, None]
    all_in = jnp.concatenate([buffer.data.obs, buffer.data.action], -1)
    mean = jnp.sum(all_in * train_mask, 0) / n_train
    std = jnp.sqrt(jnp.sum((all_in - mean) ** 2 * train_mask, 0) / n_train)
    model = eqx.tree_at(lambda m: (m.input_mean, m.input_std), model, (mean, jnp.where(std < 1e-12, 1.0, std)))

    # The bootstrap (reference bnn.py `train`): one resample of the n_train training rows per
    # member and fit, drawn with replacement (~63% distinct rows each); an epoch is one pass over
    # each member's resample in a new order, the last minibatch partial. Static shapes: columns
    # >= n_train are padding, masked out.
    width = -(-capacity // bs) * bs
    resample = jax.random.randint(boot_key, (members, width), 0, n_train)
    steps_per_epoch = (n_train + bs - 1) // bs

    def holdout_mse(model):
        mean, _ = model(jnp.broadcast_to(hold_in, (members, *hold_in.shape)))
        per_sample = jnp.mean((mean - hold_target) ** 2, -1)
        return jnp.sum(per_sample * hold_mask, -1) / n_hold

    def epoch(fit):
        key, order_key = jax.random.split(fit.key)
        # A new order of the positions [0, n_train), shared by the members: each still walks its
        # own resample in a random order (one sort instead of B, ~6x cheaper on CPU).
        order = jnp.argsort(jnp.where(jnp.arange(width) < n_train, jax.random.uniform(order_key, (width,)), 2.0))

        def sgd_step(j, carry):
            model, opt_state, _ = carry
            rows, valid = minibatch_rows(resample, order, j, bs, n_train)
            weights = jnp.broadcast_to(valid, rows.shape).astype(jnp.float32)
            return model_sgd_step(args, model, opt_state, *model_io(buffer, slots[n_hold + rows]), weights)

        model, opt_state, nll = jax.lax.fori_loop(0, steps_per_epoch, sgd_step,
                                                  (fit.model, fit.opt_state, jnp.zeros(members)))
        loss = holdout_mse(model)
        improved, best_loss, since = early_stopping(fit.best_loss, fit.since, loss)
        return FitLoop(model, opt_state, model.with_members_from(fit.best, ~improved), best_loss, since,
                       fit.epochs + 1, key, fit.history.at[fit.epochs].set(loss), nll)

    def keep_going(fit):
        return (fit.since <= args.model_patience) & (fit.epochs < args.model_max_epochs)

    start = FitLoop(model, opt_state, model, jnp.full(members, 1e10), jnp.int32(0), jnp.int32(0), key,
                    jnp.full((args.model_max_epochs, members), jnp.nan), jnp.zeros(members))
    fit = jax.lax.while_loop(keep_going, epoch, start)
    elites = jnp.argsort(fit.best_loss)[: args.num_elites]
    # The rows each member's resample holds: every epoch walks all of them (minibatch_rows).
    used = jnp.zeros((members, capacity), bool).at[jnp.arange(members)[:, None], resample].max(jnp.arange(width) < n_train)
    metrics = {"model/holdout_mse": jnp.mean(fit.best_loss[elites]), "model/train_nll": jnp.mean(fit.train_nll),
               "model/epochs": fit.epochs, "model/bootstrap_distinct": jnp.mean(jnp.sum(used, -1) / n_train)}
    diagnostics = {"holdout_loss": fit.best_loss, "holdout_history": fit.history, "resample": resample, "n_train": n_train}
    return fit.best, fit.opt_state, elites, diagnostics, metrics


def one_seed_at_a_time(fn):
    """`fn`, but under `jax.vmap` each seed runs alone in a loop (lax.map) instead of batched. A
    batched `while_loop` (the fit's early stopping) steps every seed until the last one stops;
    alone, each seed stops at its own epoch, as in a single run. Non-array leaves (functions
    inside modules) are kept out of the custom batching rule, which takes arrays only."""

    def wrapped(*inputs):
        arrays, static = eqx.partition(inputs, eqx.is_array)
        static_out = []

        @jax.custom_batching.sequential_vmap
        def on_arrays(arrays):
            out_arrays, out_static = eqx.partition(fn(*eqx.combine(arrays, static)), eqx.is_array)
            static_out[:] = [out_static]
            return out_arrays

        return eqx.combine(on_arrays(arrays), static_out[0])

    return wrapped


def fitter(args):
    """`fit_model` as the loop runs it: with `--sequential-fit`, vmapped seeds fit one at a time."""
    return one_seed_at_a_time(partial(fit_model, args)) if args.sequential_fit else partial(fit_model, args)


# ---------------------------------------------------------------------------------------------
# MODEL ROLLOUT
def model_step(args, model, elites, obs, action, key):
    """One step of the ensemble: a random elite per sample, Gaussian sample of (dobs, r)
    (`model_io`'s target layout)."""
    member_key, noise_key = jax.random.split(key)
    elite_model = model.members(elites)
    inputs = jnp.concatenate([obs, action], -1)
    mean, logvar = elite_model(jnp.broadcast_to(inputs, (args.num_elites, *inputs.shape)))
    pick = jax.random.randint(member_key, (obs.shape[0],), 0, args.num_elites)
    mean, logvar = mean[pick, jnp.arange(obs.shape[0])], logvar[pick, jnp.arange(obs.shape[0])]
    sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(noise_key, mean.shape)
    return obs + sample[:, :-1], sample[:, -1]


def model_rollout(args, env, runner, k, key):
    """Branch `rollout_batch_size` rollouts of length k from real states into the model buffer;
    a rollout stops after the step where `termination_fn` says done (that step is kept), or at
    a non-finite prediction (that step is dropped: the reference's termination functions call
    it done but still store it, NaNs included)."""
    num_rollouts = args.rollout_batch_size
    start_key, key = jax.random.split(key)
    obs = pooled(runner).sample(start_key, num_rollouts).obs

    def step(t, carry):
        obs, alive, buffer, nonfinite, key = carry
        key, action_key, model_key = jax.random.split(key, 3)
        action, _ = jax.vmap(sample_action, (None, 0, 0))(runner.sac.actor, obs, jax.random.split(action_key, num_rollouts))
        next_obs, reward = model_step(args, runner.model, runner.elites, obs, action, model_key)
        finite = jnp.all(jnp.isfinite(next_obs), -1) & jnp.isfinite(reward)
        terminated = env.termination_fn(obs, action, next_obs)
        buffer = buffer.add_batch(Transition(obs, action, reward, next_obs, terminated), alive & finite)
        nonfinite += jnp.sum(alive & ~finite)
        return next_obs, alive & ~terminated & finite, buffer, nonfinite, key

    init = (obs, jnp.ones(num_rollouts, bool), runner.model_data, jnp.int32(0), key)
    _, alive, buffer, nonfinite, _ = jax.lax.fori_loop(0, k, step, init)
    return buffer, {"model/rollout_alive_frac": jnp.mean(alive), "model/nonfinite_predictions": nonfinite,
                    # every rollout's first prediction was non-finite: the model is broken
                    "model/nonfinite_branch": (nonfinite >= num_rollouts).astype(jnp.int32)}


# ---------------------------------------------------------------------------------------------
# UPDATE (SAC: the text of sac.py's; only the batch differs)
def critic_target(sac, reward, next_obs, terminated, key, gamma):
    """Soft TD target (eqs. 2-3 with clipped double Q): r + gamma (1 - terminated)
    (min_i Q_target_i(s', a') - alpha log pi(a'|s')), a' ~ pi(s'). Bootstraps through
    truncation (time limits), never through termination."""
    alpha = jnp.exp(sac.log_alpha)
    next_action, next_logp = jax.vmap(sample_action, (None, 0, 0))(
        sac.actor, next_obs, jax.random.split(key, next_obs.shape[0]))
    next_q = jnp.min(jax.vmap(sac.target_critics)(next_obs, next_action), -1)
    return reward + gamma * (1.0 - terminated) * (next_q - alpha * next_logp)


def sac_update(args, sac, batch, key):
    """One gradient step of critics (eq. 5), actor (eq. 9, reparameterized) and temperature
    (eq. 18), then the Polyak update of the target critics."""
    obs, action, reward, next_obs, terminated = batch
    alpha = jnp.exp(sac.log_alpha)
    next_key, actor_key = jax.random.split(key)
    n = obs.shape[0]
    target = critic_target(sac, reward, next_obs, terminated, next_key, args.gamma)

    def critic_loss(critics):
        q = jax.vmap(critics)(obs, action)
        return jnp.mean((q - jax.lax.stop_gradient(target)[:, None]) ** 2) * 2  # sum over the 2 Qs

    def actor_loss(actor):
        new_action, logp = jax.vmap(sample_action, (None, 0, 0))(actor, obs, jax.random.split(actor_key, n))
        q = jnp.min(jax.vmap(sac.critics)(obs, new_action), -1)
        return jnp.mean(alpha * logp - q), logp

    c_loss, c_grads = eqx.filter_value_and_grad(critic_loss)(sac.critics)
    (a_loss, logp), a_grads = eqx.filter_value_and_grad(actor_loss, has_aux=True)(sac.actor)
    alpha_loss, alpha_grad = jax.value_and_grad(
        lambda log_alpha: -jnp.mean(log_alpha * jax.lax.stop_gradient(logp + args.target_entropy))
    )(sac.log_alpha)

    adam = sac_optimizer(args)
    c_updates, critic_opt = adam.update(c_grads, sac.critic_opt)
    critics = eqx.apply_updates(sac.critics, c_updates)
    a_updates, actor_opt = adam.update(a_grads, sac.actor_opt)
    actor = eqx.apply_updates(sac.actor, a_updates)
    al_update, alpha_opt = adam.update(alpha_grad, sac.alpha_opt)
    log_alpha = sac.log_alpha + al_update
    target_critics = jax.tree.map(lambda t, o: (1 - args.tau) * t + args.tau * o, sac.target_critics, critics)
    sac = SACState(actor, critics, target_critics, log_alpha, actor_opt, critic_opt, alpha_opt)
    return sac, {"losses/critic": c_loss, "losses/actor": a_loss, "losses/alpha": alpha_loss,
                 "charts/alpha": jnp.exp(log_alpha), "charts/entropy": -jnp.mean(logp)}


def sample_batch(args, runner, key):
    """int(real_ratio x batch) real rows (the reference's int(): 12 of 256), then model rows."""
    n_real = int(args.real_ratio * args.sac_batch_size)
    real_key, model_key = jax.random.split(key)
    real = pooled(runner).sample(real_key, n_real)
    fake = runner.model_data.sample(model_key, args.sac_batch_size - n_real)
    return jax.tree.map(lambda r, f: jnp.concatenate([r, f]), real, fake)


def update(args, runner, key):
    """G SAC updates, each on a fresh mixed batch; the metrics are their means."""

    def one_update(sac, key):
        batch_key, update_key = jax.random.split(key)
        return sac_update(args, sac, sample_batch(args, runner, batch_key), update_key)

    sac, metrics = jax.lax.scan(one_update, runner.sac, jax.random.split(key, args.updates_per_step))
    return runner._replace(sac=sac), jax.tree.map(jnp.mean, metrics)


# ---------------------------------------------------------------------------------------------
# EVALUATE
def evaluate(args, env, env_params, actor, key):
    """Mean return of `eval_episodes` deterministic-policy episodes in the real env, stepping
    until every episode has ended (the time limit bounds it)."""
    reset_key, key = jax.random.split(key)
    obs, state = jax.vmap(env.reset, (0, None))(jax.random.split(reset_key, args.eval_episodes), env_params)
    to_env = utils.to_env_actions(env, env_params)

    def step(carry):
        t, obs, state, total, running = carry
        action = jax.vmap(deterministic_action, (None, 0))(actor, obs)
        obs, state, reward, terminated, truncated, _ = jax.vmap(env.step, (0, 0, 0, None))(
            jax.random.split(jax.random.fold_in(key, t), args.eval_episodes), state, to_env(action), env_params)
        total = total + reward * running
        return t + 1, obs, state, total, running & ~(terminated | truncated)

    init = (jnp.int32(0), obs, state, jnp.zeros(args.eval_episodes), jnp.ones(args.eval_episodes, bool))
    return jnp.mean(jax.lax.while_loop(lambda carry: jnp.any(carry[-1]), step, init)[3])


# ---------------------------------------------------------------------------------------------
# One epoch: Algorithm 2's model periods, then an evaluation
def period(args, env, env_params, runner, period_start):
    """`model_train_freq` env steps: fit + branch rollouts at the start (once learning has
    begun), then collect one step and do G SAC updates per env step (Algorithm 2, l.3-10).
    `period_start` is unbatched, so under vmap these conds stay branches; a phase that does not
    run reports NaN (0 for counts)."""
    learning = period_start >= args.init_steps
    k = rollout_length(args, period_start)
    fit = fitter(args)

    def fit_and_branch(runner):
        key, fit_key, rollout_key = jax.random.split(runner.key, 3)
        model, model_opt, elites, _, fit_metrics = fit(runner.model, runner.model_opt, pooled(runner), fit_key)
        runner = runner._replace(model=model, model_opt=model_opt, elites=elites, key=key)
        # Reallocate the model pool for this k before branching (reference order), then branch.
        capacity = args.retain_epochs * k * rollouts_per_epoch(args)
        runner = runner._replace(model_data=runner.model_data.resize(capacity))
        model_data, rollout_metrics = model_rollout(args, env, runner, k, rollout_key)
        return runner._replace(model_data=model_data), {**fit_metrics, **rollout_metrics}

    skipped = utils.nan_like(jax.eval_shape(fit_and_branch, runner)[1])
    runner, model_metrics = jax.lax.cond(learning, fit_and_branch, lambda r: (r, skipped), runner)

    def env_step(runner, t):
        key, collect_key, update_key = jax.random.split(runner.key, 3)
        runner, finished_return = collect(args, env, env_params, runner._replace(key=key), t < args.init_steps,
                                          collect_key)
        no_update = utils.nan_like(jax.eval_shape(partial(update, args), runner, update_key)[1])
        runner, sac_metrics = jax.lax.cond(t >= args.init_steps, partial(update, args), lambda r, k: (r, no_update),
                                           runner, update_key)
        return runner, (finished_return, sac_metrics)

    runner, (returns, sac_metrics) = jax.lax.scan(env_step, runner, period_start + jnp.arange(args.model_train_freq))
    return runner, (returns, sac_metrics, {**model_metrics, "model/rollout_length": k})


def chunk(args, env, env_params, runner, start_step):
    """One epoch (`epoch_length` env steps) from `start_step` (shared by all seeds), then an evaluation."""
    starts = start_step + args.model_train_freq * jnp.arange(args.epoch_length // args.model_train_freq)
    runner, (returns, sac_metrics, model_metrics) = jax.lax.scan(partial(period, args, env, env_params), runner, starts)
    key, eval_key = jax.random.split(runner.key)
    runner = runner._replace(key=key)
    finished = jnp.isfinite(returns)
    metrics = {
        "env_steps": start_step + args.epoch_length,
        "eval/return": evaluate(args, env, env_params, runner.sac.actor, eval_key),
        # NaN when no training episode ended in this epoch (allowed by the host's NaN check).
        "charts/train_return": jnp.sum(jnp.where(finished, returns, 0.0)) / jnp.sum(finished),
        "charts/train_episodes": jnp.sum(finished),
        **{k: jnp.nanmean(v) for k, v in sac_metrics.items()},
    }
    # Fit/rollout metrics of the epoch's last period (NaN before learning starts).
    metrics.update({k: v[-1] for k, v in model_metrics.items()})
    metrics["model/nonfinite_predictions"] = jnp.sum(model_metrics["model/nonfinite_predictions"])
    metrics["model/nonfinite_branch"] = jnp.max(model_metrics["model/nonfinite_branch"])
    return runner, metrics


# ---------------------------------------------------------------------------------------------
class Trainer(NamedTuple):
    init: callable  # init(key) -> RunnerState
    chunk: callable  # chunk(state, start_step) -> (state, metrics): one epoch
    evaluate: callable  # evaluate(actor, key) -> mean return
    train: callable  # train(key) -> (state, metrics of every epoch): the whole run, jax.vmap-able
    num_chunks: int


def make_train(args: Args) -> Trainer:
    """The phases above bound to `args` and its env."""
    env, env_params = make_env(args)
    num_chunks = args.total_timesteps // args.epoch_length

    def train(key):
        runner = init(args, env, env_params, key)
        return jax.lax.scan(lambda r, i: chunk(args, env, env_params, r, i * args.epoch_length), runner,
                            jnp.arange(num_chunks))

    return Trainer(partial(init, args, env, env_params), partial(chunk, args, env, env_params),
                   partial(evaluate, args, env, env_params), train, num_chunks)


# ---------------------------------------------------------------------------------------------
def seed_keys(args):
    return jnp.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])


def run(args: Args):
    """Train: the host loop of utils over compiled epochs (log, check, checkpoint, resume)."""
    args, run_dir = utils.open_run(args, Args, "mbpo", resolve, validate=check_memory)
    trainer = make_train(args)
    mesh = utils.seed_mesh(args)  # seeds split over the devices: each trains its own
    state = utils.over_devices(jax.vmap(trainer.init), mesh, donate=False)(utils.on_devices(seed_keys(args), mesh))
    # Each device's seeds in batches of `seed_batch`, vmapped within a batch, one batch after another.
    chunk = utils.over_devices(
        lambda state, start: utils.map_in_batches(lambda s: trainer.chunk(s, start), state, args.seed_batch),
        mesh, replicated=1)

    def check(metrics, epochs):
        # Before learning starts the losses are NaN by design; after, every metric must be finite.
        steps = epochs * args.epoch_length
        utils.assert_finite({k: v for k, v in metrics.items() if (steps > args.init_steps or k == "eval/return")
                             and k != "charts/train_return"}, f"env step {steps} (epoch {epochs})")
        # A non-finite prediction ends its rollout (counted in the metrics); a branch in which every
        # rollout's first prediction was non-finite means the model itself is broken: stop.
        if metrics["model/nonfinite_branch"].any():
            raise utils.NonFiniteError(f"every model rollout of a branch was non-finite in the epoch ending at env "
                                       f"step {steps} (seeds {np.nonzero(metrics['model/nonfinite_branch'])[0].tolist()})")
        if metrics["model/nonfinite_predictions"].any():
            tqdm.write(f"env step {steps}: {metrics['model/nonfinite_predictions'].tolist()} non-finite model "
                       f"predictions per seed; those rollouts ended there")

    state, metrics, done_steps = utils.train_loop(
        run_dir, args, state, lambda s, i: chunk(s, i * args.epoch_length), args.total_timesteps // args.epoch_length,
        unit="epoch", check_metrics=check)
    run_dir.write_summary({"env_id": args.env_id, "backend": args.backend, "env_steps": done_steps,
                           "final_eval_return_mean": float(np.mean(metrics["eval/return"])),
                           "final_eval_return_per_seed": [float(x) for x in metrics["eval/return"]]})
    return run_dir, metrics


def evaluate_saved(path):
    args, trainer, state, steps = utils.load_saved(path, Args, make_train, seed_keys)
    eval_keys = jax.vmap(jax.random.fold_in, (0, None))(seed_keys(args), 12345)
    returns = jax.jit(jax.vmap(trainer.evaluate))(state.sac.actor, eval_keys)
    print(json.dumps({"run_dir": path, "env_steps": steps, "eval_return_per_seed": [float(r) for r in returns]}))
    return returns


def render_saved(path):
    """--render: one episode of the first seed's deterministic policy, written into the run dir."""
    args, _, state, _ = utils.load_saved(path, Args, make_train, seed_keys)
    actor = utils.first_seed(state.sac.actor)
    env, env_params = make_env(args)
    to_env = utils.to_env_actions(env, env_params)
    policy = lambda obs, carry, key: (to_env(deterministic_action(actor, obs)), carry)
    file, total = envs.render_episode(env, policy, None, jax.random.PRNGKey(args.seed), path)
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
