"""PETS planning latency: seconds per MPC step (one full planning call) at halfcheetah settings,
for 1 seed and for N vmapped seeds, with the FLOP/s it achieves next to this machine's dense matmul.

    python benchmarks/pets_latency.py [--seeds 1 4]
    python benchmarks/pets_latency.py --seeds 1 2 --population 16 --horizon 5 --particles 5 \\
        --iterations 1 --out /tmp/pets_latency_smoke.md                        # smoke run

Settings (defaults): the task's preset, on halfcheetah CEM with population 500 and 50 elites, horizon 30, P = 20 particles,
5 iterations, TS-inf, B = 5 members of 4 x 200 swish (`algorithms/pets.py`'s planner and model,
`Trainer.plan` + `Trainer.model_value`, the function `episode` calls at every env step).

What is measured, all in one process (so the ratios share the machine's state):
* dense fp32 matmul FLOP/s of this machine, 2048 x 2048 @ 2048 x 2048 chained 20 times;
* with `--breakdown`: the model alone at the planner's shapes (see `model_chain_seconds`);
* per `--seeds` count: the compile time of the vmapped planning call (`jit(...).lower().compile()`;
  the persistent compilation cache is not enabled here, so this is a real compile), and its wall
  time (best of 3 after a warm-up call) -> seconds per MPC step, per seed, and FLOP/s.
* The model is freshly initialized (`Trainer.init`: random weights, identity input normalizer),
  not fitted: the planning cost does not depend on the weights. The start observation is a real
  `env.reset` of halfcheetah. The report says whether every candidate's value came out finite.
* CEM's early stop (largest variance < epsilon, PETS' 1e-3) is disabled for the timing
  (`--epsilon 0`, the default here), so every call runs all `--iterations` iterations; the
  report prints the iterations actually run (`plan/iterations`, per seed).

FLOP count: XLA's cost analysis counts the body of a loop once, whatever its trip count, and the
planning call has two nested loops (the CEM `while_loop` over iterations and the trajectory
`scan` over the horizon), so the cost analysis of the plain call undercounts by roughly
iterations x horizon (it is printed too, for comparison). We count instead one CEM iteration: the
same planning call built with `cem_iterations = 1` (its while loop runs once, so counting the body
once is exact) and traced with every `jax.lax.scan` fully unrolled (`unroll=True`, so the horizon's
H model steps appear as H copies), then multiply by the iterations actually run. This slightly
overcounts the O(H x A) element-wise work done once per call outside the CEM loop (initial
variance, warm-start shift), which is negligible next to the model's matmuls.

Reference: mbrl-lib 0.2.0's PETS took 4.2 s per MPC step at these settings on the machine the
issue was measured on (printed as "from the issue"). Machines differ between sessions (the
2048^3 matmul rate here has been 188 and 410 GFLOP/s), so `--mbrl-lib-python PY` also times
mbrl-lib itself in the same run: `benchmarks/mbrl_lib_pets_latency.py` under the interpreter PY
of a virtualenv with PyTorch and mbrl-lib (its docstring says how to make one), at the same
settings, and reports our 1-seed time against it.

Writes the markdown report to `--out` (default benchmarks/results/pets_latency.md; `--out none`
only prints).
"""

import argparse
import contextlib
import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from mbpo_throughput import (  # same timing helpers, one place
    best_time,
    cpu_name,
    flops,
    matmul_flops_per_s,
    run_mbrl_lib,
)

from algorithms import pets

MBRL_LIB_SECONDS = 4.2  # mbrl-lib 0.2.0 PETS, seconds per MPC step at these settings, this machine (from the issue)
DEFAULT_OUT = Path(__file__).parent / "results" / "pets_latency.md"


