"""Reproduction of DAM's Table 1 (Haghgoo et al. 2021): 2 envs x 2 model families x 4 methods,
each cell one vmapped run of `--seeds` seeds with dam.py's defaults (J = 10 rounds), plus per
env the same planner with the true dynamics (`--model true`: its ceiling). Each seed's final
model is evaluated on `--eval-episodes` planner episodes apart from data collection
(Intersection: half with each turn); a cell reports their mean +- standard error over seeds,
and each method's difference to the baseline of the same env and model and to the true-model
planner, paired over seeds (seed i of every cell uses the same keys), +- its standard error,
next to the paper's numbers; beside it, per cell, the ranking oracle on each seed's final model
(benchmarks/dam_ranking.py: Spearman with the true values, the true value of the planner's pick)
and the last round's discriminator on held-out data (E_p[exp(-logit)], E_q[exp(logit)], accuracy).

    python benchmarks/dam_table.py [--seeds 10] [--rounds 10] [--cells IcyRoad/mdn/dam ...]
    python benchmarks/dam_table.py --particles 1 --cells IcyRoad/gaussian/baseline ...  # Alg. 1's single draw

Resumable: each finished cell is appended to benchmarks/results/dam_table1.csv (one row per
seed) and skipped on the next start; the markdown table (dam_table1.md) is rebuilt from the
CSV after every cell, with the wall-clock time of each cell. (Earlier code's tables, kept:
dam_table_eval*.{csv,md}, before the calibrated discriminator, Alg. 3's order and Eq. 21 as written
on Intersection; dam_table.{csv,md} and dam_table_p1.*, one collected episode per seed, old crash rule.)
"""

import argparse
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from dam_ranking import planner_values, ranking_problem
from scipy.stats import spearmanr

import envs
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
CELLS = [(env, model, method) for env in dam.ENV_IDS for model in ("true", "gaussian", "mdn")
         for method in (("baseline",) if model == "true" else dam.METHODS)]


# The final discriminator on held-out data (dam.py's metrics of the last round): E_p[exp(-logit)] on
# real and E_q[exp(logit)] on model transitions (both 1 when calibrated), loss and accuracy.
CALIBRATION = {"disc/holdout_ratio_real": "disc_ratio_real", "disc/holdout_ratio_model": "disc_ratio_model",
               "disc/holdout_loss": "disc_holdout_loss", "disc/holdout_accuracy": "disc_holdout_accuracy"}


def ranking(args, env, env_params, state):
    """The ranking oracle (benchmarks/dam_ranking.py) for each seed's final model and discriminator:
    Spearman of the cell's planner values with the true values of 1000 random sequences from the start
    state, and the true value of the sequence it would pick, as a share of the best true value."""
    obs, sequences, truth = ranking_problem(args, env, env_params)
    values, _ = jax.jit(jax.vmap(partial(planner_values, args, env, env_params), (0, None, None)))(state, obs, sequences)
    values = np.asarray(values)
    rho = [spearmanr(v, truth).statistic for v in values]
    return np.array(rho), truth[values.argmax(1)] / truth.max()


def run_cell(env_id, model, method, seeds, rounds, particles, eval_episodes):
    args = dam.resolve(dam.Args(env_id=env_id, model=model, method=method, num_seeds=seeds, rounds=rounds,
                                num_particles=particles, eval_episodes=eval_episodes, progress=False))
    trainer = dam.make_train(args)
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(jax.jit(jax.vmap(trainer.train))(dam.seed_keys(args)))
    # block: the evaluation is dispatched asynchronously (rows before 2026-12-02 16:45 UTC
    # timed its compile but not its run)
    _, evaluation = jax.block_until_ready(jax.jit(jax.vmap(trainer.evaluate))(state, dam.eval_keys(args)))
    seconds = time.perf_counter() - start
    metrics, evaluation = jax.tree.map(np.asarray, (metrics, evaluation))
    utils.assert_finite({**metrics, **evaluation}, f"{env_id}/{model}/{method}")
    returns = metrics["charts/episode_return"]  # (seeds, rounds)
    crashes = evaluation.get("eval/crash_frac", np.full(seeds, np.nan))
    turns = {name: evaluation.get(f"eval/return_{turn}_turn", np.full(seeds, np.nan))
             for name, turn in [("eval_return_left", "left"), ("eval_return_right", "right")]}  # Intersection
    rho, pick = ranking(args, *dam.make_env(args), state)
    calibration = {name: metrics[key][:, -1] if key in metrics else np.full(seeds, np.nan)
                   for key, name in CALIBRATION.items()}
    return pd.DataFrame({"env": env_id, "model": model, "method": method, "seed": np.arange(seeds),
                         "eval_return": evaluation["eval/return"], "eval_crash_frac": crashes, **turns,
                         "final_return": returns[:, -1], "mean_return_all_rounds": returns.mean(1),
                         "rank_spearman": rho, "rank_pick_of_best": pick, **calibration, "seconds_cell": seconds})


def run_reading(env_id, overrides, model, seeds, eval_episodes):
    """The baseline cell (J = 10 rounds) of `model` on the env made with `overrides` (a reading of its
    open choices: dam_icy_readings.py, dam_intersection_readings.py)."""
    made = envs.make(env_id, **overrides)
    original = dam.make_env
    dam.make_env = lambda args: made  # this reading's env for the whole cell (dam.py makes the default)
    try:
        return run_cell(env_id, model, "baseline", seeds, 10, None, eval_episodes)
    finally:
        dam.make_env = original


