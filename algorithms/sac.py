"""SAC: Soft Actor-Critic (Haarnoja, Zhou, Abbeel, Levine 2018, "Off-policy maximum entropy deep
RL with a stochastic actor"), in the form of its follow-up (Haarnoja et al. 2018b, "Soft
Actor-Critic Algorithms and Applications", arXiv:1812.05905, Algorithm 1: two Q networks, no V
network, automatic entropy tuning), in one file, with every epoch of collect -> update compiled
by XLA and vmapped over seeds. Equation numbers below are 2018b's.

This is the "no model" baseline of MBPO (Janner et al. 2019, Fig. 3): exactly the SAC of
`algorithms/mbpo.py` (same networks, losses and update), but every batch comes from the real
replay buffer. `--updates-per-step` (G) is configurable: G = 1 is standard SAC, G = 20 is SAC
with MBPO's update-to-data ratio (the paper's comparison that isolates the model's effect).

    python algorithms/sac.py --seed 0                          # hopper, standard SAC (G = 1)
    python algorithms/sac.py --env-id inverted_pendulum --num-seeds 4 --updates-per-step 10
    python algorithms/sac.py --resume runs/<run-name>          # continue a killed run
    python algorithms/sac.py --evaluate runs/<run-name>        # evaluate its saved policy

What we follow (SAC's hyperparameters, and MBPO's reference SAC so the comparison is like for like):
* Two Q networks and a tanh-Gaussian policy, 2 x 256 ReLU MLPs; Adam 3e-4; batch 256;
  gamma 0.99; target networks by Polyak averaging with tau 5e-3; clipped double Q (the minimum
  of the two target Qs) in the target and in the policy loss.
* Automatic entropy tuning (2018b Sec. 5): alpha = exp(log_alpha), learned to keep
  the policy's entropy at a target; the target is MBPO's per-task value (PRESETS), else -|A|.
* `init_steps` uniform-random actions before learning; then one env step and G updates per step.

Choices (and why):
* Bootstrapping: the critic target uses (1 - terminated), never truncated (time limits are not
  part of the MDP); the buffer stores the true next observation (`info["final_observation"]`),
  never the post-reset one.
* Presets (total steps, epoch length, initial steps, target entropy) are MBPO's, so a SAC run
  and an MBPO run of the same task line up epoch for epoch. The SAC flags are named as in
  `mbpo.py` (`--sac-lr`, `--sac-batch-size`, ...), so one set of SAC flags drives both scripts.
* Evaluation: `eval_episodes` deterministic-policy episodes after every epoch, stepped until all
  have ended (the same returns as mbpo.py's fixed-length scan, much cheaper while episodes are short).
* Replay buffer: preallocated, capacity `total_timesteps` by default (nothing is ever discarded,
  as MBPO's real buffer); `--buffer-size` makes it a ring buffer of that size.
* A transition is sampled only once its episode has ended (`--add-at-episode-end`, the default),
  as in MBPO's reference, whose sampler (softlearning's `SimpleSampler`) adds a whole path to the
  pool at its end. (A full ring has then overwritten, with the episode in progress, rows that the
  reference would still sample; it holds `buffer_size` transitions in all, as the reference.)
* The run directory holds, beside the whole training state (checkpoint.eqx), the actors alone
  in actor.eqx: the leaves of `Actor` (each layer's weight (out, in), then bias) with a leading
  seed axis, written by `equinox.tree_serialise_leaves`. That file is the contract for programs
  that use a trained policy without this file (tdml.py's data policy): pi(s) = tanh(mean(s)).
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


# ---------------------------------------------------------------------------------------------
# Arguments. `None` means "the preset of --env-id" (PRESETS below, MBPO's App. C settings).
@dataclasses.dataclass
class Args(utils.Run):
    # experiment
    env_id: str = "hopper"
    """task: hopper, walker2d, halfcheetah, ant, humanoid, inverted_pendulum (presets), or any of envs.CONTINUOUS (pendulum: actions rescaled to its torque bounds)"""
    seed: int = 0
    """seed of the first run; vmapped seed i uses seed + i"""
    num_seeds: int = 1
    """independent seeds trained at once in one vmapped program"""
    total_timesteps: int | None = None
    """env steps (preset as MBPO: 125_000 hopper, 300_000 walker2d/ant/humanoid, 400_000 halfcheetah, 20_000 inverted_pendulum)"""
    backend: str = envs.DEFAULT_BACKEND
    """physics: gymnasium (Gymnasium's v4 task on MJX, the papers' task) or Brax's positional / generalized / spring / mjx (other tasks); recorded with the run"""
    epoch_length: int | None = None
    """env steps per epoch: the unit of evaluation, logging and checkpoints (preset 1000; 250 inverted_pendulum)"""
    init_steps: int | None = None
    """uniform-random-action steps before learning starts (preset 5000; 500 inverted_pendulum)"""
    eval_episodes: int = 5
    """deterministic-policy episodes per evaluation, at the end of every epoch"""
    buffer_size: int | None = None
    """replay-buffer capacity (default: total_timesteps, i.e. keep every transition); when full, the oldest are overwritten"""
    add_at_episode_end: bool = True
    """transitions are sampled only once their episode has ended, as MBPO's reference adds whole paths (at least one episode must end within init_steps); --no-add-at-episode-end: at once"""
    evaluate: str | None = None
    """only evaluate the policy saved in this run directory and print the returns"""
    render: str | None = None
    """only write one episode of this run's saved policy into its directory: episode.html (Brax's viewer)"""

    # agent (SAC)
    updates_per_step: int = 1
    """G, SAC gradient updates per env step (1 = standard SAC; 20 = MBPO's ratio on most tasks)"""
    target_entropy: float | None = None
    """entropy target of the automatic temperature tuning (preset per task as MBPO; else -action_size)"""
    init_alpha: float = 1.0
    """the temperature alpha at the start (softlearning's and the SAC paper's: 1)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 5e-3
    """target-network Polyak averaging rate"""
    sac_lr: float = 3e-4
    """Adam learning rate of actor, critics and temperature"""
    sac_batch_size: int = 256
    """transitions per gradient update, sampled uniformly from the replay buffer"""
    sac_width: int = 256
    """hidden units per layer of actor and critics"""
    sac_depth: int = 2
    """hidden layers of actor and critics"""


PRESETS = {  # MBPO App. C / reference configuration (the tasks SAC is compared on there)
    "inverted_pendulum": dict(total_timesteps=20_000, epoch_length=250, init_steps=500, target_entropy=-0.05),
    "hopper": dict(total_timesteps=125_000, target_entropy=-1.0),
    "walker2d": dict(total_timesteps=300_000, target_entropy=-3.0),
    "halfcheetah": dict(total_timesteps=400_000, target_entropy=-3.0),
    "ant": dict(total_timesteps=300_000, target_entropy=-4.0),
    "humanoid": dict(total_timesteps=300_000, target_entropy=-2.0),
}
DEFAULTS = dict(epoch_length=1000, init_steps=5000, total_timesteps=100_000)


def make_env(args: Args):
    """(env, params); `backend` picks the physics of the MuJoCo tasks (pendulum has one)."""
    return envs.make(args.env_id, **({"backend": args.backend} if args.env_id in envs.MUJOCO_TASKS else {}))


def resolve(args: Args) -> Args:
    """Fill `None` fields from the env's preset and check every argument (one-line errors)."""
    check = utils.check
    check(args.env_id in envs.NAMES, f"unknown env {args.env_id!r}; valid: {', '.join(envs.NAMES)}")
    check(args.env_id in envs.CONTINUOUS, f"SAC here needs a continuous-action task, not {args.env_id}")
    check(args.backend in envs.BACKENDS, f"unknown backend {args.backend!r}; valid: {', '.join(envs.BACKENDS)}")
    preset = {**DEFAULTS, **PRESETS.get(args.env_id, {})}
    filled = {k: (preset[k] if v is None and k in preset else v) for k, v in dataclasses.asdict(args).items()}
    if filled["target_entropy"] is None:  # the usual SAC heuristic: -|A|
        filled["target_entropy"] = -float(make_env(args)[0].action_size)
    if filled["buffer_size"] is None:
        filled["buffer_size"] = filled["total_timesteps"]
    args = Args(**filled)
    for name in ["num_seeds", "total_timesteps", "epoch_length", "eval_episodes", "buffer_size", "updates_per_step",
                 "sac_batch_size", "sac_width", "sac_depth"]:
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check(args.init_steps >= 0, f"--init-steps must be >= 0, got {args.init_steps}")
    check(args.sac_lr > 0, f"--sac-lr must be positive, got {args.sac_lr}")
    check(0.0 < args.gamma <= 1.0 and 0.0 < args.tau <= 1.0, "--gamma and --tau must be in (0, 1]")
    check(args.init_alpha > 0, f"--init-alpha must be positive, got {args.init_alpha}")
    check(args.total_timesteps % args.epoch_length == 0,
          f"--total-timesteps {args.total_timesteps} must be a multiple of --epoch-length {args.epoch_length}")
    check(args.total_timesteps > args.init_steps, "--total-timesteps must exceed --init-steps")
    check(args.sac_batch_size <= min(args.buffer_size, args.total_timesteps),
          f"--sac-batch-size {args.sac_batch_size} larger than the replay buffer can hold "
          f"({min(args.buffer_size, args.total_timesteps)} transitions)")
    return args


