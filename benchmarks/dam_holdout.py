"""DAM's discriminator on held-out data, per round: early-stopped (dam.py's default) against the
same fit kept to its last Adam step, both with the same 20% of episodes held out.

    python benchmarks/dam_holdout.py --env-id Intersection --model gaussian --method disc --seeds 3
    python benchmarks/dam_holdout.py --env-id IcyRoad --model mdn --method dam --seeds 3

A calibrated density ratio has E_p[exp(-logit)] = E_q[exp(logit)] = 1 (held-out real data and
held-out model samples); the held-out log loss is the early-stopping criterion. The two runs share
every key, so their data differ only through the planner's choices. Writes
benchmarks/results/dam_holdout_<env>_<model>_<method>.{csv,md}: per round, the seeds' median of
each held-out metric and the in-sample E_q[exp(logit)] beside it, then each run's evaluation return.
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from algorithms import dam, utils

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["disc/holdout_loss", "disc/holdout_accuracy", "disc/holdout_ratio_real", "disc/holdout_ratio_model",
           "disc/best_step", "disc/ratio_on_model_samples"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Intersection", choices=dam.ENV_IDS)
    parser.add_argument("--model", default="gaussian", choices=["gaussian", "mdn"])
    parser.add_argument("--method", default="disc", choices=["disc", "dam"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=dam.Args.rounds)
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    base = dam.Args(env_id=cli.env_id, model=cli.model, method=cli.method, num_seeds=cli.seeds, rounds=cli.rounds,
                    progress=False)
    variants = {"early-stopped": {}, "last step": {"disc_eval_every": base.disc_train_steps}}
    frames, evals = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants.items():
            args = dam.resolve(dataclasses.replace(base, run_dir=tmp, run_name=name.replace(" ", "_"), **overrides))
            start = time.time()
            run_dir, _ = dam.run(args)
            df = pd.read_csv(run_dir.path / "metrics.csv")
            df["variant"] = name
            frames.append(df)
            summary = json.loads((run_dir.path / "summary.json").read_text())
            returns = np.asarray(summary["eval/return_per_seed"])
            evals[name] = (returns.mean(), returns.std(ddof=1) / np.sqrt(len(returns)) if len(returns) > 1 else 0.0,
                           round(time.time() - start))
            print(name, evals[name], flush=True)
    df = pd.concat(frames)
    stem = RESULTS / f"dam_holdout_{cli.env_id}_{cli.model}_{cli.method}"
    df.to_csv(f"{stem}.csv", index=False)
    table = df.groupby(["variant", "round"])[COLUMNS].median().reset_index()
    lines = [f"# DAM's discriminator on held-out data: {cli.env_id}, {cli.model}, {cli.method}", "",
             f"`python benchmarks/dam_holdout.py --env-id {cli.env_id} --model {cli.model} --method {cli.method} "
             f"--seeds {cli.seeds}" + (f" --rounds {cli.rounds}" if cli.rounds != dam.Args.rounds else "") + "` (dam.py's defaults otherwise; median over seeds; the fit after each round's "
             "episode; 1 = calibrated for both ratios)", "",
             "| variant | round | held-out loss | held-out accuracy | E_p[exp(-logit)] held-out | E_q[exp(logit)] held-out "
             "| kept step | E_q[exp(logit)] in-sample |", "|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['variant']} | {int(r['round'])} | {r['disc/holdout_loss']:.3f} | {r['disc/holdout_accuracy']:.3f} "
                     f"| {r['disc/holdout_ratio_real']:.3g} | {r['disc/holdout_ratio_model']:.3g} | {int(r['disc/best_step'])} "
                     f"| {r['disc/ratio_on_model_samples']:.3g} |")
    lines += ["", "| variant | evaluation return (mean ± s.e. over seeds) | wall-clock (s) |", "|---|---|---|"]
    lines += [f"| {name} | {m:.2f} ± {se:.2f} | {s} |" for name, (m, se, s) in evals.items()]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main()