def readings_parser(doc, readings):
    """The command line of the readings benchmarks."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--readings", nargs="*", default=list(readings), choices=list(readings))
    parser.add_argument("--models", nargs="*", default=["true", "gaussian", "mdn"], choices=["true", "gaussian", "mdn"])
    return parser


def by_model(cells):
    """{model: "mean ± s.e." of its eval returns, or "-"} for the rows of one reading."""
    shown = {}
    for model in ("true", "gaussian", "mdn"):
        cell = cells[cells.model == model] if len(cells) else cells
        shown[model] = "-" if len(cell) == 0 else "{:.2f} ± {:.2f}".format(*mean_se(cell.eval_return))
    return shown


def mean_se(x):
    x = np.asarray(x, float)
    return x.mean(), (x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan"))


def table(df):
    lines = ["| env | model | method | ours: eval return (mean ± s.e.) | minus baseline, paired (mean ± s.e.) "
             "| minus true model, paired | crashed | ranking: Spearman / pick | held-out E_p[exp(-logit)] / "
             "E_q[exp(logit)] / accuracy | seeds | paper (3 seeds) | cell wall-clock (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def median(cell, column, fmt):
        values = cell[column].dropna() if column in cell else []
        return "-" if len(values) == 0 else format(float(np.median(values)), fmt)

    def paired(cell, env_id, model, method):
        """cell - the same env's (model, method) cell, seed by seed (seed i: the same keys)."""
        other = df[(df.env == env_id) & (df.model == model) & (df.method == method)].set_index("seed")["eval_return"]
        diff = (cell.set_index("seed")["eval_return"] - other).dropna()
        return "-" if diff.empty else "{:+.2f} ± {:.2f}".format(*mean_se(diff))

    for (env_id, model, method), cell in df.groupby(["env", "model", "method"], sort=False):
        m, se = mean_se(cell["eval_return"])
        diff = "-" if method == "baseline" else paired(cell, env_id, model, "baseline")
        below_true = "-" if model == "true" else paired(cell, env_id, "true", "baseline")
        crash = cell["eval_crash_frac"].mean()
        paper = PAPER.get((env_id, model), {}).get(method, "-")
        rank = f"{median(cell, 'rank_spearman', '.2f')} / {median(cell, 'rank_pick_of_best', '.2f')}"
        calibration = " / ".join(median(cell, c, f) for c, f in [("disc_ratio_real", ".3g"), ("disc_ratio_model", ".3g"),
                                                                 ("disc_holdout_accuracy", ".2f")])
        lines.append(f"| {env_id} | {model} | {method} | {m:.2f} ± {se:.2f} | {diff} | {below_true} | "
                     f"{'-' if np.isnan(crash) else f'{crash:.0%}'} | {rank} | {calibration} | {len(cell)} | {paper} | "
                     f"{cell['seconds_cell'].iloc[0]:.0f} |")
    total = df.groupby(["env", "model", "method"])["seconds_cell"].first().sum()
    lines.append(f"\nWall-clock of these cells (compile + run): {total:.0f} s on {jax.devices()[0].platform}. Ranking: the "
                 "oracle of benchmarks/dam_ranking.py on each seed's final model, Spearman of the planner's values with the "
                 "true values of 1000 random sequences from the start state, and the true value of its pick over the best; "
                 "calibration: the last round's discriminator on held-out data (1 / 1 when calibrated); medians over seeds.")
    return "\n".join(lines)


def run_cells(csv, markdown, cells, run, table, label_columns):
    """The resumable loop of the DAM benchmarks: run each cell (a dict of its label columns) that
    `csv` does not hold yet, append its rows to `csv` and rebuild `markdown` after each; returns
    every row."""
    # The labels as read: strings (a column of only "true" would otherwise read as booleans).
    done = pd.read_csv(csv, dtype={k: str for k in label_columns}) if csv.exists() else pd.DataFrame(columns=label_columns)
    for labels in cells:
        if np.logical_and.reduce([done[k] == v for k, v in labels.items()]).any():
            continue
        cell = run(**labels).assign(**labels)
        done = pd.concat([done, cell], ignore_index=True) if len(done) else cell
        done.to_csv(csv, index=False)
        markdown.write_text(table(done) + "\n")
        print(f"{'/'.join(map(str, labels.values()))}: {cell.eval_return.mean():.2f}", flush=True)
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cells", nargs="*", default=None, help="env/model/method, e.g. IcyRoad/mdn/dam")
    parser.add_argument("--particles", type=int, default=None,
                        help="model rollouts per sequence (default: dam.py's preset); results go to dam_table1_p<N>.*")
    parser.add_argument("--eval-episodes", type=int, default=20, help="planner episodes per seed for the final model")
    parser.add_argument("--out-dir", default=str(RESULTS))
    cli = parser.parse_args()
    suffix = "" if cli.particles is None else f"_p{cli.particles}"
    out = Path(cli.out_dir)
    csv, markdown = out / f"dam_table1{suffix}.csv", out / f"dam_table1{suffix}.md"
    utils.enable_compilation_cache()
    cells = CELLS if cli.cells is None else [tuple(c.split("/")) for c in cli.cells]
    out.mkdir(parents=True, exist_ok=True)
    done = run_cells(csv, markdown, [dict(env=env_id, model=model, method=method) for env_id, model, method in cells],
                     lambda env, model, method: run_cell(env, model, method, cli.seeds, cli.rounds, cli.particles,
                                                         cli.eval_episodes), table, ["env", "model", "method"])
    markdown.write_text(table(done) + "\n")  # also after a run with nothing left to do (a new table layout)
    print(table(done))


if __name__ == "__main__":
    main()