# ---------------------------------------------------------------------------------------------
# Networks (as in mbpo.py)
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
    """tanh-Gaussian action and its log-probability (with the tanh change of variables for bounded actions)."""
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
# Replay buffer: preallocated arrays, traced insert position and size.
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

    @staticmethod
    def empty(capacity, obs_size, action_size):
        f = partial(jnp.zeros, dtype=jnp.float32)
        return Buffer(Transition(f((capacity, obs_size)), f((capacity, action_size)), f(capacity),
                                 f((capacity, obs_size)), jnp.zeros(capacity, bool)), jnp.int32(0), jnp.int32(0))

    def add(self, transition: Transition):
        """Write one transition at `insert_pos`, overwriting the oldest once full (ring buffer)."""
        capacity = self.data.obs.shape[0]
        data = jax.tree.map(lambda rows, row: rows.at[self.insert_pos].set(row), self.data, Transition(*transition))
        return Buffer(data, (self.insert_pos + 1) % capacity, jnp.minimum(self.size + 1, capacity))

    def sample(self, key, n, hidden=0) -> Transition:
        """`n` rows drawn uniformly from all but the `hidden` newest (the episode in progress)."""
        capacity = self.data.obs.shape[0]
        oldest = jnp.where(self.size == capacity, self.insert_pos, 0)
        index = (oldest + jax.random.randint(key, (n,), 0, jnp.maximum(self.size - hidden, 1))) % capacity
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
    buffer: Buffer
    sac: SACState
    episode_return: jax.Array
    unfinished: jax.Array  # the newest buffer rows, of the episode in progress (0 with --no-add-at-episode-end)
    key: jax.Array


