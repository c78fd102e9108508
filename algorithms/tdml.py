"""TDML: Total Discounted Model Loss (Knight, Achiam 2019, "Training dynamics models for accurate
long-horizon prediction"), in one file: deterministic models f_theta(s, a) -> s' trained on a
fixed buffer of a deterministic policy's trajectories, by the one-step l2 loss (Eq. 1) or by the
approximate TDML of Algorithm 1 (a TD-learned critic D_psi(s, s_hat), Eq. 5-9), and judged by the
true TDML (Eq. 3) against the real physics. Chunks of iterations are compiled and vmapped over seeds.

    python algorithms/tdml.py --env-id hopper --policy-run benchmarks/results/tdml/sac_policy --arch slbo --loss tdml
    python algorithms/tdml.py --env-id hopper --policy-run benchmarks/results/tdml/sac_policy --loss one-step --num-seeds 4
    python algorithms/tdml.py --resume runs/<run-name>      # continue a killed run
    python algorithms/tdml.py --evaluate runs/<run-name>    # true TDML of the saved models on unseen start states

Fixed by the paper (Sec. 3-6, Algorithm 1, App. C): models of Table 1 (metrpo [1024, 1024],
mpo [512]*3 with weight normalization, slbo [500, 500] with L2 1e-5; ReLU, Adam 1e-3, no
normalization, no delta prediction, predictions clipped to [-1e6, 1e6], Sec. 6); l(x, y) =
||x - y||^2; the critic [1024, 1024] SELU, Adam 2e-4, batch 2048, trained by TD on pairs
(s_{i+k}, f_bar_theta^k(s_i)), k ~ U{1..kappa = 5}, with Eq. 8's target; every d = 10 critic steps
one model step on Eq. 9, then theta' and psi' move (tau_f = 0.005, tau_M = 1); f_bar(s) = f(s, pi(s))
(closed loop); the true TDML over 16 buffer states and 1000 real and model steps.

Choices where the paper is silent (the measurements behind them: benchmarks/README.md, "TDML"):
* The data policy is the mean action of a sac.py run's actor (read from its actor.eqx by this
  file's own copy of the network); trajectories differ only by their random start states.
* The real f is the physics alone (no termination, time limit or reset), as Eq. 3 sums every
  future step; env states are stored as `env.snapshot` vectors so the real env restarts exactly
  from any buffer state. s is `envs`' observation (the policy reads it, also on predicted states).
* One buffer for all vmapped seeds (seeds differ in init and minibatches); one-step uses the
  stored action (Eq. 1).
* The TD target: input, l term and bootstrap pair come from ONE chain s_hat_n = f_bar^n(s_i) of
  the online model (Eq. 6-8: y is a function of the critic's input). Algorithm 1's line, which
  builds y from theta' while the input comes from theta, is read as a typo and kept as
  `--critic-target algorithm1`; `target` uses theta' throughout. Both blow up (measured).
* The critic stays >= 0 as TDML does (`--critic-output clamp`: the regression sees the raw net,
  the bootstrap and Eq. 9 read max(D, 0)); its input is (s, s_hat - s), LeCun-normal SELU init.
* The model's Eq. 9 step draws its own batch of Table 1's size; the gradient flows through both
  model steps and the policy's input (not its weights); models update at t = d, 2d, ...
* Progress counts iterations of Algorithm 1 (`steps`; checkpoint.json's `env_steps` holds the
  same count): a critic step for tdml, a model step for one-step. `--total-steps` 200k, evaluated
  every 1000, on start states drawn from `--data-seed` and the evaluation's index alone, so every
  seed, loss and architecture is measured on the same states.
* Diagnostics (ours): eval/critic_tail vs eval/true_tail (the critic against the true discounted
  tail at (s_2, s_hat_2) of the evaluation rollouts), eval/grad_cos (the training loss's model
  gradient against the true TDML's, summed over --grad-horizon steps), and the true TDML of two
  trivial models on the same rollouts (eval/identity_tdml: nothing changes; eval/data_mean_tdml).
  `--eval-fixed-starts` keeps one set of evaluation states for the whole run.
* To isolate the objective (ours): `--init-model-run` starts from another run's saved model (a
  converged one-step model) and `--critic-warmup` trains the critic alone first.
* Resume: the policy is copied into the run directory (policy.eqx) and the buffer is rebuilt
  from it and `--data-seed`, so a resumed run is identical.
"""

import dataclasses
import json
import sys
from functools import partial
from pathlib import Path
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

ARCHS = {  # App. C, Table 1
    "metrpo": dict(model_layers=(1024, 1024), model_batch_size=1000, model_l2=0.0, weight_norm=False),
    "mpo": dict(model_layers=(512, 512, 512), model_batch_size=500, model_l2=0.0, weight_norm=True),
    "slbo": dict(model_layers=(500, 500), model_batch_size=256, model_l2=1e-5, weight_norm=False),
}
LOSSES = ("one-step", "tdml")
SNAPSHOT_TASKS = ("pendulum", *envs.MUJOCO_TASKS)  # envs whose states are stored and restored exactly
CRITIC_TARGETS = ("online", "target", "algorithm1")
CRITIC_OUTPUTS = ("clamp", "softplus", "linear")
POLICY_WIDTH, POLICY_DEPTH = 256, 2  # sac.py's default actor, the shape of a --random-policy one