@contextlib.contextmanager
def unrolled_scans():
    """While tracing inside this block, every `jax.lax.scan` is fully unrolled (same computation,
    no loop), so that XLA's cost analysis counts each of its steps."""
    original = jax.lax.scan
    jax.lax.scan = functools.partial(original, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = original


def model_chain_seconds(args, obs_size, action_size, repeats):
    """Time the model alone at the planner's shapes: `iterations x horizon` chained steps of B
    members on (population x particles / B) rows each, as (1) bare matmuls, (2) + swish (the
    network), (3) + Gaussian sampling of the next state. What the planner adds beyond (3) is
    its own work (member grouping, rewards, CEM)."""
    b = args.ensemble_size
    rows = args.population * args.num_particles // b
    model = pets.Ensemble(jax.random.PRNGKey(0), b, obs_size + action_size, obs_size, args.model_width,
                          args.model_depth)

    def chain(activation, sample):
        def step(t, carry):
            x, key = carry
            for i, (w, bias) in enumerate(zip(model.weights, model.biases)):
                x = jnp.einsum("bni,bio->bno", x, w) + bias[:, None]
                x = activation(x) if i < len(model.weights) - 1 else x
            mean, logvar = jnp.split(x, 2, axis=-1)
            key, noise_key = jax.random.split(key)
            if sample:
                mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(noise_key, mean.shape)
            return jnp.concatenate([mean, carry[0][..., obs_size:]], -1), key

        steps = args.cem_iterations * args.horizon
        return jax.jit(lambda x, key: jax.lax.fori_loop(0, steps, step, (x, key))[0])

    x = jax.random.normal(jax.random.PRNGKey(1), (b, rows, obs_size + action_size))
    key = jax.random.PRNGKey(2)
    return {name: best_time(chain(activation, sample), x, key, repeats=repeats) for name, activation, sample in [
        ("bare matmuls", lambda x: x, False), ("+ swish", jax.nn.swish, False), ("+ sampling", jax.nn.swish, True)]}


def planning_call(args, env, env_params):
    """One MPC step of every seed: (model, obs, warm start, key) -> (action, next warm start, stats)."""

    def plan(model, obs, plan_mean, key):
        value = functools.partial(pets.model_value, args, env, model, obs)
        return pets.plan(args, env, env_params, value, plan_mean, key)

    return jax.vmap(plan)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="halfcheetah", help="task (its observation and action sizes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 4], help="vmapped seed counts to time")
    parser.add_argument("--population", type=int, default=None, help="default: the task's preset (halfcheetah: 500)")
    parser.add_argument("--elites", type=int, default=None, help="default: the preset (halfcheetah: 50), or 10%% of --population")
    parser.add_argument("--horizon", type=int, default=None, help="default: the task's preset (halfcheetah: 30)")
    parser.add_argument("--particles", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=0.0, help="CEM early-stop threshold (0: disabled)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (best is reported)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report path, or 'none'")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the model alone at the planner's shapes (bare matmuls, + swish, + sampling)")
    parser.add_argument("--mbrl-lib-python", default=None,
                        help="python of a venv with torch + mbrl 0.2.0: also time mbrl-lib's planner in this run")
    cli = parser.parse_args()
    elites = cli.elites or (cli.population and max(1, cli.population // 10))  # None: the preset's
    args = pets.resolve(pets.Args(
        env_id=cli.env_id, num_trials=2, population=cli.population, num_elites=elites, horizon=cli.horizon,
        num_particles=cli.particles, cem_iterations=cli.iterations, cem_epsilon=cli.epsilon,
        propagation="ts-inf", optimizer="cem", progress=False))
    trainer = pets.make_train(args)
    env, env_params = pets.make_env(args)

    lines = [f"PETS planning latency (one MPC step = one full planning call), {args.env_id}: CEM population "
             f"{args.population} / {args.num_elites} elites, horizon {args.horizon}, {args.num_particles} particles, "
             f"{args.cem_iterations} iterations (early stop {'disabled' if args.cem_epsilon == 0 else f'at var < {args.cem_epsilon}'}), "
             f"{args.propagation}, B={args.ensemble_size} x {args.model_depth}x{args.model_width} swish "
             f"(freshly initialized); obs {env.obs_size}, actions {env.action_size}; backend {args.backend}; "
             f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s), {cpu_name()}", ""]

    def report(line):
        lines.append(line)
        print(line, flush=True)

    if cli.mbrl_lib_python and 1 not in cli.seeds:
        parser.error("--mbrl-lib-python compares against our 1-seed time: include 1 in --seeds")
    theirs = None
    if cli.mbrl_lib_python:  # first, before this process computes anything (see run_mbrl_lib)
        theirs = run_mbrl_lib(cli.mbrl_lib_python, "mbrl_lib_pets_latency.py", "--population", args.population,
                              "--elite-ratio", args.num_elites / args.population, "--horizon", args.horizon,
                              "--particles", args.num_particles, "--iterations", args.cem_iterations,
                              "--repeats", cli.repeats)
    big = matmul_flops_per_s(2048, 2048)
    seconds_per_seeds = {}
    report(f"- dense matmul: {big / 1e9:.0f} GFLOP/s at 2048^3 (same process)")

    for num_seeds in cli.seeds:
        keys = jnp.stack([jax.random.PRNGKey(i) for i in range(num_seeds)])
        state = jax.jit(jax.vmap(trainer.init))(keys)
        obs, _ = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, env_params)
        space = env.action_space(env_params)
        middle = (jnp.asarray(space.low, jnp.float32) + jnp.asarray(space.high, jnp.float32)) / 2
        # The warm start of an episode's first step, as `episode` starts: the bounds' middle.
        plan_mean = jnp.broadcast_to(middle, (num_seeds, args.horizon, env.action_size))
        plan_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)
        inputs = (state.model, obs, plan_mean, plan_keys)

        call = planning_call(args, env, env_params)
        start = time.perf_counter()
        compiled = jax.jit(call).lower(*inputs).compile()
        compile_s = time.perf_counter() - start
        seconds = best_time(compiled, *inputs, repeats=cli.repeats)
        _, _, stats = compiled(*inputs)
        iterations = np.asarray(stats["plan/iterations"])
        finite = bool(np.all(np.isfinite(np.asarray(stats["plan/mean_value"]))))

        with unrolled_scans():
            one_iteration = planning_call(dataclasses.replace(args, cem_iterations=1), env, env_params)
            iteration_flops = flops(one_iteration, *inputs)
        call_flops = iteration_flops * int(iterations.max())  # a vmapped while loop runs until every seed stops
        rolled_flops = flops(call, *inputs)
        achieved = call_flops / seconds
        seconds_per_seeds[num_seeds] = seconds
        report(f"- {num_seeds} seed(s): compile {compile_s:.1f} s; {seconds:.3f} s per MPC step "
               f"({seconds / num_seeds:.3f} s per seed; mbrl-lib 0.2.0: {MBRL_LIB_SECONDS} s per step, 1 seed, from "
               f"the issue, not re-measured -> {MBRL_LIB_SECONDS * num_seeds / seconds:.1f}x per seed); "
               f"CEM iterations run {iterations.tolist()}; all values finite: {finite}; "
               f"{call_flops / 1e9:.2f} GFLOP per call ({iteration_flops / 1e9:.3f} per CEM iteration, horizon "
               f"unrolled; the plain call's cost analysis, loops counted once: {rolled_flops / 1e9:.3f}) -> "
               f"{achieved / 1e9:.0f} GFLOP/s ({achieved / big:.0%} of 2048^3 matmul)")
    if cli.breakdown:
        parts = model_chain_seconds(args, env.obs_size, env.action_size, cli.repeats)
        report(f"- the model alone, {args.cem_iterations * args.horizon} chained steps at the planner's shapes "
               f"(1 seed): " + "; ".join(f"{name} {seconds:.3f} s" for name, seconds in parts.items()))
    if theirs is not None:
        report(f"- mbrl-lib {theirs['mbrl_version']} (torch {theirs['torch_version']}, {theirs['torch_threads']} threads), "
               f"same settings, measured in this run: {theirs['seconds_per_step']:.3f} s per MPC step (all calls: "
               f"{', '.join(f'{t:.3f}' for t in theirs['all_seconds'])}); PyTorch's 2048^3 matmul "
               f"{theirs['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s -> ours (1 seed) is "
               f"{theirs['seconds_per_step'] / seconds_per_seeds[1]:.2f}x faster")
    if cli.out.lower() != "none":
        out = Path(cli.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    main()