# ---------------------------------------------------------------------------------------------
# INIT
def sac_optimizer(args):
    return optax.adam(args.sac_lr)


def init(args, env, env_params, key):
    """A fresh run: the env's first state, the networks (target critics = critics), alpha = 1 and an
    empty replay buffer."""
    key, env_key, actor_key, critic_key = jax.random.split(key, 4)
    obs, env_state = env.reset(env_key, env_params)
    obs_size, action_size = env.obs_size, env.action_size
    actor = Actor(MLP(actor_key, obs_size, 2 * action_size, args.sac_width, args.sac_depth))
    critics = Critics(eqx.filter_vmap(lambda k: MLP(k, obs_size + action_size, 1, args.sac_width, args.sac_depth))(
        jax.random.split(critic_key, 2)))
    log_alpha = jnp.float32(np.log(args.init_alpha))
    adam = sac_optimizer(args)
    sac = SACState(actor, critics, critics, log_alpha, adam.init(eqx.filter(actor, eqx.is_array)),
                   adam.init(eqx.filter(critics, eqx.is_array)), adam.init(log_alpha))
    return RunnerState(env_state=env_state, obs=obs, buffer=Buffer.empty(args.buffer_size, obs_size, action_size),
                       sac=sac, episode_return=jnp.float32(0.0), unfinished=jnp.int32(0), key=key)


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
    # Actions live in [-1, 1] (tanh policy, random phase, buffer); the env gets them on its own bounds.
    next_obs, env_state, reward, terminated, truncated, info = env.step(
        step_key, runner.env_state, utils.to_env_actions(env, env_params)(action), env_params)
    # Store the true next observation and `terminated` alone (truncation is not an MDP end).
    buffer = runner.buffer.add(Transition(runner.obs, action, reward, info["final_observation"], terminated))
    done = terminated | truncated
    episode_return = runner.episode_return + reward
    unfinished = jnp.where(done, 0, runner.unfinished + 1) if args.add_at_episode_end else runner.unfinished
    runner = runner._replace(env_state=env_state, obs=next_obs, buffer=buffer, unfinished=unfinished,
                             episode_return=jnp.where(done, 0.0, episode_return))
    return runner, jnp.where(done, episode_return, jnp.nan)


