"""The DAM planner's ceiling: random-shooting MPC with the env's own dynamics as the model
(`dam.py --model true`, nothing learned), per particle count and with / without common random
numbers across the candidate sequences.

    python benchmarks/dam_planner_oracle.py        # writes benchmarks/results/dam_planner_oracle.md

Each row: `--episodes` planner episodes per seed (Intersection: half with each turn) for
`--seeds` seeds, mean return ± standard error over all episodes, and the share of crashed
episodes on Intersection. References (exact, not planner results): IcyRoad's optimum 10
(accelerate once, then cruise; tests/test_dam_envs.py); Intersection's 209.5 acting on the turn
once visible, 203 open loop (benchmarks/intersection_dp.py).
"""

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from algorithms import dam, utils

OUT = Path(__file__).parent / "results" / "dam_planner_oracle.md"
# (env, K, H, particles, common random numbers): the presets' K, H with and without common
# random numbers, then longer horizons and more candidates on Intersection.
GRID = [(env, k, h, p, common) for env, k, h, ps in [("IcyRoad", 500, 5, (1, 20)), ("Intersection", 200, 10, (8, 32))]
        for p in ps for common in (False, True)]
GRID += [("Intersection", k, h, p, True) for k, h, p in [(200, 15, 8), (200, 25, 8), (200, 25, 32), (1000, 25, 8),
                                                          (1000, 25, 32)]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=40)
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    lines = ["| env | K | H | particles | common random numbers | mean return ± s.e. | crashed episodes | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for env_id, k, h, particles, common in GRID:
        args = dam.resolve(dam.Args(env_id=env_id, method="baseline", model="true", num_particles=particles,
                                    num_sequences=k, horizon=h, common_noise=common, num_seeds=cli.seeds,
                                    eval_episodes=cli.episodes, init_episodes=1, rounds=1, progress=False))
        trainer = dam.make_train(args)
        start = time.perf_counter()
        state = jax.jit(jax.vmap(trainer.init))(dam.seed_keys(args))
        evaluate = jax.jit(jax.vmap(lambda s, key: trainer.evaluate(s, key, per_episode=True)))
        _, metrics = evaluate(state, dam.eval_keys(args))
        returns = np.asarray(metrics["eval/episode_returns"]).ravel()
        crashed = np.asarray(metrics["eval/episode_crashed"]).ravel() if env_id == "Intersection" else None
        seconds = time.perf_counter() - start
        se = returns.std(ddof=1) / np.sqrt(len(returns))
        lines.append(f"| {env_id} | {args.num_sequences} | {args.horizon} | {particles} | {'yes' if common else 'no'} "
                     f"| {returns.mean():.2f} ± {se:.2f} | {'-' if crashed is None else f'{crashed.mean():.0%}'} "
                     f"| {seconds:.0f} |")
        print(lines[-1], flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)  # rewritten after every row
        OUT.write_text("\n".join(lines) + f"\n\n`python benchmarks/dam_planner_oracle.py --seeds {cli.seeds} "
                       f"--episodes {cli.episodes}` ({cli.seeds} x {cli.episodes} episodes per row)\n")


if __name__ == "__main__":
    main()
