"""MBPO throughput at hopper's paper settings (G = 20, SAC 2x256, B = 7 members of 4x200, 100k rollouts per fit).

    python benchmarks/mbpo_throughput.py [--seeds 1 4] [--steps 250] [--seed-batch 1 4] [--fit sequential batched]

Measures, in one process (so the ratios share the machine's state):
1. dense fp32 matmul FLOP/s of this machine (2048 x 2048, and 256 x 256 x 256 like a SAC layer);
2. the SAC-update phase: XLA cost-analysis FLOPs of one update / wall time of G = 20 updates,
   vmapped over each `--seeds` count;
3. the model-fit phase: FLOPs of one ensemble SGD step (7 members, batch 256) / wall time of 50,
   vmapped over each `--seeds` count, and the ceiling these matmul shapes allow (the bare linear
   layers: no activations, normalizer, log-variance bounds or Adam);
4. the full MBPO iteration (collect -> fit model -> 100k-rollout branch -> G updates per step):
   compile time and seconds per env step over a model period (`--steps` = model_train_freq = 250
   env steps, one fit, one rollout branch, G updates per step), for each `--seeds` count,
   the first learning period (fit from scratch on 5000 random-policy transitions, the most
   epochs) and the next one (fit warm-started from the previous weights, as in training). Seeds
   run as `mbpo.run` runs them: in batches of each `--seed-batch` (vmapped within a batch, batch
   after batch via lax.map), so 4 seeds at seed batch 1 vs 4 are directly comparable. A batch
   of several seeds is timed with each `--fit`: `sequential` fits each seed's model alone, one
   after another (mbpo's `--sequential-fit`, the CPU default), `batched` vmaps the fit, which
   then runs every seed until the batch's slowest seed stops.
With `--mbrl-lib-python PY` (the interpreter of a virtualenv with PyTorch and mbrl-lib 0.2.0,
see `mbrl_lib_pets_latency.py`), `mbrl_lib_mbpo_phases.py` first times mbrl-lib's SAC update and
ensemble SGD step at the same settings, and the report compares them with our 1-seed phases.
Prints a markdown report and writes it to benchmarks/results/mbpo_throughput.md.
"""

import argparse
import contextlib
import dataclasses
import json
import subprocess
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import envs
from algorithms import mbpo


def cpu_name():
    """The CPU's model name (machines differ between sessions; the figures depend on it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run_mbrl_lib(python, script, *flags):
    """Run one of the mbrl-lib timing scripts (their own venv) and parse the JSON line it prints.
    Called before this process computes anything: run after our timings, mbrl-lib's planner
    measured 3.9 s per step against 2.7 s alone."""
    command = [python, str(Path(__file__).parent / script), *map(str, flags)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def flops(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def best_time(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops_per_s(n, k, repeats=20):
    """(n, k) @ (k, k) chained `repeats` times (each product feeds the next, so XLA cannot hoist it)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, k))
    b = jax.random.normal(jax.random.PRNGKey(1), (k, k)) / np.sqrt(k)
    f = jax.jit(lambda a, b: jax.lax.fori_loop(0, repeats, lambda i, x: x @ b, a))
    return repeats * 2 * n * k * k / best_time(f, a, b)