# ---------------------------------------------------------------------------------------------
# Arguments. `None` means "the preset of --arch" (ARCHS above) or "read from --policy-run".
@dataclasses.dataclass
class Args(utils.Run):
    # experiment
    env_id: str = "walker2d"
    """a task with snapshots: walker2d (the paper's), hopper, any MuJoCo task on any backend, or pendulum"""
    seed: int = 0
    """seed of the first run (model and critic init, minibatches); vmapped seed i uses seed + i"""
    num_seeds: int = 1
    """independent seeds trained at once in one vmapped program (same data set)"""
    total_steps: int = 200_000
    """T, iterations of Algorithm 1 (tdml: critic steps, a model step every d; one-step: model steps)"""
    eval_every: int = 1_000
    """iterations per compiled chunk: true TDML is evaluated, metrics logged and a checkpoint saved after each"""
    backend: str = envs.DEFAULT_BACKEND
    """physics: gymnasium (Gymnasium's v4 task on MJX, the papers' task) or Brax's positional / generalized / spring / mjx (other tasks); recorded with the run"""
    evaluate: str | None = None
    """only compute the true TDML of the models saved in this run directory and print it"""

    # data set: the fixed replay buffer of a deterministic policy
    policy_run: str | None = None
    """SAC run directory (algorithms/sac.py) whose saved actor, as its deterministic mean action, is the policy pi"""
    policy_index: int = 0
    """which seed of a multi-seed SAC run gives the policy"""
    random_policy: bool = False
    """use an untrained, randomly initialized SAC actor as pi: for tests and smoke runs only, NOT the paper's setting"""
    policy_width: int | None = None
    """hidden units of pi's network (read from --policy-run; 256 with --random-policy)"""
    policy_depth: int | None = None
    """hidden layers of pi's network (read from --policy-run; 2 with --random-policy)"""
    data_seed: int = 0
    """seed of the data set's start states, of the evaluation start states and of a --random-policy actor"""
    num_trajectories: int = 1_000
    """N, trajectories in the buffer (paper: 1000)"""
    trajectory_length: int = 1_000
    """H, physics steps per trajectory (paper: 1000, i.e. 10^6 transitions)"""

    # model f_theta (App. C, Table 1)
    arch: str = "metrpo"
    """metrpo ([1024, 1024] ReLU, batch 1000), mpo ([512, 512, 512] ReLU, weight norm, batch 500), slbo ([500, 500] ReLU, batch 256, L2 1e-5)"""
    model_layers: tuple[int, ...] | None = None
    """hidden layer widths (preset by --arch)"""
    model_batch_size: int | None = None
    """transitions per model step (preset by --arch)"""
    model_l2: float | None = None
    """L2 coefficient lambda on the weight matrices (preset by --arch)"""
    weight_norm: bool | None = None
    """weight normalization on every layer (preset by --arch)"""
    model_lr: float = 1e-3
    """Adam learning rate of the model (0 freezes it: critic probes)"""
    clip: float = 1e6
    """model predictions are clipped to [-clip, clip] (Sec. 6); inf disables it (App. B)"""
    init_model_run: str | None = None
    """a tdml.py run (e.g. a converged --loss one-step run) whose saved model starts this run's model and target model: its seed i for seed i, or its one seed for all; same env and architecture"""
    critic_warmup: int = 0
    """iterations of Algorithm 1 with the model frozen before its first step, so that the critic first learns the starting model's TDML (counted in --total-steps)"""

    # objective
    loss: str = "tdml"
    """one-step (Eq. 1) or tdml (approximate TDML, Algorithm 1)"""
    gamma: float = 0.9
    """TDML discount (paper: 0.9 and 0.95): of the critic and of the true-TDML metric"""

    # TDML network D_psi (App. C, Table 2; only with --loss tdml)
    critic_layers: tuple[int, ...] = (1024, 1024)
    """hidden layer widths (SELU)"""
    critic_lr: float = 2e-4
    """Adam learning rate of the critic"""
    critic_batch_size: int = 2048
    """n, (s, s_hat) pairs per critic step"""
    update_delay: int = 10
    """d, critic steps per model step"""
    kappa: int = 5
    """max rollout length: k ~ U{1..kappa}"""
    tau_model: float = 0.005
    """tau_f, Polyak rate of the target model (applied at every model step)"""
    tau_critic: float = 1.0
    """tau_M, Polyak rate of the target critic (applied at every model step; 1 = copy)"""
    critic_target: str = "online"
    """model whose chain s_hat_k = f_bar^k(s_i), s_hat_{k+1} = f_bar(s_hat_k) gives the critic's input AND its TD target: online (theta, Eq. 6-8), target (theta'); algorithm1: Algorithm 1 literally, input from theta but y from theta' (diverges, see the docstring)"""
    critic_output: str = "clamp"
    """clamp: D_psi = max(net, 0) where it is used (TD bootstrap, model loss), the raw net regressed on y; softplus: D_psi = softplus(net) everywhere; linear: the raw net (can go negative where it was never trained)"""

    # evaluation
    eval_starts: int = 16
    """buffer states the true TDML is averaged over"""
    eval_fixed_starts: bool = False
    """the same start states at every evaluation (drawn once from --data-seed), so that a curve follows training, not the draw; default: new ones each time"""
    eval_horizon: int = 1_000
    """steps the real env and the model are rolled in parallel for the true TDML"""
    n_step: int = 5
    """n of the open- and closed-loop n-step losses (Sec. 3.1, Eq. 2), reported for reference"""
    grad_horizon: int | None = None
    """steps of the true TDML that are differentiated for eval/grad_cos (its gradient against the training loss's); default min(100, eval horizon)"""
    n_step_batch: int = 256
    """buffer segments the n-step losses are averaged over"""
    eval_gammas: tuple[float, ...] = ()
    """more discounts to report the true TDML at (eval/true_tdml_gamma<g>): a one-step model, which does not depend on gamma, is measured at both of the paper's from one run"""


