"""Reproduction of DAM's Table 1 (Haghgoo et al. 2021): 2 envs x 2 model families x 4 methods,
each cell one vmapped run of `--seeds` seeds with dam.py's defaults (J = 10 rounds), reported as
mean +- standard error over seeds of the final round's return, next to the paper's numbers.

    python benchmarks/dam_table.py [--seeds 10] [--rounds 10] [--cells IcyRoad/mdn/dam ...]
    python benchmarks/dam_table.py --particles 1 --cells IcyRoad/gaussian/baseline ...  # Alg. 1's single draw

Resumable: each finished cell is appended to benchmarks/results/dam_table.csv (one row per seed)
and skipped on the next start; the markdown table (benchmarks/results/dam_table.md) is rebuilt
from the CSV after every cell, with the wall-clock time of each cell.
"""

import argparse
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from algorithms import dam, utils

RESULTS = Path(__file__).parent / "results"
# Paper Table 1: mean +- standard error over 3 seeds.
PAPER = {
    ("IcyRoad", "gaussian"): {"baseline": "0.71 ± 1.72", "minvar": "0.86 ± 0.79", "disc": "4.88 ± 0.50", "dam": "2.32 ± 1.76"},
    ("IcyRoad", "mdn"): {"baseline": "5.34 ± 0.84", "minvar": "4.55 ± 3.50", "disc": "3.30 ± 2.75", "dam": "7.94 ± 0.92"},
    ("Intersection", "gaussian"): {"baseline": "62.67 ± 22.10", "minvar": "31.40 ± 1.111", "disc": "87.79 ± 15.34",
                                   "dam": "46.76 ± 9.543"},
    ("Intersection", "mdn"): {"baseline": "29.58 ± 0.105", "minvar": "31.30 ± 1.634", "disc": "60.18 ± 19.58",
                              "dam": "97.72 ± 5.127"},
}
CELLS = [(env, model, method) for env in dam.ENV_IDS for model in dam.MODELS for method in dam.METHODS]


def run_cell(env_id, model, method, seeds, rounds, particles):
    args = dam.resolve(dam.Args(env_id=env_id, model=model, method=method, num_seeds=seeds, rounds=rounds,
                                num_particles=particles, progress=False))
    train = jax.jit(jax.vmap(dam.make_train(args).train))
    start = time.perf_counter()
    _, metrics = jax.block_until_ready(train(dam.seed_keys(args)))
    seconds = time.perf_counter() - start
    metrics = jax.tree.map(np.asarray, metrics)
    utils.assert_finite(metrics, f"{env_id}/{model}/{method}")
    returns = metrics["charts/episode_return"]  # (seeds, rounds)
    return pd.DataFrame({"env": env_id, "model": model, "method": method, "seed": np.arange(seeds),
                         "final_return": returns[:, -1], "mean_return_all_rounds": returns.mean(1),
                         "seconds_cell": seconds})


def table(df):
    lines = ["| env | model | method | ours: final return (mean ± s.e.) | seeds | paper (3 seeds) | cell wall-clock (s) |",
             "|---|---|---|---|---|---|---|"]
    for (env_id, model, method), cell in df.groupby(["env", "model", "method"], sort=False):
        r = cell["final_return"].to_numpy()
        se = r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else float("nan")
        lines.append(f"| {env_id} | {model} | {method} | {r.mean():.2f} ± {se:.2f} | {len(r)} | "
                     f"{PAPER[(env_id, model)][method]} | {cell['seconds_cell'].iloc[0]:.0f} |")
    total = df.groupby(["env", "model", "method"])["seconds_cell"].first().sum()
    lines.append(f"\nWall-clock of these cells (compile + run): {total:.0f} s on {jax.devices()[0].platform}.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cells", nargs="*", default=None, help="env/model/method, e.g. IcyRoad/mdn/dam")
    parser.add_argument("--particles", type=int, default=None,
                        help="model rollouts per sequence (default: dam.py's preset); results go to dam_table_p<N>.*")
    cli = parser.parse_args()
    suffix = "" if cli.particles is None else f"_p{cli.particles}"
    csv, markdown = RESULTS / f"dam_table{suffix}.csv", RESULTS / f"dam_table{suffix}.md"
    utils.enable_compilation_cache()
    cells = CELLS if cli.cells is None else [tuple(c.split("/")) for c in cli.cells]
    RESULTS.mkdir(exist_ok=True)
    done = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=["env", "model", "method"])
    for env_id, model, method in cells:
        if ((done.env == env_id) & (done.model == model) & (done.method == method)).any():
            continue
        cell = run_cell(env_id, model, method, cli.seeds, cli.rounds, cli.particles)
        done = pd.concat([done, cell], ignore_index=True) if len(done) else cell
        done.to_csv(csv, index=False)
        markdown.write_text(table(done) + "\n")
        print(f"{env_id}/{model}/{method}: {cell.final_return.mean():.2f} "
              f"({cell.seconds_cell.iloc[0]:.0f} s)", flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
