"""PETS' optimizers at equal budgets with the true dynamics: CEM, iCEM, MPPI and random shooting,
each planning with the real env as its model (one particle: the env is deterministic), at a
fraction of CEM's sequences per step (the task's preset: population x iterations).

    python benchmarks/pets_planners.py --env-id pendulum --episodes 8 --fractions 1 0.25 0.1 0.025
    python benchmarks/pets_planners.py --env-id halfcheetah --episodes 2 --fractions 0.1 --episode-length 100

The budget is the number of action sequences a planning step evaluates (`pets.sequences_per_step`,
each for the horizon): what a learned model's cost scales with. At budget B and I iterations, CEM,
MPPI and random shooting draw B / I sequences per iteration; iCEM the largest first population
whose shrinking schedule (/ 1.25 per iteration, plus its shifted elites) fits in B. Elites are a
tenth of the (first) population, at least 2, as the presets. Everything else is each optimizer's
default (pets.Args). iCEM's paper claims CEM's return with several times fewer samples: the rows at
1/4 and 1/10 say whether that holds here.

Writes benchmarks/results/pets_planners_<env>.csv and .md (mean, min and per-episode returns, the
same episode seeds for every row, and the zero-action return); each row also goes to
pets_oracle.csv (pets_reference.py's file), where a curve's planner finds its true-dynamics line.
"""

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import pandas as pd
from pets_reference import store_row, true_dynamics_returns  # (this folder is on the path of a script run from it)

from algorithms import pets, utils

RESULTS = Path(__file__).parent / "results"


def at_budget(args, optimizer, budget):
    """`args` with `optimizer` sized to evaluate at most `budget` sequences per planning step."""
    def sized(population):
        elites = max(2, population // 10)
        return dataclasses.replace(args, optimizer=optimizer, population=population, num_elites=elites)

    if optimizer != "icem":
        return sized(max(4, budget // args.cem_iterations))
    population = 4
    while pets.sequences_per_step(sized(population + 1)) <= budget:
        population += 1
    return sized(population)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="pendulum")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--episode-length", type=int, default=None, help="default: the task's (pets.Args)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25, 0.1])
    parser.add_argument("--optimizers", nargs="+", default=list(pets.OPTIMIZERS), choices=pets.OPTIMIZERS)
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    base = pets.resolve(pets.Args(env_id=cli.env_id, progress=False, episode_length=cli.episode_length))
    full = pets.sequences_per_step(base)
    keys = jax.random.split(jax.random.PRNGKey(0), cli.episodes)
    rows = []
    for fraction in cli.fractions:
        for optimizer in cli.optimizers:
            args = pets.resolve(at_budget(base, optimizer, int(round(fraction * full))))
            start = time.time()
            zero, planned = true_dynamics_returns(args, keys)
            seconds = (time.time() - start) / cli.episodes
            row = dict(fraction=fraction, optimizer=optimizer, sequences_per_step=pets.sequences_per_step(args),
                       population=args.population, num_elites=args.num_elites, mean=planned.mean(),
                       std=planned.std(), min=planned.min(), zero_action_mean=zero.mean(),
                       per_episode=" ".join(f"{x:.1f}" for x in planned), seconds_per_episode=round(seconds, 1))
            rows.append(row)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            store_row(args, {"episodes": cli.episodes, "zero_action_mean": round(float(zero.mean()), 3),
                             "oracle_mean": round(float(planned.mean()), 3), "oracle_min": round(float(planned.min()), 3),
                             "oracle_per_episode": " ".join(f"{x:.2f}" for x in planned),
                             "seconds_per_episode": round(seconds, 1)})
    df = pd.DataFrame(rows)
    name = f"pets_planners_{cli.env_id}" + (f"_{base.episode_length}steps" if cli.episode_length else "")
    df.to_csv(RESULTS / f"{name}.csv", index=False)
    lines = [f"# {cli.env_id}: the optimizers with the true dynamics at equal budgets", "",
             f"`python benchmarks/pets_planners.py --env-id {cli.env_id} --episodes {cli.episodes} --fractions "
             f"{' '.join(str(f) for f in cli.fractions)}" + (f" --episode-length {cli.episode_length}" if cli.episode_length else "")
             + "`", "",
             f"{base.episode_length}-step episodes, the same {cli.episodes} starts for every row; horizon {base.horizon}, "
             f"{base.cem_iterations} iterations; budget 1 = CEM's preset, {full} sequences per step. Zero actions: "
             f"{df.zero_action_mean.iloc[0]:.1f}.", "",
             "| budget | sequences / step | optimizer | population (first) | elites | return mean ± std | min | s / episode |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fraction']:g} | {r['sequences_per_step']} | {r['optimizer']} | {r['population']} | "
                     f"{r['num_elites']} | {r['mean']:.1f} ± {r['std']:.1f} | {r['min']:.1f} | {r['seconds_per_episode']} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / name}.csv and .md")


if __name__ == "__main__":
    main()