# ---------------------------------------------------------------------------------------------
# UPDATE
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


def update(args, runner, key):
    """G SAC updates, each on a fresh uniform batch from the replay buffer (all but the episode in
    progress); the metrics are their means."""

    def one_update(sac, key):
        sample_key, update_key = jax.random.split(key)
        batch = runner.buffer.sample(sample_key, args.sac_batch_size, runner.unfinished)
        return sac_update(args, sac, batch, update_key)

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
# One epoch: Algorithm 1's loop over env steps, then an evaluation
def env_step(args, env, env_params, runner, t):
    """One env step, then G gradient steps once learning has begun (`t` is the unbatched global
    step, so under vmap this cond stays a branch). Before that the update's metrics are NaN."""
    key, collect_key, update_key = jax.random.split(runner.key, 3)
    runner, finished_return = collect(args, env, env_params, runner._replace(key=key), t < args.init_steps, collect_key)
    no_update = utils.nan_like(jax.eval_shape(partial(update, args), runner, update_key)[1])
    runner, sac_metrics = jax.lax.cond(t >= args.init_steps, partial(update, args), lambda r, k: (r, no_update),
                                       runner, update_key)
    return runner, (finished_return, sac_metrics)


def chunk(args, env, env_params, runner, start_step):
    """`epoch_length` env steps from `start_step` (shared by all seeds, unbatched), then an evaluation."""
    runner, (returns, sac_metrics) = jax.lax.scan(partial(env_step, args, env, env_params), runner,
                                                  start_step + jnp.arange(args.epoch_length))
    key, eval_key = jax.random.split(runner.key)
    runner = runner._replace(key=key)
    finished = jnp.isfinite(returns)
    metrics = {
        "env_steps": start_step + args.epoch_length,
        "eval/return": evaluate(args, env, env_params, runner.sac.actor, eval_key),
        # NaN when no training episode ended in this epoch (allowed by the host's NaN check).
        "charts/train_return": jnp.sum(jnp.where(finished, returns, 0.0)) / jnp.sum(finished),
        "charts/train_episodes": jnp.sum(finished),
        # Means over the epoch's updating steps (NaN if it had none: before learning starts).
        **{k: jnp.nanmean(v) for k, v in sac_metrics.items()},
    }
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
    args, run_dir = utils.open_run(args, Args, "sac", resolve)
    trainer = make_train(args)
    mesh = utils.seed_mesh(args)  # seeds split over the devices: each trains its own
    state = utils.over_devices(jax.vmap(trainer.init), mesh, donate=False)(utils.on_devices(seed_keys(args), mesh))
    chunk = utils.over_devices(jax.vmap(trainer.chunk, in_axes=(0, None)), mesh, replicated=1)

    def check(metrics, epochs):
        # Before learning starts the losses are NaN by design; after, every metric must be finite.
        learning = epochs * args.epoch_length > args.init_steps
        utils.assert_finite({k: v for k, v in metrics.items() if (learning or k == "eval/return")
                             and k != "charts/train_return"}, f"env step {epochs * args.epoch_length} (epoch {epochs})")

    state, metrics, done_steps = utils.train_loop(
        run_dir, args, state, lambda s, i: chunk(s, i * args.epoch_length), args.total_timesteps // args.epoch_length,
        unit="epoch", check_metrics=check, parts=lambda s: {"actor": s.sac.actor})  # actor.eqx: see the docstring
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