def resolve(args: Args) -> Args:
    """Fill `None` fields from --arch and --policy-run and check every argument (one-line errors)."""
    check = utils.check
    check(args.env_id in envs.NAMES, f"unknown env {args.env_id!r}; valid: {', '.join(envs.NAMES)}")
    check(args.env_id in SNAPSHOT_TASKS, f"TDML needs a task with snapshots (a MuJoCo task or pendulum), not {args.env_id}")
    check(args.backend in envs.BACKENDS, f"unknown backend {args.backend!r}; valid: {', '.join(envs.BACKENDS)}")
    check(args.arch in ARCHS, f"unknown --arch {args.arch!r}; valid: {', '.join(ARCHS)}")
    check(args.loss in LOSSES, f"unknown --loss {args.loss!r}; valid: {', '.join(LOSSES)}")
    check(args.critic_target in CRITIC_TARGETS,
          f"unknown --critic-target {args.critic_target!r}; valid: {', '.join(CRITIC_TARGETS)}")
    check(args.critic_output in CRITIC_OUTPUTS,
          f"unknown --critic-output {args.critic_output!r}; valid: {', '.join(CRITIC_OUTPUTS)}")
    check((args.policy_run is not None) != args.random_policy,
          "give exactly one of --policy-run runs/<sac-run> (a trained SAC policy, as the paper) or --random-policy (tests only)")
    filled = {k: (ARCHS[args.arch][k] if v is None and k in ARCHS[args.arch] else v)
              for k, v in dataclasses.asdict(args).items()}
    if args.random_policy:
        for name, default in [("policy_width", POLICY_WIDTH), ("policy_depth", POLICY_DEPTH)]:
            filled[name] = default if filled[name] is None else filled[name]
    else:
        path = Path(args.policy_run)
        check((path / "args.json").exists() and (path / "actor.eqx").exists(),
              f"no SAC run with a saved actor (actor.eqx) at --policy-run {args.policy_run} (train one with algorithms/sac.py)")
        sac_args = json.loads((path / "args.json").read_text())
        check(sac_args.get("env_id") == args.env_id,
              f"--policy-run {args.policy_run} is a {sac_args.get('env_id')} policy, not {args.env_id}")
        check(0 <= args.policy_index < sac_args.get("num_seeds", 1),
              f"--policy-index {args.policy_index} out of range: the SAC run has {sac_args.get('num_seeds', 1)} seeds")
        for mine, theirs in [("policy_width", "sac_width"), ("policy_depth", "sac_depth")]:
            check(filled[mine] in (None, sac_args[theirs]),
                  f"--{mine.replace('_', '-')} {filled[mine]} differs from the SAC run's {sac_args[theirs]}")
            filled[mine] = sac_args[theirs]
    if filled["grad_horizon"] is None:
        filled["grad_horizon"] = min(100, filled["eval_horizon"])
    args = Args(**filled)
    for name in ["num_seeds", "total_steps", "eval_every", "num_trajectories", "trajectory_length", "model_batch_size",
                 "critic_batch_size", "update_delay", "kappa", "eval_starts", "eval_horizon", "n_step", "n_step_batch",
                 "policy_width", "policy_depth"]:
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["model_layers", "critic_layers"]:
        check(all(w > 0 for w in getattr(args, name)), f"--{name.replace('_', '-')} widths must be positive")
    check(args.model_lr >= 0 and args.critic_lr > 0, "--model-lr must be >= 0 and --critic-lr positive")
    check(args.model_l2 >= 0, f"--model-l2 must be >= 0, got {args.model_l2}")
    check(args.clip > 0, f"--clip must be positive (inf disables clipping), got {args.clip}")
    check(0.0 < args.gamma < 1.0, f"--gamma must be in (0, 1) (an infinite-horizon sum), got {args.gamma}")
    check(all(0.0 < g < 1.0 for g in args.eval_gammas), f"--eval-gammas must be in (0, 1), got {args.eval_gammas}")
    check(0.0 < args.tau_model <= 1.0 and 0.0 < args.tau_critic <= 1.0, "--tau-model and --tau-critic must be in (0, 1]")
    check(args.total_steps % args.eval_every == 0,
          f"--total-steps {args.total_steps} must be a multiple of --eval-every {args.eval_every}")
    check(args.loss == "one-step" or args.eval_every % args.update_delay == 0,
          f"--eval-every {args.eval_every} must be a multiple of --update-delay {args.update_delay} (model steps per chunk)")
    check(args.loss == "one-step" or args.trajectory_length >= args.kappa + 1,
          f"--trajectory-length {args.trajectory_length} must be >= --kappa + 1 (the critic needs s_(i+k+1))")
    check(args.trajectory_length >= args.n_step, f"--trajectory-length must be >= --n-step {args.n_step}")
    check(2 <= args.grad_horizon <= args.eval_horizon,
          f"--grad-horizon {args.grad_horizon} must be in [2, --eval-horizon {args.eval_horizon}]")
    check(args.critic_warmup >= 0, f"--critic-warmup must be >= 0, got {args.critic_warmup}")
    if args.init_model_run is not None:
        path = Path(args.init_model_run)
        check((path / "args.json").exists() and (path / "checkpoint.eqx").exists(),
              f"no tdml.py run with a checkpoint at --init-model-run {args.init_model_run}")
        other, mine = json.loads((path / "args.json").read_text()), json.loads(json.dumps(dataclasses.asdict(args)))
        for name in ("env_id", "backend", "model_layers", "weight_norm", "clip"):
            check(other.get(name) == mine[name], f"--init-model-run {args.init_model_run} has {name} {other.get(name)}, not {mine[name]}")
        check(other.get("num_seeds", 1) in (1, args.num_seeds),
              f"--init-model-run has {other.get('num_seeds')} seeds: give it 1 or --num-seeds {other.get('num_seeds')}")
    return args


# ---------------------------------------------------------------------------------------------
# The real system: f and pi as pure functions, so the TD machinery runs on any dynamics (a Brax
# task here, a linear system in the tests).
class System(NamedTuple):
    obs_size: int
    action_size: int
    reset: callable  # key -> state, a random start state
    step: callable  # (state, action) -> state: f, the physics alone (no termination, reset, time limit)
    observe: callable  # state -> observation s
    snapshot: callable  # state -> flat float32 vector (what the buffer stores)
    restore: callable  # vector -> state
    policy: callable  # (policy_params, observation) -> action: the deterministic pi


def make_env(args: Args):
    """(env, params); `backend` picks the physics of the MuJoCo tasks (pendulum has one)."""
    return envs.make(args.env_id, **({"backend": args.backend} if args.env_id in envs.MUJOCO_TASKS else {}))


def env_system(env) -> System:
    """An env of `envs` with snapshots (the MuJoCo tasks, pendulum) as the real system. The policy
    acts in [-1, 1], mapped onto the env's action bounds as SAC's policy is (`to_env_actions`)."""
    params = env.default_params
    to_env = utils.to_env_actions(env, params)
    return System(
        obs_size=env.obs_size, action_size=env.action_size,
        reset=lambda key: env.reset_env(key, params)[1],
        step=lambda state, action: env.step_env(jax.random.PRNGKey(0), state, to_env(action), params)[1],
        observe=lambda state: env.get_obs(state, params),
        snapshot=env.snapshot, restore=env.restore,
        policy=lambda actor, obs: actor(obs),
    )