def phase_flops(trainer, args, num_seeds, big, small, report):
    """FLOP/s of one SAC update and one ensemble SGD step, vmapped over `num_seeds` seeds."""
    keys = jnp.stack([jax.random.PRNGKey(i) for i in range(num_seeds)])
    runner = jax.jit(jax.vmap(trainer.init))(keys)
    obs_size, action_size = runner.obs.shape[-1], runner.sac.actor.net.layers[-1].out_features // 2
    n = args.sac_batch_size
    obs = jax.random.normal(jax.random.PRNGKey(1), (num_seeds, n, obs_size))
    batch = (obs, jnp.zeros((num_seeds, n, action_size)), jnp.ones((num_seeds, n)), obs, jnp.zeros((num_seeds, n), bool))
    update = jax.vmap(partial(mbpo.sac_update, args))
    update_flops = flops(update, runner.sac, batch, jax.random.split(jax.random.PRNGKey(0), num_seeds))
    g_updates = jax.jit(lambda sac, key: jax.lax.scan(
        lambda s, k: (update(s, batch, jax.random.split(k, num_seeds))[0], None), sac,
        jax.random.split(key, args.updates_per_step))[0])
    seconds = best_time(g_updates, runner.sac, jax.random.PRNGKey(0)) / args.updates_per_step
    sac_seconds = seconds
    report(f"- SAC update, {num_seeds} seed(s): {update_flops / 1e6:.1f} MFLOP, {seconds * 1e3:.2f} ms -> "
           f"{update_flops / seconds / 1e9:.0f} GFLOP/s ({update_flops / seconds / small:.0%} of 256^3 matmul, "
           f"{update_flops / seconds / big:.0%} of 2048^3)")

    shape = (num_seeds, args.ensemble_size, args.model_batch_size)
    inputs = jax.random.normal(jax.random.PRNGKey(2), shape + (obs_size + action_size,))
    targets = jax.random.normal(jax.random.PRNGKey(3), shape + (obs_size + 1,))
    model_opt = jax.vmap(optax.adam(args.model_lr).init)(runner.model)
    sgd_step = jax.vmap(partial(mbpo.model_sgd_step, args))
    weights = jnp.ones(shape)
    step_flops = flops(sgd_step, runner.model, model_opt, inputs, targets, weights)
    fifty = jax.jit(lambda m, o: jax.lax.fori_loop(0, 50, lambda i, c: sgd_step(*c, inputs, targets, weights)[:2], (m, o)))
    seconds = best_time(fifty, runner.model, model_opt) / 50
    report(f"- ensemble SGD step, {num_seeds} seed(s): {step_flops / 1e6:.1f} MFLOP, {seconds * 1e3:.2f} ms -> "
           f"{step_flops / seconds / 1e9:.0f} GFLOP/s ({step_flops / seconds / small:.0%} of 256^3 matmul, "
           f"{step_flops / seconds / big:.0%} of 2048^3)")
    return sac_seconds, seconds


