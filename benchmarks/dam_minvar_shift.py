"""DAM's minimum-variance model loss (Eq. 10) under its two shifts of the return, beside the
maximum-likelihood baseline: `--minvar-shift data` (R' = R - the lowest stored return, the smallest
shift that makes every return non-negative; dam.py's default) and `worst` (R' = R - T r_min, the
lowest possible return; the shift of Table 1's earlier minvar rows).

    python benchmarks/dam_minvar_shift.py --env-id Intersection --model gaussian --seeds 10

One vmapped run of `--seeds` seeds per setting (dam.py's defaults, J = 10 rounds), then the final
model of each seed drives 20 planner episodes apart from data collection, as
benchmarks/dam_table.py does; seed i of every setting uses the same keys, so differences are paired.
What the shift does to the loss is read from each seed's final dataset (every collected episode):
the spread of the episode weights (largest / smallest nonzero weight) and their effective sample
size, (sum w)^2 / sum w^2, out of the stored episodes. Writes
benchmarks/results/dam_minvar_shift_<env>_<model>.{csv,md}; resumable (a finished setting is skipped).
"""

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from dam_table import run_cells

from algorithms import dam, utils

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"baseline": dict(method="baseline"), "minvar, data shift": dict(method="minvar", minvar_shift="data"),
            "minvar, worst-case shift": dict(method="minvar", minvar_shift="worst")}


def run_setting(base, overrides):
    args = dam.resolve(dataclasses.replace(base, **overrides))
    trainer = dam.make_train(args)
    start = time.perf_counter()
    state, _ = jax.block_until_ready(jax.jit(jax.vmap(trainer.train))(dam.seed_keys(args)))
    _, evaluation = jax.block_until_ready(jax.jit(jax.vmap(trainer.evaluate))(state, dam.eval_keys(args)))
    seconds = time.perf_counter() - start
    # The weights of the last fit, on every collected episode (what the final model was fitted with).
    minvar = dam.resolve(dataclasses.replace(args, method="minvar"))
    weights = {shift: np.asarray(jax.vmap(lambda data: dam.trajectory_weights(
        dataclasses.replace(minvar, minvar_shift=shift), data))(state.data)) for shift in ("data", "worst")}
    evaluation = jax.tree.map(np.asarray, evaluation)
    utils.assert_finite(evaluation, str(overrides))
    rows = {"seed": np.arange(args.num_seeds), "eval_return": evaluation["eval/return"],
            "eval_crash_frac": evaluation.get("eval/crash_frac", np.full(args.num_seeds, np.nan)),
            "seconds": seconds}
    for shift, w in weights.items():
        stored = w[:, : int(state.data.size[0])]
        nonzero = np.where(stored > 0, stored, np.nan)
        rows[f"{shift}_spread"] = np.nanmax(nonzero, 1) / np.nanmin(nonzero, 1)
        rows[f"{shift}_ess"] = stored.sum(1) ** 2 / (stored**2).sum(1)
        rows["episodes"] = stored.shape[1]
    return pd.DataFrame(rows)


def table(df):
    lines = ["| setting | eval return (mean ± s.e.) | minus baseline, paired | crashed | episode-weight spread, "
             "data shift (median) | ESS, data shift | spread, worst-case shift | ESS, worst-case shift | seeds | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = df[df.setting == "baseline"].set_index("seed")["eval_return"]
    for name, cell in df.groupby("setting", sort=False):
        x = cell["eval_return"].to_numpy()
        diff = (cell.set_index("seed")["eval_return"] - base).dropna().to_numpy()
        paired = "-" if name == "baseline" or len(diff) < 2 else f"{diff.mean():+.2f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.2f}"
        crash = cell["eval_crash_frac"].mean()
        lines.append(f"| {name} | {x.mean():.2f} ± {x.std(ddof=1) / np.sqrt(len(x)):.2f} | {paired} | "
                     f"{'-' if np.isnan(crash) else f'{crash:.0%}'} | {cell['data_spread'].median():.1f} | "
                     f"{cell['data_ess'].median():.1f} of {cell['episodes'].iloc[0]} | {cell['worst_spread'].median():.2f} | "
                     f"{cell['worst_ess'].median():.1f} | {len(cell)} | {cell['seconds'].iloc[0]:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Intersection", choices=dam.ENV_IDS)
    parser.add_argument("--model", default="gaussian", choices=["gaussian", "mdn"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=dam.Args.rounds)
    parser.add_argument("--out-dir", default=str(RESULTS))
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    out = Path(cli.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, markdown = out / f"dam_minvar_shift_{cli.env_id}_{cli.model}.csv", out / f"dam_minvar_shift_{cli.env_id}_{cli.model}.md"
    base = dam.Args(env_id=cli.env_id, model=cli.model, num_seeds=cli.seeds, rounds=cli.rounds, progress=False)
    done = run_cells(csv, markdown, [dict(setting=name) for name in SETTINGS],
                     lambda setting: run_setting(base, SETTINGS[setting]), table, ["setting"])
    print(table(done))


if __name__ == "__main__":
    main()