# ---------------------------------------------------------------------------------------------
# Networks
class Dense(eqx.Module):
    weight: jax.Array  # (out, in); under weight normalization the direction v
    bias: jax.Array
    scale: jax.Array | None  # g of weight normalization (W = g v / ||v|| per output unit), None without

    def __init__(self, key, n_in, n_out, init="uniform", weight_norm=False):
        w_key, b_key = jax.random.split(key)
        if init == "lecun":  # N(0, 1/fan_in), zero bias: the self-normalizing init of SELU nets
            self.weight = jax.random.normal(w_key, (n_out, n_in)) / np.sqrt(n_in)
            self.bias = jnp.zeros(n_out)
        else:  # uniform(+-1/sqrt(fan_in)), torch's default
            bound = 1.0 / np.sqrt(n_in)
            self.weight = jax.random.uniform(w_key, (n_out, n_in), minval=-bound, maxval=bound)
            self.bias = jax.random.uniform(b_key, (n_out,), minval=-bound, maxval=bound)
        self.scale = jnp.linalg.norm(self.weight, axis=1) if weight_norm else None

    def __call__(self, x):
        w = self.weight
        if self.scale is not None:
            w = self.scale[:, None] * w / jnp.linalg.norm(w, axis=1, keepdims=True)
        return w @ x + self.bias


