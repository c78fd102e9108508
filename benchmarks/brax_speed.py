"""Compile time and steps/second of every Brax task through `envs` on this machine.

    python benchmarks/brax_speed.py [--backend positional] [--tasks hopper walker2d] [--steps 1000]
    python benchmarks/brax_speed.py --compare positional generalized mjx --tasks inverted_pendulum hopper halfcheetah

For each task: cold compile time (no persistent cache) of a jitted `reset` + `lax.scan` of
`--steps` random-action steps, then the steady-state env steps per second for 1 env and for 64
vmapped envs (best of 3 timed runs, so a noisy neighbour inflates less). Prints a markdown
table and writes it to benchmarks/results/brax_speed_<backend>.md. Run nothing else meanwhile.
`--compare`: every listed backend on every task in one run, with each one's speed as a ratio of
the first backend's (ratios from one run, as the machine changes between sessions), written to
benchmarks/results/brax_speed_compare.md.
"""

import argparse
import time
from pathlib import Path

import jax

import envs


def make_rollout(env, params, num_envs, num_steps):
    """`num_envs` = 1: the plain env (its auto-reset `lax.cond` skips the reset); more: vmapped."""
    if num_envs == 1:
        reset, step = env.reset, env.step
    else:
        reset = jax.vmap(env.reset, in_axes=(0, None))
        step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    shape = () if num_envs == 1 else (num_envs,)

    def rollout(key):
        reset_key, scan_key = jax.random.split(key)
        _, state = reset(jax.random.split(reset_key, num_envs).reshape(*shape, -1), params)

        def body(state, key):
            act_key, step_key = jax.random.split(key)
            actions = jax.random.uniform(act_key, (*shape, env.action_size), minval=-1.0, maxval=1.0)
            _, state, reward, *_ = step(jax.random.split(step_key, num_envs).reshape(*shape, -1), state, actions, params)
            return state, reward

        # Return something of the final state too: inverted_pendulum's reward is constant, and
        # XLA would otherwise drop the physics altogether.
        state, rewards = jax.lax.scan(body, state, jax.random.split(scan_key, num_steps))
        return rewards.sum() + state.obs.sum()

    return jax.jit(rollout)


def measure(task, backend, num_envs, num_steps):
    env, params = envs.make(task, backend=backend)
    rollout = make_rollout(env, params, num_envs, num_steps)
    start = time.perf_counter()
    compiled = rollout.lower(jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(jax.random.PRNGKey(1)))  # warm-up
    best = min(_timed(compiled, seed) for seed in (2, 3, 4))
    return compile_s, num_envs * num_steps / best


def _timed(fn, seed):
    start = time.perf_counter()
    jax.block_until_ready(fn(jax.random.PRNGKey(seed)))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=envs.DEFAULT_BACKEND, choices=envs.BACKENDS)
    parser.add_argument("--tasks", nargs="+", default=list(envs.MUJOCO_TASKS), choices=envs.MUJOCO_TASKS)
    parser.add_argument("--steps", type=int, default=1000, help="scan length per timed call")
    parser.add_argument("--compare", nargs="+", default=None, choices=envs.BACKENDS, metavar="BACKEND")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)  # measure cold compiles
    if args.compare:
        return compare(args)

    lines = [
        f"Brax tasks through `envs.make`, backend `{args.backend}`, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {args.steps}-step scans, random actions, auto-reset included.",
        "",
        "| task | obs | act | compile 1 env (s) | steps/s 1 env | compile 64 envs (s) | steps/s 64 envs |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for task in args.tasks:
        env, _ = envs.make(task, backend=args.backend)
        c1, s1 = measure(task, args.backend, 1, args.steps)
        c64, s64 = measure(task, args.backend, 64, max(args.steps // 10, 10))
        lines.append(f"| {task} | {env.obs_size} | {env.action_size} | {c1:.1f} | {s1:,.0f} | {c64:.1f} | {s64:,.0f} |")
        print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / f"brax_speed_{args.backend}.md"
    if out.exists():  # keep the rows of tasks not measured in this run
        measured = {line.split("|")[1].strip() for line in lines[4:]}
        kept = [line for line in out.read_text().splitlines()[4:] if line.split("|")[1].strip() not in measured]
        order = {task: i for i, task in enumerate(envs.MUJOCO_TASKS)}
        lines = lines[:4] + sorted(kept + lines[4:], key=lambda line: order[line.split("|")[1].strip()])
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


def compare(args):
    lines = [f"Backends side by side, jax {jax.__version__}, {jax.devices()[0].platform}, {args.steps}-step scans "
             f"(64 envs: {max(args.steps // 10, 10)}), random actions; x = steps/s relative to `{args.compare[0]}` "
             f"in this run.", "",
             "| task | backend | compile 1 env (s) | steps/s 1 env | x | compile 64 envs (s) | steps/s 64 envs | x |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for task in args.tasks:
        base = None
        for backend in args.compare:
            c1, s1 = measure(task, backend, 1, args.steps)
            c64, s64 = measure(task, backend, 64, max(args.steps // 10, 10))
            base = base or (s1, s64)
            lines.append(f"| {task} | {backend} | {c1:.1f} | {s1:,.0f} | {s1 / base[0]:.2f} | {c64:.1f} | {s64:,.0f} "
                         f"| {s64 / base[1]:.2f} |")
            print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / "brax_speed_compare.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
