"""The MuJoCo tasks against Gymnasium: one-step agreement, and the do-nothing / random baselines of
every task on every backend.

    python benchmarks/mujoco_tasks.py agreement [--tasks hopper ant] [--transitions 1000]
    python benchmarks/mujoco_tasks.py baselines [--tasks hopper] [--backends gymnasium positional] [--episodes 5]
    python benchmarks/mujoco_tasks.py mbpo [--backends gymnasium positional]
    python benchmarks/mujoco_tasks.py solver

`agreement`: from Gymnasium v4's own states along its random-action episodes (falls, contacts and
resets included), one step of `envs.make(task)` (the default backend: Gymnasium's model file on MJX)
and one of Gymnasium's on MuJoCo's CPU physics, with the same action: the relative observation
error (max over entries / max(1, |obs|)), the reward error, the termination agreement, and the same
on steps without contact (tests/test_mujoco_tasks.py's oracle, at a larger sample).
Writes benchmarks/results/mujoco_tasks_agreement.md.

`baselines`: episodes of zero actions and of uniform random actions in [-1, 1] (mapped onto the
actuators' range), full length (1000 steps; reacher 50, pusher 100): mean steps and return on
Gymnasium itself (fresh reset noise each episode) and on each backend of `envs.make`. This is the
table each learning curve needs beside it. Writes benchmarks/results/mujoco_tasks_baselines.md
(rows are added as they finish; a rerun replaces the rows it measures).

`mbpo`: MBPO hopper at the paper's settings (`mbpo.resolve(Args(env_id="hopper"))`, 1 seed) on each
backend, in one process: compile time, seconds per env step of the random-action warm-up (5000
steps: the physics and the buffer, no learning) and of the first learning period of 250 env
steps (collect, model fit, 100k-rollout branch, G = 20 SAC updates per step). Run nothing else
meanwhile. Writes benchmarks/results/mujoco_tasks_mbpo.md.

`solver`: what humanoid's substitute solver changes, on MuJoCo's CPU physics alone: Gymnasium's
Humanoid-v4 as shipped (PGS, 50 iterations) against the same env with Newton (ours): one-step
observation differences from the same 1000 states of PGS episodes, and 20 zero-action and 20
random-action episodes of each. Writes benchmarks/results/mujoco_tasks_solver.md.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import envs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_mujoco_tasks as oracle  # noqa: E402  (the tests' Gymnasium oracle)

RESULTS = Path(__file__).parent / "results"


def agreement(tasks, transitions):
    lines = [
        f"One step from Gymnasium v4's own states ({transitions} per task, random actions, episodes "
        f"with falls and resets), `envs.make(task)` (MJX, float32) vs Gymnasium (MuJoCo {__import__('mujoco').__version__}, "
        "CPU, float64). Error = max over entries / max(1, max |Gymnasium obs|).", "",
        "| task | obs error max | obs error median | reward error max | terminations (Gymnasium) | termination agrees | "
        "steps without contact | their obs error max |",
        "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        env, _ = envs.make(task)
        saved, oracle.NUM_TRANSITIONS = oracle.NUM_TRANSITIONS, transitions
        obs_err, reward_err, term, gym_term, contact = oracle.one_step_errors(env, task)
        oracle.NUM_TRANSITIONS = saved
        free = ~contact
        lines.append(f"| {task} | {obs_err.max():.1e} | {np.median(obs_err):.1e} | {reward_err.max():.1e} | "
                     f"{int(gym_term.sum())} | {np.mean(term == gym_term):.1%} | {int(free.sum())} | "
                     f"{obs_err[free].max() if free.any() else float('nan'):.1e} |")
        print(lines[-1], flush=True)
    (RESULTS / "mujoco_tasks_agreement.md").write_text("\n".join(lines) + "\n")


def our_episodes(task, backend, episodes):
    """`episodes` zero-action and `episodes` random-action full episodes of `envs.make(task, backend)`."""
    env, params = envs.make(task, backend=backend)

    def policy(obs, scale, key):  # the carry is the action scale: 0 (do nothing) or 1 (uniform)
        return scale * jax.random.uniform(key, (env.action_size,), minval=-1.0, maxval=1.0), scale

    def episode(key, scale):
        _, _, length, total = envs.rollout(env, policy, scale, key, params)
        return length, total

    keys = jax.random.split(jax.random.PRNGKey(0), 2 * episodes)
    scale = jnp.repeat(jnp.array([0.0, 1.0]), episodes)
    # One episode after another (lax.map), not vmapped: MJX's pusher stepped 10 vmapped envs for
    # over 10 minutes without finishing 100 steps, where one env steps ~4 times a second.
    lengths, totals = map(np.asarray, jax.jit(lambda k, s: jax.lax.map(lambda a: episode(*a), (k, s)))(keys, scale))
    return [(lengths[i * episodes:(i + 1) * episodes], totals[i * episodes:(i + 1) * episodes]) for i in (0, 1)]


def baselines(tasks, backends, episodes):
    out = RESULTS / "mujoco_tasks_baselines.md"
    header = ["Zero actions / uniform random actions, mean steps / mean return over "
              f"{episodes} episodes (full length: 1000 steps, reacher 50, pusher 100). `Gymnasium`: "
              "Gymnasium's own env (v4; pusher: v5's model file with v4's reward) on MuJoCo's CPU physics. "
              "`gymnasium`: ours, the default. The rest: Brax's variants (other model files: other tasks).", "",
              "| task | backend | zero: steps | zero: return | random: steps | random: return |",
              "|---|---|---|---|---|---|"]
    rows = {}
    if out.exists():
        for line in out.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("| ") and len(cells) == 6 and cells[0] in envs.MUJOCO_TASKS:
                rows[(cells[0], cells[1])] = line
    for task in tasks:
        for backend in ["Gymnasium", *backends]:
            start = time.perf_counter()
            if backend == "Gymnasium":
                horizon = envs.make(task)[1].max_steps_in_episode
                results = [oracle.gym_episodes(task, horizon, scale, seed=0) for scale in (0.0, 1.0)]
            else:
                results = our_episodes(task, backend, episodes)
            cells = [f"{np.mean(length[:episodes]):.0f} | {np.mean(total[:episodes]):.1f}" for length, total in results]
            rows[(task, backend)] = f"| {task} | {backend} | {cells[0]} | {cells[1]} |"
            print(rows[(task, backend)], f"({time.perf_counter() - start:.0f} s)", flush=True)
            order = {t: i for i, t in enumerate(envs.MUJOCO_TASKS)}
            border = {b: i for i, b in enumerate(["Gymnasium", *envs.BACKENDS])}
            body = [rows[k] for k in sorted(rows, key=lambda k: (order[k[0]], border.get(k[1], 99)))]
            out.write_text("\n".join(header + body) + "\n")


def mbpo_speed(backends):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algorithms"))
    import mbpo

    lines = [f"MBPO hopper, paper settings, 1 seed, jax {jax.__version__}, {jax.devices()[0].platform}; "
             "seconds per env step (one process, backends one after another)", "",
             "| backend | compile (s) | warm-up: s per env step | 1st learning period: s per env step |",
             "|---|---|---|---|"]
    for backend in backends:
        args = mbpo.resolve(mbpo.Args(env_id="hopper", backend=backend, init_steps=5000, total_timesteps=5500,
                                      epoch_length=250, model_train_freq=250,
                                      progress=False))
        trainer = mbpo.make_train(args)
        state = jax.jit(jax.vmap(trainer.init))(jnp.stack([jax.random.PRNGKey(0)]))
        chunk = jax.jit(jax.vmap(trainer.chunk, in_axes=(0, None)), donate_argnums=0)
        start = time.perf_counter()
        compiled = chunk.lower(state, jnp.int32(0)).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, jnp.int32(0))  # the first chunk: not timed (warm-up)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for step in range(args.epoch_length, args.init_steps, args.epoch_length):
            state, metrics = compiled(state, jnp.int32(step))
        jax.block_until_ready(metrics)
        warm = (time.perf_counter() - start) / (args.init_steps - args.epoch_length)
        periods = []
        for step in (args.init_steps,):
            start = time.perf_counter()
            state, metrics = compiled(state, jnp.int32(step))
            jax.block_until_ready(metrics)
            periods.append((time.perf_counter() - start) / args.epoch_length)
        lines.append(f"| {backend} | {compile_s:.0f} | {warm:.5f} | {periods[0]:.3f} |")
        print(lines[-1], flush=True)
    (RESULTS / "mujoco_tasks_mbpo.md").write_text("\n".join(lines) + "\n")


def humanoid_solver(transitions=1000, episodes=20):
    import mujoco

    pgs, newton = oracle._gym("humanoid"), oracle._gym("humanoid")
    newton.model.opt.solver = mujoco.mjtSolver.mjSOL_NEWTON
    rng = np.random.default_rng(0)
    errors, seed = [], 0
    pgs.reset(seed=seed)
    while len(errors) < transitions:
        action = rng.uniform(-0.4, 0.4, 17)
        qpos, qvel = pgs.data.qpos.copy(), pgs.data.qvel.copy()
        newton.set_state(qpos, qvel)
        pgs.set_state(qpos, qvel)
        obs_n = newton.step(action)[0][:45]
        obs_p, _, terminated, _, _ = pgs.step(action)
        errors.append(np.abs(obs_n - obs_p[:45]).max() / max(1.0, np.abs(obs_p[:45]).max()))
        if terminated:
            seed += 1
            pgs.reset(seed=seed)
    errors = np.array(errors)
    lines = ["Humanoid-v4 on MuJoCo's CPU physics: its PGS solver (as shipped) vs Newton (ours, as MJX lacks PGS).", "",
             f"- one step from the same {transitions} states of PGS random-action episodes: relative observation "
             f"difference median {np.median(errors):.1e}, 90% {np.quantile(errors, 0.9):.1e}, max {errors.max():.1e}", ""]
    lines += ["| solver | zero: steps | zero: return | random: steps | random: return |", "|---|---|---|---|---|"]
    for name, env in [("PGS (Gymnasium's file)", pgs), ("Newton (ours)", newton)]:
        cells = []
        for scale in (0.0, 1.0):
            lengths, totals = [], []
            for i in range(episodes):
                env.reset(seed=1000 + i)
                total, length = 0.0, 0
                for length in range(1, 1001):
                    _, reward, terminated, _, _ = env.step(scale * rng.uniform(-0.4, 0.4, 17))
                    total += reward
                    if terminated:
                        break
                lengths.append(length)
                totals.append(total)
            cells.append(f"{np.mean(lengths):.1f} ± {np.std(lengths, ddof=1) / np.sqrt(episodes):.1f} | "
                         f"{np.mean(totals):.1f} ± {np.std(totals, ddof=1) / np.sqrt(episodes):.1f}")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    print("\n".join(lines))
    (RESULTS / "mujoco_tasks_solver.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["agreement", "baselines", "mbpo", "solver"])
    parser.add_argument("--tasks", nargs="+", default=list(envs.MUJOCO_TASKS), choices=envs.MUJOCO_TASKS)
    parser.add_argument("--backends", nargs="+", default=list(envs.BACKENDS), choices=envs.BACKENDS)
    parser.add_argument("--transitions", type=int, default=1000)
    parser.add_argument("--episodes", type=int, default=5)
    args = parser.parse_args()
    if args.part == "agreement":
        agreement(args.tasks, args.transitions)
    elif args.part == "baselines":
        baselines(args.tasks, args.backends, args.episodes)
    elif args.part == "mbpo":
        mbpo_speed(args.backends)
    else:
        humanoid_solver()


if __name__ == "__main__":
    main()