class MLP(eqx.Module):
    """MLP with a named activation (a string, so the module is a plain pytree for lax.scan)."""

    layers: list
    activation: str = eqx.field(static=True)

    def __init__(self, key, in_size, out_size, hidden, activation, init="uniform", weight_norm=False):
        sizes = [in_size, *hidden, out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [Dense(k, i, o, init, weight_norm) for k, i, o in zip(keys, sizes[:-1], sizes[1:])]
        self.activation = activation

    def __call__(self, x):
        act = {"relu": jax.nn.relu, "selu": jax.nn.selu}[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)


class Model(eqx.Module):
    """f_theta(s, a) -> s': the next state itself (no deltas, no normalization), clipped (Sec. 6)."""

    net: MLP
    clip: float = eqx.field(static=True)

    def __call__(self, obs, action):
        return jnp.clip(self.net(jnp.concatenate([obs, action])), -self.clip, self.clip)


class Critic(eqx.Module):
    """D_psi(s, s_hat), the TDML approximator, on (s, s_hat - s), kept >= 0 as TDML is (--critic-output)."""

    net: MLP
    output: str = eqx.field(static=True, default="clamp")

    def fit_value(self, obs, obs_hat):
        """What the TD regression (Eq. 5) fits: the raw net (clamp, linear), so its gradient never vanishes."""
        value = self.net(jnp.concatenate([obs, obs_hat - obs]))[0]
        return jax.nn.softplus(value) if self.output == "softplus" else value

    def __call__(self, obs, obs_hat):
        """D_psi as the TD bootstrap and the model's loss (Eq. 8, 9) use it."""
        value = self.fit_value(obs, obs_hat)
        return jnp.maximum(value, 0.0) if self.output == "clamp" else value


class Actor(eqx.Module):
    """The data policy pi, as sac.py saves it in actor.eqx (a ReLU MLP to the mean and log-std of
    a tanh-Gaussian, leaves weight (out, in), bias per layer): pi(s) = tanh(mean), deterministic.
    A copy, so this file loads a policy without importing sac.py; the file format is the contract."""

    net: MLP

    def __call__(self, obs):
        return jnp.tanh(jnp.split(self.net(obs), 2)[0])


def l2(x, y):
    """The per-timestep loss l(x, y) = ||x - y||_2^2 (over the last axis)."""
    return jnp.sum((x - y) ** 2, axis=-1)


def weight_l2(model):
    return sum(jnp.sum(layer.weight**2) for layer in model.net.layers)


# ---------------------------------------------------------------------------------------------
class Data(NamedTuple):
    """The fixed replay buffer: N trajectories of H steps, time-major (as `lax.scan` stacks them)."""

    obs: jax.Array  # (H + 1, N, obs_size): s_0 .. s_H
    action: jax.Array  # (H, N, action_size): a_t = pi(s_t)
    snapshot: jax.Array  # (H + 1, N, snapshot_size): the env state of every s_t


class EvalBatch(NamedTuple):
    """What an evaluation needs from the real system (model-independent: shared by all seeds)."""

    start_snapshot: jax.Array  # (eval_starts, snapshot_size)
    real_obs: jax.Array  # (eval_horizon + 1, eval_starts, obs): f_bar^n(s) for n = 0..eval_horizon
    data_mean: jax.Array  # (obs,): the mean buffer state, a trivial model's constant prediction
    segment_obs: jax.Array  # (n_step + 1, n_step_batch, obs): s_t .. s_{t+n}
    segment_action: jax.Array  # (n_step, n_step_batch, action): a_t .. a_{t+n-1}


class RunnerState(NamedTuple):
    model: Model
    model_opt: optax.OptState
    target_model: Model | None  # theta' (tdml only)
    critic: Critic | None  # psi (tdml only)
    critic_opt: optax.OptState | None
    target_critic: Critic | None  # psi' (tdml only)
    model_updates: jax.Array
    key: jax.Array


# ---------------------------------------------------------------------------------------------
# The phases, in data order: DATA (the fixed buffer of f under pi), UPDATE CRITIC (Eq. 5-8),
# UPDATE MODEL (Eq. 1 or Eq. 9), one iteration of Algorithm 1, EVALUATE (true TDML, Eq. 3).
def act(system, policy, obs):
    return jax.vmap(system.policy, (None, 0))(policy, obs)


def closed_loop(system, model, policy, obs, steps):
    """s_hat_0 = obs, s_hat_{n+1} = f_theta(s_hat_n, pi(s_hat_n)): (steps + 1, B, obs)."""

    def step(s, _):
        s = jax.vmap(model)(s, act(system, policy, s))
        return s, s

    _, states = jax.lax.scan(step, obs, None, length=steps)
    return jnp.concatenate([obs[None], states])


# --- DATA -----------------------------------------------------------------------------------
def make_data(args, system, policy, key):
    """N trajectories of H steps of f under pi from random start states."""
    state = jax.vmap(system.reset)(jax.random.split(jax.random.fold_in(key, 0), args.num_trajectories))

    def step(state, _):
        obs = jax.vmap(system.observe)(state)
        action = act(system, policy, obs)
        return jax.vmap(system.step)(state, action), (obs, action, jax.vmap(system.snapshot)(state))

    # H + 1 steps, the last one's step unused: the stacked outputs are the buffer, without a
    # concatenation that would copy the (large) snapshots.
    _, (obs, action, snapshot) = jax.lax.scan(step, state, None, length=args.trajectory_length + 1)
    return Data(obs, action[:args.trajectory_length], snapshot)


# --- init -------------------------------------------------------------------------------------
def model_optimizer(args):
    return optax.adam(args.model_lr)


def critic_optimizer(args):
    return optax.adam(args.critic_lr)


def init(args, system, key):
    tdml = args.loss == "tdml"
    key, model_key, critic_key = jax.random.split(key, 3)
    model = Model(MLP(model_key, system.obs_size + system.action_size, system.obs_size, args.model_layers, "relu",
                      weight_norm=args.weight_norm), args.clip)
    critic = critic_opt = None
    if tdml:
        critic = Critic(MLP(critic_key, 2 * system.obs_size, 1, args.critic_layers, "selu", init="lecun"),
                        args.critic_output)
        critic_opt = critic_optimizer(args).init(eqx.filter(critic, eqx.is_array))
    return RunnerState(model, model_optimizer(args).init(eqx.filter(model, eqx.is_array)),
                       model if tdml else None, critic, critic_opt, critic if tdml else None, jnp.int32(0), key)


# --- UPDATE CRITIC (Eq. 5-8) ------------------------------------------------------------------
def sample_critic_batch(args, data, key):
    """s_i, s_{i+k}, s_{i+k+1} of random trajectories, k ~ U{1..kappa}, i ~ U[0, H - k)."""
    j_key, k_key, i_key = jax.random.split(key, 3)
    j = jax.random.randint(j_key, (args.critic_batch_size,), 0, args.num_trajectories)
    k = jax.random.randint(k_key, (args.critic_batch_size,), 1, args.kappa + 1)
    i = jax.random.randint(i_key, (args.critic_batch_size,), 0, args.trajectory_length - k)
    return data.obs[i, j], data.obs[i + k, j], data.obs[i + k + 1, j], k


def critic_update(args, system, critic, critic_opt, target_critic, target_model, model, policy, batch):
    """One Adam step on (D_psi(s_{i+k}, s_hat_k) - y)^2 with Eq. 8's target
    y = l(s_{i+k}, s_hat_k) + gamma D_psi'(s_{i+k+1}, s_hat_{k+1}): input, l term and bootstrap
    pair from ONE chain s_hat_n = f_bar^n(s_i) of the --critic-target model, so y is a
    function of the critic's input (the Bellman equation Eq. 4 in s_hat)."""
    s_i, s_ik, s_ik1, k = batch
    rows = jnp.arange(k.shape[0])
    chain_model = target_model if args.critic_target == "target" else model
    chain = closed_loop(system, chain_model, policy, s_i, args.kappa + 1)  # s_hat_0..kappa+1
    hat_k, hat_k1 = chain[k, rows], chain[k + 1, rows]
    if args.critic_target == "algorithm1":  # Algorithm 1 literally: y from theta', input from theta
        literal = closed_loop(system, target_model, policy, s_i, args.kappa + 1)
        y = l2(s_ik, literal[k, rows]) + args.gamma * jax.vmap(target_critic)(s_ik1, literal[k + 1, rows])
    else:
        y = l2(s_ik, hat_k) + args.gamma * jax.vmap(target_critic)(s_ik1, hat_k1)  # Eq. 8

    def loss_fn(critic):
        value = jax.vmap(critic.fit_value)(s_ik, hat_k)
        return jnp.mean((value - jax.lax.stop_gradient(y)) ** 2), value

    (loss, value), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(critic)
    updates, critic_opt = critic_optimizer(args).update(grads, critic_opt)
    return eqx.apply_updates(critic, updates), critic_opt, {
        "losses/critic": loss, "charts/critic_value": jnp.mean(value), "charts/td_target": jnp.mean(y)}


# --- UPDATE MODEL (Eq. 1 or Eq. 9) ------------------------------------------------------------
def sample_model_batch(args, data, key, span):
    """s_t .. s_{t+span} and a_t of random trajectories, t ~ U[0, H - span]."""
    j_key, t_key = jax.random.split(key)
    j = jax.random.randint(j_key, (args.model_batch_size,), 0, args.num_trajectories)
    t = jax.random.randint(t_key, (args.model_batch_size,), 0, args.trajectory_length - span + 1)
    return [data.obs[t + n, j] for n in range(span + 1)], data.action[t, j]


def one_step_loss(args, system, model, batch, critic, policy):
    """Eq. 1: l(f_theta(s_t, a_t), s_{t+1}) with the stored action."""
    (s0, s1), a0 = batch
    one_step = jnp.mean(l2(jax.vmap(model)(s0, a0), s1))
    return one_step + args.model_l2 * weight_l2(model), {"losses/model": one_step, "losses/one_step": one_step}


def tdml_loss(args, system, model, batch, critic, policy):
    """Eq. 9: l(s_{t+1}, f_bar_theta(s_t)) + gamma D_psi(s_{t+2}, f_bar_theta^2(s_t)); the
    gradient flows through both model steps and the policy's input."""
    (s0, s1, s2), _ = batch
    _, hat1, hat2 = closed_loop(system, model, policy, s0, 2)
    one_step = l2(s1, hat1)
    value = jax.vmap(critic)(s2, hat2)
    objective = jnp.mean(one_step + args.gamma * value)
    return objective + args.model_l2 * weight_l2(model), {
        "losses/model": objective, "losses/one_step": jnp.mean(one_step),
        "charts/critic_at_model_query_min": jnp.min(value)}  # < 0 only if the critic is not >= 0


def model_loss(args, system, model, batch, critic, policy):
    """The loss --loss names: (scalar, metrics)."""
    return (tdml_loss if args.loss == "tdml" else one_step_loss)(args, system, model, batch, critic, policy)


def model_update(args, system, model, model_opt, critic, policy, batch):
    loss = partial(model_loss, args, system)
    (_, metrics), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, batch, critic, policy)
    updates, model_opt = model_optimizer(args).update(grads, model_opt, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), model_opt, metrics


