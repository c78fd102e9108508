"""The paper's Figure 2 (Knight & Achiam): true TDML vs model SGD steps, one-step vs TDML-trained
models, for the three architectures of App. C (columns) and the two discounts 0.9 / 0.95 (rows).

    # the data policy: benchmarks/results/tdml/sac_policy (committed; made by)
    python algorithms/sac.py --env-id hopper --total-timesteps 10000 --run-dir benchmarks/results/tdml --run-name sac_policy
    python benchmarks/tdml_figure.py --model-steps 300 --backend positional   # the committed figure; resumable, a larger value extends the runs
    python benchmarks/tdml_figure.py --fixed-starts --eval-starts 64 --isolated --out-dir benchmarks/results/tdml_gym
        # the papers' task, fixed evaluation states, and the second row: Algorithm 1 from each
        # architecture's final one-step model with a critic first trained alone (--critic-warmup)

The x-axis is model SGD steps, so both losses are compared at equal model updates: a TDML run
of M model steps is M * d iterations of Algorithm 1 (a critic step each, a model step every
d = 10), a one-step run M model steps. Runs: per architecture one one-step run (gamma does not
enter its training; its true TDML is reported at every gamma via --eval-gammas) and one TDML run
per gamma, each with --num-seeds seeds vmapped. Resumable: each run lives in
benchmarks/results/tdml/runs/<env>-<arch>-one-step/ or <env>-<arch>-tdml-g<gamma>/; started
again, finished runs are skipped, a killed one continues from its last checkpoint
(`tdml.py --resume`, identical results), and one started with a larger --model-steps is extended.
Started with other arguments than a stored run's, it stops and lists the differences. After
every run it rewrites tdml_<env>.csv (one row per evaluation and seed), tdml_<env>.png (the
figure: mean over seeds, shaded min..max as the paper's) and tdml_<env>.md (the last evaluation
of every cell, with the critic's tail estimate and the gradient cosine of tdml.py's diagnostics).

CPU scale (defaults; the paper's values in brackets, all flags): 3 seeds; 100 trajectories
x 1000 steps of data [1000 x 1000]; critic batch 256 [2048]; --model-steps [the paper's axis
runs to ~10^5 SGD steps]; true TDML over 16 start states x 1000 steps as the paper. The
architectures, learning rates, kappa, d, tau and the critic's width are the paper's.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from algorithms import tdml, utils  # noqa: E402

# Relative to the working directory (the repo root in the commands above), so the run directories
# and the policy path stored in each run's args.json stay valid in any checkout.
RESULTS = Path(os.path.relpath(Path(__file__).parent / "results" / "tdml"))
COLUMNS = {"charts/model_updates": "model_updates", "eval/true_tdml": "true_tdml",
           "eval/final_step_error": "final_step_error",
           "eval/clipped_frac": "clipped_frac", "eval/one_step": "one_step",
           "eval/open_loop_n_step": "open_loop_n_step", "eval/closed_loop_n_step": "closed_loop_n_step",
           "eval/grad_cos": "grad_cos", "eval/critic_tail": "critic_tail", "eval/true_tail": "true_tail",
           "eval/identity_tdml": "identity_tdml", "eval/data_mean_tdml": "data_mean_tdml",
           "charts/steps_per_second": "steps_per_second"}


def grid_args(cli):
    """tdml.Args of every run of the grid, in the order they run (cheapest architecture first). A
    one-step model does not depend on gamma: one run per architecture, measured at every gamma."""
    for arch in cli.archs:
        runs = [("tdml", gamma, ()) for gamma in cli.gammas] if "tdml" in cli.losses else []
        if "one-step" in cli.losses:
            runs.insert(0, ("one-step", cli.gammas[0], tuple(cli.gammas[1:])))
        one_step = Path(cli.out_dir) / "runs" / f"{cli.env_id}-{arch}-one-step"
        if cli.isolated and "one-step" in cli.losses:  # after the one-step run whose model they start from
            runs += [("isolated", gamma, ()) for gamma in cli.gammas]
        for loss, gamma, eval_gammas in runs:
            name = {"one-step": one_step.name, "tdml": f"{cli.env_id}-{arch}-tdml-g{gamma}",
                    "isolated": f"{cli.env_id}-{arch}-tdml-g{gamma}-from-one-step"}[loss]
            per_model_step = 1 if loss == "one-step" else tdml.Args.update_delay  # iterations per model step
            warmup = cli.critic_warmup if loss == "isolated" else 0
            isolated = dict(init_model_run=str(one_step), critic_warmup=warmup,
                            critic_batch_size=cli.isolated_critic_batch) if loss == "isolated" else {}
            yield tdml.Args(**{
                **dict(env_id=cli.env_id, seed=cli.seed, num_seeds=cli.num_seeds,
                       total_steps=warmup + cli.model_steps * per_model_step, eval_every=cli.eval_every * per_model_step,
                       run_dir=str(Path(cli.out_dir) / "runs"), run_name=name, progress=cli.progress,
                       policy_run=cli.policy_run, num_trajectories=cli.num_trajectories,
                       trajectory_length=cli.trajectory_length, arch=arch, loss="one-step" if loss == "one-step" else "tdml",
                       gamma=gamma, eval_gammas=eval_gammas, critic_batch_size=cli.critic_batch_size,
                       eval_horizon=cli.eval_horizon, eval_starts=cli.eval_starts, eval_fixed_starts=cli.fixed_starts),
                **({"backend": cli.backend} if cli.backend else {}), **isolated})


def run_cell(args):
    """Run (or resume, extend, or skip) one cell; returns its run directory."""
    path = Path(args.run_dir) / args.run_name
    wanted = json.loads(json.dumps(dataclasses.asdict(tdml.resolve(args))))
    if (path / "args.json").exists():
        stored = json.loads((path / "args.json").read_text())
        if stored["total_steps"] < wanted["total_steps"]:  # extend: the same run, continued further
            stored["total_steps"] = wanted["total_steps"]
            (path / "args.json").write_text(json.dumps(stored, indent=2))
        defaults = dataclasses.asdict(tdml.Args())  # a flag added after the run was stored: its default
        diff = {k: (stored.get(k, defaults.get(k)), v) for k, v in wanted.items()
                if k not in ("progress", "track", "wandb_project") and stored.get(k, defaults.get(k)) != v}  # host-only flags
        utils.check(not diff, f"{path} was started with other arguments (stored -> requested): "
                    + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
                    + "; use another --out-dir or delete the directory")
        done = json.loads((path / "checkpoint.json").read_text())["env_steps"] if (path / "checkpoint.json").exists() else 0
        if done >= args.total_steps:
            return path
        utils.check(done == 0 or (path / "checkpoint.eqx").exists(),
                    f"{path} has no checkpoint.eqx (checkpoints are not committed): delete the directory to rerun it")
        if done > 0:
            tdml.run(tdml.Args(resume=str(path)))
            return path
    tdml.run(args)
    return path


def collect(paths):
    frames = []
    for path in paths:
        file = path / "metrics.csv"
        if not file.exists():
            continue
        args = json.loads((path / "args.json").read_text())
        df = pd.read_csv(file)
        for gamma in [args["gamma"], *args["eval_gammas"]]:  # a one-step run gives a row per gamma
            tdml_at = {} if gamma == args["gamma"] else {f"eval/true_tdml_gamma{gamma}": "eval/true_tdml",
                                                          "eval/true_tdml": "unused"}
            cell = df.rename(columns=tdml_at).reindex(columns=["steps", "seed", *COLUMNS]).rename(columns=COLUMNS)
            if gamma != args["gamma"]:  # the gradient cosine and trivial lines: at the run's own gamma only
                cell[["grad_cos", "identity_tdml", "data_mean_tdml"]] = float("nan")
            loss = "tdml-from-one-step" if args.get("init_model_run") else args["loss"]
            frames.append(cell.assign(arch=args["arch"], gamma=gamma, loss=loss))
    return pd.concat(frames, ignore_index=True) if frames else None


def write_outputs(data, cli):
    stem = Path(cli.out_dir) / f"tdml_{cli.env_id}"
    data = data[["arch", "gamma", "loss", "seed", "steps", *COLUMNS.values()]]
    data.to_csv(stem.with_suffix(".csv"), index=False)

    fig, axes = plt.subplots(len(cli.gammas), len(cli.archs), figsize=(4 * len(cli.archs), 3.2 * len(cli.gammas)),
                             squeeze=False)
    for row, gamma in enumerate(cli.gammas):
        for col, arch in enumerate(cli.archs):
            ax = axes[row][col]
            for loss, color in [("one-step", "tab:blue"), ("tdml", "tab:red"), ("tdml-from-one-step", "tab:green")]:
                cell = data[(data.arch == arch) & (data.gamma == gamma) & (data.loss == loss)]
                if cell.empty:
                    continue
                stats = cell.groupby("model_updates")["true_tdml"].agg(["mean", "min", "max", "count"])
                name = {"one-step": "One-Step", "tdml": "TDML", "tdml-from-one-step": "TDML from the One-Step model"}[loss]
                label = f"{name} ({cell['seed'].nunique()} seeds)"
                ax.plot(stats.index, stats["mean"], color=color, label=label)
                # the band: min and max over the seeds (the paper smooths over a 1000-step window instead)
                ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.2)
            # The trivial models on the same evaluation states (runs from before they were logged: none).
            ref = data[(data.gamma == gamma)].groupby("model_updates")[["identity_tdml", "data_mean_tdml"]].mean()
            for name, style in [("identity_tdml", ":"), ("data_mean_tdml", "--")]:
                if ref[name].notna().any():
                    ax.plot(ref.index, ref[name], color="0.4", linestyle=style,
                            label="nothing changes" if name == "identity_tdml" else "the data's mean state")
            ax.set_yscale("log")
            ax.set_title(f"{arch}, gamma = {gamma}", fontsize=10)
            ax.set_xlabel("model SGD steps")
            ax.set_ylabel("true TDML (Eq. 3)")
            ax.legend(fontsize=7)
    fig.suptitle(f"{cli.env_id}: true TDML from {cli.eval_starts} buffer states{' (fixed)' if cli.fixed_starts else ''}, "
                 f"{cli.eval_horizon}-step closed-loop rollouts", fontsize=10)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)

    last = data[data.steps == data.groupby(["arch", "gamma", "loss"])["steps"].transform("max")]
    table = last.groupby(["arch", "gamma", "loss"]).agg(
        steps=("steps", "first"), model_updates=("model_updates", "first"), seeds=("seed", "count"),
        true_tdml=("true_tdml", "mean"), true_tdml_std=("true_tdml", "std"),
        final_step_error=("final_step_error", "mean"), clipped_frac=("clipped_frac", "mean"),
        one_step=("one_step", "mean"), closed_loop_n_step=("closed_loop_n_step", "mean"),
        grad_cos=("grad_cos", "mean"), critic_tail=("critic_tail", "mean"), true_tail=("true_tail", "mean"))
    lines = [f"| arch | gamma | loss | iterations | model steps | seeds | true TDML (mean ± std) | error at step {cli.eval_horizon} "
             "| rollout steps at the clip | one-step loss | closed-loop 5-step loss | grad cosine with true TDML "
             "| critic at (s_2, s_hat_2) / true tail |", "|" + "---|" * 13]
    for (arch, gamma, loss), r in table.iterrows():
        tail = f"{r.critic_tail:.4g} / {r.true_tail:.4g}" if loss != "one-step" else "-"
        lines.append(f"| {arch} | {gamma} | {loss} | {r.steps:.0f} | {r.model_updates:.0f} | {r.seeds:.0f} "
                     f"| {r.true_tdml:.4g} ± {r.true_tdml_std:.2g} | {r.final_step_error:.4g} | {r.clipped_frac:.0%} "
                     f"| {r.one_step:.4g} | {r.closed_loop_n_step:.4g} | {r.grad_cos:.3f} | {tail} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy-run", default=str(RESULTS / "sac_policy"), help="SAC run directory of the data policy")
    parser.add_argument("--env-id", default="hopper")
    parser.add_argument("--backend", default=None, help="the env's backend (default: envs' own; the committed figure: positional)")
    parser.add_argument("--archs", nargs="+", default=["slbo", "mpo", "metrpo"], choices=list(tdml.ARCHS))
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.9, 0.95])
    parser.add_argument("--losses", nargs="+", default=list(tdml.LOSSES), choices=list(tdml.LOSSES))
    parser.add_argument("--num-seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-steps", type=int, default=300, help="model SGD steps per run (TDML: x d iterations)")
    parser.add_argument("--eval-every", type=int, default=25, help="model steps between evaluations")
    parser.add_argument("--num-trajectories", type=int, default=100)
    parser.add_argument("--trajectory-length", type=int, default=1000)
    parser.add_argument("--critic-batch-size", type=int, default=256)
    parser.add_argument("--eval-horizon", type=int, default=1000)
    parser.add_argument("--eval-starts", type=int, default=16, help="buffer states the true TDML is averaged over")
    parser.add_argument("--fixed-starts", action="store_true",
                        help="the same evaluation states at every evaluation (tdml.py --eval-fixed-starts)")
    parser.add_argument("--isolated", action="store_true",
                        help="also Algorithm 1 from each architecture's final one-step model (the objective isolated)")
    parser.add_argument("--critic-warmup", type=int, default=2500,
                        help="iterations of the critic alone before those runs' first model step")
    parser.add_argument("--isolated-critic-batch", type=int, default=2048, help="their critic batch (the paper's)")
    parser.add_argument("--progress", action="store_true", help="progress bar per run")
    parser.add_argument("--out-dir", default=str(RESULTS))
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    Path(cli.out_dir).mkdir(parents=True, exist_ok=True)
    cells = list(grid_args(cli))
    utils.check(cli.critic_warmup % (cli.eval_every * tdml.Args.update_delay) == 0,
                f"--critic-warmup must be a multiple of --eval-every x d = {cli.eval_every * tdml.Args.update_delay}")
    for args in cells:  # every cell's arguments are checked before anything compiles (its start model: when it runs)
        tdml.resolve(dataclasses.replace(args, init_model_run=None))
    paths = []
    for i, args in enumerate(cells):
        start = time.perf_counter()
        paths.append(run_cell(args))
        print(f"[{i + 1}/{len(cells)}] {args.run_name}: {time.perf_counter() - start:.0f} s", flush=True)
        data = collect(paths)
        if data is not None:
            write_outputs(data, cli)


if __name__ == "__main__":
    main()
