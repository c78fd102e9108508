"""Which TD target and critic output for tdml.py (--critic-target, --critic-output): a short run
of Algorithm 1 per variant on a small hopper data set, beside the one-step model at the same
number of model steps.

    python algorithms/sac.py --env-id hopper --total-timesteps 10000 --run-dir benchmarks/results/tdml --run-name sac_policy
    python benchmarks/tdml_target_check.py --policy-run benchmarks/results/tdml/sac_policy

Every variant: slbo, gamma 0.9, 20 trajectories x 1000 steps, critic batch 256, 1000 iterations
(100 model steps), the same seeds. Writes benchmarks/results/tdml/target_check.{csv,md}: the last
evaluation of each run (true TDML, share of rollouts at the clip, the critic's value at the pair
(s_2, s_hat_2) of the evaluation rollouts beside the true tail there) and the lowest critic value
the model update queried in the run. Resumable: finished runs are read, not rerun.
"""

import argparse
import json
from pathlib import Path

import pandas as pd

from algorithms import tdml, utils

RESULTS = Path(__file__).parent / "results" / "tdml"
VARIANTS = [  # (loss, critic target, critic output)
    ("tdml", "online", "softplus"), ("tdml", "online", "linear"), ("tdml", "target", "softplus"),
    ("tdml", "target", "linear"), ("tdml", "algorithm1", "softplus"), ("tdml", "algorithm1", "linear"),
    ("tdml", "online", "clamp"), ("tdml", "target", "clamp"), ("tdml", "algorithm1", "clamp"),
    ("one-step", "-", "-"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy-run", required=True)
    parser.add_argument("--num-seeds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--arch", default="slbo", choices=list(tdml.ARCHS))
    parser.add_argument("--out-dir", default=str(RESULTS))
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    out = Path(cli.out_dir)
    rows = []
    for loss, target, output in VARIANTS:
        # A one-step model takes a model step per iteration: 1/d of the iterations for equal model steps.
        steps = cli.iterations if loss == "tdml" else cli.iterations // tdml.Args.update_delay
        name = f"{cli.arch}-g{cli.gamma}-{loss}" + (f"-{target}-{output}" if loss == "tdml" else "")
        args = tdml.Args(env_id="hopper", policy_run=cli.policy_run, num_trajectories=20, trajectory_length=1000,
                         arch=cli.arch, loss=loss, gamma=cli.gamma, num_seeds=cli.num_seeds, total_steps=steps,
                         eval_every=steps // 4, critic_batch_size=256, progress=False,
                         critic_target=target if loss == "tdml" else "online",
                         critic_output=output if loss == "tdml" else "clamp",
                         run_dir=str(out / "target_check_runs"), run_name=name)
        path = out / "target_check_runs" / name
        if not (path / "summary.json").exists():
            tdml.run(args)
        df = pd.read_csv(path / "metrics.csv")
        summary = json.loads((path / "summary.json").read_text())
        last = df[df.steps == df.steps.max()]
        query_min = df.groupby("seed")["charts/critic_at_model_query_min"].min() if loss == "tdml" else None
        rows.append({
            "loss": loss, "critic_target": target, "critic_output": output, "iterations": steps,
            "model_steps": int(last["charts/model_updates"].iloc[0]), "seeds": len(last),
            "true_tdml": last["eval/true_tdml"].mean(), "true_tdml_max_seed": last["eval/true_tdml"].max(),
            "clipped_frac": last["eval/clipped_frac"].mean(), "final_step_error": last["eval/final_step_error"].mean(),
            "td_target": last["charts/td_target"].mean() if loss == "tdml" else float("nan"),
            "critic_tail": last["eval/critic_tail"].mean() if loss == "tdml" else float("nan"),
            "true_tail": last["eval/true_tail"].mean() if loss == "tdml" else float("nan"),
            "critic_query_min": query_min.min() if loss == "tdml" else float("nan"),
            "data_return": summary["data/return_mean"], "data_terminated_frac": summary["data/terminated_frac"],
        })
        table = pd.DataFrame(rows)
        table.to_csv(out / "target_check.csv", index=False)
        lines = ["| loss | critic target | critic output | iterations | model steps | seeds | true TDML (mean; worst seed) "
                 "| rollout steps at the clip | critic at (s_2, s_hat_2) | true tail there | lowest critic value queried |",
                 "|" + "---|" * 11]
        for r in table.itertuples():
            lines.append(f"| {r.loss} | {r.critic_target} | {r.critic_output} | {r.iterations} | {r.model_steps} "
                         f"| {r.seeds} | {r.true_tdml:.4g}; {r.true_tdml_max_seed:.4g} | {r.clipped_frac:.0%} "
                         f"| {r.critic_tail:.4g} | {r.true_tail:.4g} | {r.critic_query_min:.4g} |")
        lines.append(f"\nData: {cli.policy_run}, 20 trajectories, return until the first fall "
                     f"{table.data_return.iloc[0]:.1f}, share of trajectories that fell {table.data_terminated_frac.iloc[0]:.0%}.")
        (out / "target_check.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