def polyak(target, online, tau):
    return jax.tree.map(lambda t, o: (1 - tau) * t + tau * o, target, online)


# --- one iteration of Algorithm 1 ---------------------------------------------------------------
NO_MODEL_STEP = ("losses/model", "losses/one_step", "charts/critic_at_model_query_min")  # a model step's metrics


def iteration(args, system, data, policy, runner, t):
    """Iteration t (1-based, unbatched): a critic step, then every d-th time a model step and
    the target updates (tdml); or one model step on Eq. 1 (one-step)."""
    key, critic_key, model_key = jax.random.split(runner.key, 3)
    runner = runner._replace(key=key)
    if args.loss != "tdml":
        model, model_opt, metrics = model_update(args, system, runner.model, runner.model_opt, None, policy,
                                                 sample_model_batch(args, data, model_key, 1))
        runner = runner._replace(model=model, model_opt=model_opt, model_updates=runner.model_updates + 1)
        return runner, (metrics, jnp.isfinite(metrics["losses/model"]))

    critic, critic_opt, critic_metrics = critic_update(
        args, system, runner.critic, runner.critic_opt, runner.target_critic, runner.target_model, runner.model,
        policy, sample_critic_batch(args, data, critic_key))
    runner = runner._replace(critic=critic, critic_opt=critic_opt)

    def update_model_and_targets(runner):
        model, model_opt, metrics = model_update(args, system, runner.model, runner.model_opt, runner.critic, policy,
                                                 sample_model_batch(args, data, model_key, 2))
        return runner._replace(
            model=model, model_opt=model_opt, model_updates=runner.model_updates + 1,
            target_model=polyak(runner.target_model, model, args.tau_model),
            target_critic=polyak(runner.target_critic, runner.critic, args.tau_critic)), metrics

    # Between model steps (and in the critic's warm-up) the model metrics read NaN (the chunk averages
    # them with nanmean).
    model_step = (t % args.update_delay == 0) & (t > args.critic_warmup)
    runner, metrics = jax.lax.cond(model_step, update_model_and_targets,
                                   lambda r: (r, {k: jnp.nan for k in NO_MODEL_STEP}), runner)
    model_finite = ~model_step | jnp.isfinite(metrics["losses/model"])
    finite = jnp.isfinite(critic_metrics["losses/critic"]) & model_finite
    return runner, ({**critic_metrics, **metrics}, finite)


# --- EVALUATE ---------------------------------------------------------------------------------
def eval_batch(args, system, data, policy, eval_index):
    """Start states and the real rollouts of evaluation `eval_index` (of evaluation 0 at every one
    with --eval-fixed-starts), from `--data-seed` alone (not a seed's key: shared by all seeds)."""
    eval_index = 0 if args.eval_fixed_starts else eval_index
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(args.data_seed), 1), eval_index)
    j_key, i_key, seg_j_key, seg_t_key = jax.random.split(key, 4)
    N, H = args.num_trajectories, args.trajectory_length
    j = jax.random.randint(j_key, (args.eval_starts,), 0, N)
    i = jax.random.randint(i_key, (args.eval_starts,), 0, H + 1)  # any stored state
    start = data.snapshot[i, j]

    def step(state, _):
        state = jax.vmap(system.step)(state, act(system, policy, jax.vmap(system.observe)(state)))
        return state, jax.vmap(system.observe)(state)

    state = jax.vmap(system.restore)(start)
    _, real = jax.lax.scan(step, state, None, length=args.eval_horizon)
    real = jnp.concatenate([jax.vmap(system.observe)(state)[None], real])
    j = jax.random.randint(seg_j_key, (args.n_step_batch,), 0, N)
    t = jax.random.randint(seg_t_key, (args.n_step_batch,), 0, H - args.n_step + 1)
    segment_obs = jnp.stack([data.obs[t + n, j] for n in range(args.n_step + 1)])
    segment_action = jnp.stack([data.action[t + n, j] for n in range(args.n_step)])
    return EvalBatch(start, real, jnp.mean(data.obs, (0, 1)), segment_obs, segment_action)