def model_shape_ceiling(args, big, report):
    """What the ensemble's matmul shapes allow: forward + backward + SGD of the bare linear layers
    (no bias, activation, normalizer, log-variance bounds, Adam), 1 seed."""
    env, _ = envs.make(args.env_id)
    sizes = [env.obs_size + env.action_size] + [args.model_width] * args.model_depth + [2 * (env.obs_size + 1)]
    weights = [jax.random.normal(jax.random.PRNGKey(i), (args.ensemble_size, a, b)) / np.sqrt(a)
               for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    inputs = jax.random.normal(jax.random.PRNGKey(9), (args.ensemble_size, args.model_batch_size, sizes[0]))

    def step(weights):
        def loss(weights):
            x = inputs
            for w in weights:
                x = jnp.einsum("bni,bio->bno", x, w)
            return jnp.sum(x**2)
        return jax.tree.map(lambda w, g: w - 1e-6 * g, weights, jax.grad(loss)(weights))

    step_flops = flops(step, weights)
    seconds = best_time(jax.jit(lambda w: jax.lax.fori_loop(0, 50, lambda i, w: step(w), w)), weights) / 50
    report(f"- ceiling of the ensemble's shapes (bare linear layers, fwd+bwd+SGD, 1 seed): {seconds * 1e3:.2f} ms -> "
           f"{step_flops / seconds / 1e9:.0f} GFLOP/s ({step_flops / seconds / big:.0%} of 2048^3)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=250, help="env steps timed (one model period)")
    parser.add_argument("--seed-batch", type=int, nargs="+", default=[1, 4],
                        help="seeds vmapped together in the full iteration (capped at the seed count)")
    parser.add_argument("--fit", nargs="+", default=["sequential", "batched"], choices=["sequential", "batched"],
                        help="how a batch of several seeds fits the models (mbpo --sequential-fit)")
    parser.add_argument("--mbrl-lib-python", default=None,
                        help="python of a venv with torch + mbrl 0.2.0: also time mbrl-lib's phases in this run")
    parser.add_argument("--phases-only", action="store_true",
                        help="skip the full-iteration timing (prints only; the results file is not rewritten)")
    cli = parser.parse_args()
    if cli.mbrl_lib_python and 1 not in cli.seeds:
        parser.error("--mbrl-lib-python compares against our 1-seed phases: include 1 in --seeds")
    theirs = run_mbrl_lib(cli.mbrl_lib_python, "mbrl_lib_mbpo_phases.py") if cli.mbrl_lib_python else None
    args = mbpo.resolve(mbpo.Args(env_id="hopper", epoch_length=cli.steps, model_train_freq=cli.steps,
                                  init_steps=5000, total_timesteps=5000 + 2 * cli.steps, progress=False))
    trainer = mbpo.make_train(args)
    lines = [f"MBPO throughput, hopper paper settings (G={args.updates_per_step}, SAC {args.sac_depth}x{args.sac_width}, "
             f"B={args.ensemble_size} x {args.model_depth}x{args.model_width}, {args.rollout_batch_size} rollouts per fit), "
             f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s), {cpu_name()}", ""]

    def report(line):
        lines.append(line)
        print(line, flush=True)

    big, small = matmul_flops_per_s(2048, 2048), matmul_flops_per_s(256, 256)
    report(f"- dense matmul: {big / 1e9:.0f} GFLOP/s at 2048^3, {small / 1e9:.0f} GFLOP/s at 256^3")

    phase_seconds = {num_seeds: phase_flops(trainer, args, num_seeds, big, small, report) for num_seeds in cli.seeds}
    model_shape_ceiling(args, big, report)
    if theirs is not None:
        sac_s, model_s = phase_seconds[1]
        report(f"- mbrl-lib {theirs['mbrl_version']} (torch {theirs['torch_version']}, {theirs['torch_threads']} threads), "
               f"same settings, measured in this run: SAC update {theirs['sac_update_ms']:.2f} ms (ours, 1 seed, "
               f"{theirs['sac_update_ms'] / (1e3 * sac_s):.2f}x faster), ensemble SGD step {theirs['ensemble_step_ms']:.2f} "
               f"ms (ours {theirs['ensemble_step_ms'] / (1e3 * model_s):.2f}x faster)")

    runs = sorted({(n, min(b, n), fit if min(b, n) > 1 else cli.fit[0])
                   for n in cli.seeds for b in cli.seed_batch for fit in cli.fit}, key=lambda r: (r[0], r[1], r[2] != cli.fit[0]))
    for num_seeds, seed_batch, fit in [] if cli.phases_only else runs:
        trainer = mbpo.make_train(dataclasses.replace(args, sequential_fit=fit == "sequential"))
        keys = jnp.stack([jax.random.PRNGKey(i) for i in range(num_seeds)])
        state = jax.jit(jax.vmap(trainer.init))(keys)
        chunk = jax.jit(lambda state, start: jax.lax.map(lambda s: trainer.chunk(s, start), state, batch_size=seed_batch),
                        donate_argnums=0)
        start = time.perf_counter()
        compiled = chunk.lower(state, jnp.int32(0)).compile()
        compile_s = time.perf_counter() - start
        # Random-action warm-up to fill the real buffer with 5000 transitions (no learning yet).
        for step in range(0, args.init_steps, args.epoch_length):
            state, _ = compiled(state, jnp.int32(step))
        # Period 1: the first fit, from scratch (the most epochs); period 2: warm-started.
        for label, step in [("first fit, from scratch", args.init_steps), ("next fit, warm start", args.init_steps + args.epoch_length)]:
            start = time.perf_counter()
            state, metrics = compiled(state, jnp.int32(step))
            jax.block_until_ready(metrics)
            seconds = time.perf_counter() - start
            epochs = "/".join(str(int(e)) for e in metrics["model/epochs"])
            how = "" if seed_batch == 1 else (", each seed's fit alone" if fit == "sequential" else
                                              ", fits vmapped: every seed steps until the batch's slowest stops")
            report(f"- full iteration, {num_seeds} seed(s) in batches of {seed_batch}{how}, compile {compile_s:.0f} s; "
                   f"{args.epoch_length} env steps with one fit ({label}: {epochs} epochs per seed) on {step} "
                   f"transitions, one "
                   f"{args.rollout_batch_size}-rollout branch and {args.updates_per_step} SAC "
                   f"updates per step: {seconds:.0f} s -> {seconds / args.epoch_length:.3f} s per env step "
                   f"= {seconds / args.epoch_length / num_seeds:.3f} s per seed-step")
    if cli.phases_only:  # a partial report must not replace the full one
        return
    out = Path(__file__).parent / "results" / "mbpo_throughput.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
