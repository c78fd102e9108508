"""Compare runs: eval return vs env steps, mean and spread over seeds, one PNG.

    python benchmarks/plot.py runs/a runs/b ...                    # -> runs_plot.png
    python benchmarks/plot.py runs/a runs/b --out cmp.png --metric charts/train_return --label A B

Every argument is a run directory written by an algorithm file (metrics.csv: one row per seed and
chunk). The metric defaults to the first of eval/return (sac, mbpo), charts/trial_return (pets),
charts/episode_return (dam) and eval/true_tdml (tdml) that the run has; the x-axis is env_steps,
or steps (tdml's iterations) where there is no env_steps column. The line is the mean over the
run's seeds at each x, the band its min-max (`--spread std` for mean +- std); the legend gives
each line's seed count. Runs given the same `--label` are pooled into one line (e.g. one seed
per run: `--label mbpo mbpo mbpo sac sac sac`).
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

DEFAULT_METRICS = ("eval/return", "charts/trial_return", "charts/episode_return", "eval/true_tdml")


def fail(message):
    raise SystemExit(f"error: {message}")


def load(run, metric):
    file = Path(run) / "metrics.csv"
    if not file.exists():
        fail(f"{run}: no metrics.csv (not a run directory, or no chunk finished yet)")
    data = pd.read_csv(file)
    x = "env_steps" if "env_steps" in data else "steps"
    metric = metric or next((m for m in DEFAULT_METRICS if m in data), None)
    if metric not in data:
        fail(f"{run}: no metric {metric!r}; it has {', '.join(c for c in data.columns if '/' in c)}")
    return data[[x, "seed", metric]].rename(columns={x: "x", metric: "y"}), x, metric


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--metric", default=None, help="column of metrics.csv (default: see above)")
    parser.add_argument("--label", nargs="+", default=None, help="one legend label per run (default: its directory name)")
    parser.add_argument("--spread", choices=("minmax", "std"), default="minmax")
    parser.add_argument("--out", default="runs_plot.png")
    cli = parser.parse_args()
    if cli.label is not None and len(cli.label) != len(cli.runs):
        fail(f"{len(cli.label)} labels for {len(cli.runs)} runs")
    loaded = [load(run, cli.metric) for run in cli.runs]  # every run checked before anything is drawn
    labels = cli.label or [Path(run).name if [Path(r).name for r in cli.runs].count(Path(run).name) == 1
                           else "/".join(Path(run).parts[-2:]) for run in cli.runs]
    lines = {}  # label -> that label's runs, pooled (a seed is identified by its run and seed number)
    for i, (label, (data, _, _)) in enumerate(zip(labels, loaded)):
        lines.setdefault(label, []).append(data.assign(seed=data["seed"].astype(str) + f"@{i}"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, frames in lines.items():
        data = pd.concat(frames)
        stats = data.groupby("x")["y"].agg(["mean", "std", "min", "max"])
        low, high = ((stats["min"], stats["max"]) if cli.spread == "minmax"
                     else (stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0)))
        ax.plot(stats.index, stats["mean"], label=f"{label} ({data['seed'].nunique()} seeds)")
        ax.fill_between(stats.index, low, high, alpha=0.2)
    metrics = sorted({m for _, _, m in loaded})
    ax.set(xlabel=" / ".join(sorted({x for _, x, _ in loaded})), ylabel=" / ".join(metrics),
           title=f"mean over seeds, band: {'min-max' if cli.spread == 'minmax' else '± std'}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(cli.out, dpi=100)
    print(f"wrote {cli.out}")


if __name__ == "__main__":
    main()