def evaluate(args, system, model, policy, batch, critic=None):
    """True TDML (Eq. 3) from the batch's start states, and the n-step losses (Eq. 2). With a
    critic, also its value at the pair (s_2, s_hat_2) of each evaluation rollout (the pair
    Eq. 9 queries) beside the true discounted tail sum_{n >= 2} gamma^(n-2) l(s_n, s_hat_n)."""
    real = batch.real_obs
    predicted = closed_loop(system, model, policy, real[0], args.eval_horizon)
    per_step = l2(real, predicted)  # (eval_horizon + 1, starts)
    discount = args.gamma ** jnp.arange(args.eval_horizon + 1)[:, None]

    def true_tdml_at(gamma):  # Eq. 3, per start state
        return jnp.sum(gamma ** jnp.arange(args.eval_horizon + 1)[:, None] * per_step, 0)

    true_tdml = jnp.sum(discount * per_step, 0)
    # Trivial models on the same rollouts, the lines a learned model must beat: "nothing changes"
    # (s_hat_n = s_0) and the buffer's mean state (s_hat_n = mean for n >= 1).
    constant = {"identity": real[0], "data_mean": jnp.broadcast_to(batch.data_mean, real[0].shape)}
    trivial = {f"eval/{name}_tdml": jnp.mean(jnp.sum(discount[1:] * l2(real[1:], s_hat[None]), 0))
               for name, s_hat in constant.items()}
    extra = {}
    if critic is not None:
        true_tail = jnp.sum(discount[:-2] * per_step[2:], 0)
        value = jax.vmap(critic)(real[2], predicted[2])
        extra = {"eval/critic_tail": jnp.mean(value), "eval/true_tail": jnp.mean(true_tail),
                 "eval/critic_tail_log_ratio": jnp.mean(jnp.log(jnp.maximum(value, 1e-6) / jnp.maximum(true_tail, 1e-6)))}

    # Does the training loss descend the true TDML? The cosine between its gradient (Eq. 1 or
    # Eq. 9, on the start states, a_t = pi(s_t)) and the gradient of the true TDML (Eq. 3
    # summed to --grad-horizon). Where either is not finite (an exploded rollout) it reads 0,
    # and eval/grad_finite says how often.
    def true_objective(model):
        chain = closed_loop(system, model, policy, real[0], args.grad_horizon)
        return jnp.mean(jnp.sum(discount[:args.grad_horizon + 1] * l2(real[:args.grad_horizon + 1], chain), 0))

    tdml = args.loss == "tdml"
    if not tdml or critic is not None:
        train_batch = ((real[0], real[1], real[2]), None) if tdml else ((real[0], real[1]), act(system, policy, real[0]))
        g_true = eqx.filter_grad(true_objective)(model)
        g_train = eqx.filter_grad(lambda m: model_loss(args, system, m, train_batch, critic, policy)[0])(model)
        flat = [jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)]) for g in (g_true, g_train)]
        cos = jnp.dot(*flat) / (jnp.linalg.norm(flat[0]) * jnp.linalg.norm(flat[1]))
        finite = jnp.isfinite(cos)
        extra.update({"eval/grad_cos": jnp.where(finite, cos, 0.0), "eval/grad_finite": finite})

    def open_step(s, action):
        s = jax.vmap(model)(s, action)
        return s, s

    seg = batch.segment_obs
    _, open_pred = jax.lax.scan(open_step, seg[0], batch.segment_action)
    open_loss = l2(open_pred, seg[1:])  # (n, batch); the i = 0 term of Eq. 2 is 0
    closed_loss = l2(closed_loop(system, model, policy, seg[0], args.n_step)[1:], seg[1:])
    return {
        "eval/true_tdml": jnp.mean(true_tdml),
        "eval/true_tdml_median": jnp.median(true_tdml),
        **trivial,
        "eval/final_step_error": jnp.mean(per_step[-1]),
        "eval/clipped_frac": jnp.mean(jnp.any(jnp.abs(predicted) >= args.clip, -1)),  # share of (step, rollout) pairs at the clip
        "eval/one_step": jnp.mean(open_loss[0]),
        "eval/open_loop_n_step": jnp.mean(jnp.sum(open_loss, 0)),
        "eval/closed_loop_n_step": jnp.mean(jnp.sum(closed_loss, 0)),
        **{f"eval/true_tdml_gamma{g}": jnp.mean(true_tdml_at(g)) for g in args.eval_gammas},
        **extra,
    }


# --- one chunk: eval_every iterations, then an evaluation ----------------------------------------
def chunk(args, system, runner, data, policy, batch, start_step):
    """`start_step` is unbatched, so "every d steps" is a real branch even under `vmap`."""
    steps = start_step + 1 + jnp.arange(args.eval_every)
    runner, (metrics, finite) = jax.lax.scan(lambda r, t: iteration(args, system, data, policy, r, t), runner, steps)
    return runner, {
        "steps": start_step + args.eval_every,
        "charts/model_updates": runner.model_updates,
        # Means over the chunk's iterations (model losses: over its model steps only).
        **{k: jnp.nanmean(v) for k, v in metrics.items()},
        # The first iteration with a non-finite loss, -1 if none (the host names it).
        "debug/first_nonfinite_step": jnp.where(jnp.all(finite), -1, steps[jnp.argmin(finite)]),
        **evaluate(args, system, runner.model, policy, batch, runner.critic),
    }


def train(args, system, key, data, policy):
    """The whole run as one pure function: (state, metrics of every chunk)."""
    runner = init(args, system, key)

    def one_chunk(runner, c):
        return chunk(args, system, runner, data, policy, eval_batch(args, system, data, policy, c), c * args.eval_every)

    return jax.lax.scan(one_chunk, runner, jnp.arange(args.total_steps // args.eval_every))


class Trainer(NamedTuple):
    """The phases above bound to `args` and `system`."""

    make_data: callable  # (policy, key) -> Data: the fixed buffer (one for all seeds)
    init: callable  # key -> RunnerState
    eval_batch: callable  # (data, policy, eval_index) -> EvalBatch: the real rollouts of an evaluation
    chunk: callable  # (state, data, policy, eval_batch, start_step) -> (state, metrics)
    evaluate: callable  # (model, policy, eval_batch, critic=None) -> metrics
    train: callable  # (key, data, policy) -> (state, metrics of every chunk)
    num_chunks: int
    system: System


def make_train(args: Args, system: System | None = None) -> Trainer:
    """The phases bound to `args` and `system` (default: the env of `args`)."""
    if system is None:
        system = env_system(make_env(args)[0])
    return Trainer(*(partial(phase, args, system) for phase in (make_data, init, eval_batch, chunk, evaluate, train)),
                   args.total_steps // args.eval_every, system)


# ---------------------------------------------------------------------------------------------
def seed_keys(args):
    return jnp.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])


def policy_like(args, system):
    """An actor of pi's shape (random weights from --data-seed, uniform(+-1/sqrt(fan_in)) as
    sac.py's init): --random-policy's actor and the template to load a saved one into."""
    key = jax.random.fold_in(jax.random.PRNGKey(args.data_seed), 2)
    return Actor(MLP(key, system.obs_size, 2 * system.action_size, (args.policy_width,) * args.policy_depth, "relu"))


def load_policy(args, system):
    """pi: a random actor (--random-policy) or the actor of seed `policy_index` of the SAC run,
    read from its actor.eqx (all seeds' actors, stacked on a leading axis)."""
    if args.random_policy:
        return policy_like(args, system)
    num_seeds = json.loads((Path(args.policy_run) / "args.json").read_text()).get("num_seeds", 1)
    like = jax.tree.map(lambda x: jnp.zeros((num_seeds, *x.shape), x.dtype), policy_like(args, system))
    actors = eqx.tree_deserialise_leaves(Path(args.policy_run) / "actor.eqx", like)
    return jax.tree.map(lambda x: x[args.policy_index], actors)


def start_from_saved_model(args, trainer, state):
    """The (vmapped) state with --init-model-run's saved model as its model (and target model)."""
    run_dir = utils.RunDir(args.init_model_run)
    other = run_dir.load_args(Args)
    saved, _ = run_dir.load_checkpoint(jax.eval_shape(jax.vmap(make_train(other, trainer.system).init), seed_keys(other)))
    if other.num_seeds != args.num_seeds:  # its one seed for every seed
        saved = jax.tree.map(lambda x: jnp.repeat(x[:1], args.num_seeds, 0) if eqx.is_array(x) else x, saved)
    return state._replace(model=saved.model, target_model=saved.model if state.target_model is not None else None)


def data_stats(env, data):
    """How good pi is on the data set: return until the first fall (as SAC's eval/return), and
    the share of trajectories that fell by the task's rule."""
    obs, action = data.obs, utils.to_env_actions(env, env.default_params)(data.action)
    reward = env.reward_fn(obs[:-1], action, obs[1:])
    fell = env.termination_fn(obs[:-1], action, obs[1:])
    alive = (jnp.cumsum(fell, 0) - fell) == 0  # no fall before this transition
    return {"data/return_mean": float(jnp.mean(jnp.sum(reward * alive, 0))),
            "data/terminated_frac": float(jnp.mean(jnp.any(fell, 0))),
            "data/transitions": int(action.shape[0] * action.shape[1])}


def _setup(args, run_dir, fresh):
    """Trainer, policy and data set of a run (the policy copied into / read from the run dir)."""
    env, _ = make_env(args)
    trainer = make_train(args, env_system(env))
    policy_file = run_dir.path / "policy.eqx"
    if fresh:
        policy = load_policy(args, trainer.system)
        eqx.tree_serialise_leaves(policy_file, policy)
    else:
        policy = eqx.tree_deserialise_leaves(policy_file, policy_like(args, trainer.system))
    data = jax.jit(trainer.make_data)(policy, jax.random.PRNGKey(args.data_seed))
    return env, trainer, policy, data


def run(args: Args):
    """Train: the host loop of utils over compiled chunks (log, check, checkpoint, resume)."""
    resuming = args.resume is not None
    args, run_dir = utils.open_run(args, Args, f"tdml-{args.loss}-{args.arch}", resolve)
    # The saved policy, on resume (unless the run died before saving it).
    fresh = not (resuming and (run_dir.path / "policy.eqx").exists())
    env, trainer, policy, data = _setup(args, run_dir, fresh)
    stats = data_stats(env, data)
    print(f"data: return {stats['data/return_mean']:.1f}, {stats['data/terminated_frac']:.0%} fell", flush=True)
    eval_batch = jax.jit(trainer.eval_batch)
    mesh = utils.seed_mesh(args)  # seeds split over the devices: each trains its own
    state = utils.over_devices(jax.vmap(trainer.init), mesh, donate=False)(utils.on_devices(seed_keys(args), mesh))
    if args.init_model_run is not None:  # (a resumed run's checkpoint replaces it)
        state = utils.on_devices(start_from_saved_model(args, trainer, state), mesh)
    chunk = utils.over_devices(jax.vmap(trainer.chunk, in_axes=(0, None, None, None, None)), mesh, replicated=4)

    def check(metrics, chunks):
        where = f"step {chunks * args.eval_every} (chunk {chunks})"
        first_bad = metrics.pop("debug/first_nonfinite_step")
        if (first_bad >= 0).any():
            raise utils.NonFiniteError(f"non-finite training loss first at step {first_bad[first_bad >= 0].min()}, "
                                       f"in {where} (seeds {np.nonzero(first_bad >= 0)[0].tolist()})")
        if chunks * args.eval_every <= args.critic_warmup:  # no model step in the chunk: its model metrics are NaN
            metrics = {k: v for k, v in metrics.items() if k not in NO_MODEL_STEP}
        utils.assert_finite(metrics, where)

    def one_chunk(state, i):
        return chunk(state, data, policy, eval_batch(data, policy, i), i * args.eval_every)

    state, metrics, done_steps = utils.train_loop(run_dir, args, state, one_chunk, args.total_steps // args.eval_every,
                                                  progress="steps", unit="chunk", check_metrics=check,
                                                  show="eval/true_tdml")
    final = metrics.get("eval/true_tdml", np.full(args.num_seeds, np.nan))
    run_dir.write_summary({"env_id": args.env_id, "backend": args.backend, "arch": args.arch, "loss": args.loss,
                           "gamma": args.gamma, "steps": done_steps,
                           "policy": "random (untrained)" if args.random_policy
                           else f"{args.policy_run} (seed index {args.policy_index})",
                           **stats, "final_true_tdml_mean": float(np.mean(final)),
                           "final_true_tdml_per_seed": [float(x) for x in final]})
    return run_dir, metrics


def evaluate_saved(path):
    """The true TDML (and n-step losses) of the saved models on evaluation start states no
    training evaluation used (index 10^6)."""
    run_dir = utils.RunDir(path)
    args = run_dir.load_args(Args)
    utils.check((run_dir.path / "checkpoint.json").exists(), f"no checkpoint in {path}")
    _, trainer, policy, data = _setup(args, run_dir, fresh=False)
    like = jax.eval_shape(jax.vmap(trainer.init), seed_keys(args))
    state, info = run_dir.load_checkpoint(like)
    steps = info["env_steps"]  # tdml counts iterations in this field
    batch = jax.jit(trainer.eval_batch)(data, policy, jnp.int32(10**6))
    metrics = jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, None, None, 0)))(state.model, policy, batch, state.critic)
    out = {"run_dir": path, "steps": steps, **{k: [float(x) for x in v] for k, v in metrics.items()}}
    print(json.dumps(out))
    return out


def main():
    args = utils.cli(Args)
    with utils.reported_failures():
        evaluate_saved(args.evaluate) if args.evaluate else run(args)


if __name__ == "__main__":
    main()
