"""PETS learning curves: return of every trial, `--num-seeds` seeds vmapped in one program.

    python benchmarks/pets_curves.py --env-id inverted_pendulum --num-seeds 3
    python benchmarks/pets_curves.py --env-id reacher --num-seeds 3
    # CPU-sized: explicit flags for the main fields, --set for any other pets.Args field
    python benchmarks/pets_curves.py --env-id reacher --num-trials 30 --population 100 --elites 10 \\
        --particles 10 --model-width 64 --model-depth 3 --set horizon=20 model_lr=3e-3

Resumable: the run lives in benchmarks/results/curves/pets_<env>/pets/ (args.json with the full
resolved pets.Args, metrics.csv with every pets metric per trial and seed, checkpoint after every
trial); started again with the same arguments it continues from the last checkpoint (a run killed
during trial 7 redoes trial 7). Started with arguments that resolve differently from the stored
args.json it stops with the differences listed (use another --out-dir, or delete the run dir to
start over). `--max-new-trials K` stops after K trials in this invocation (for time-boxed sessions).

`--plot-only` redraws them from the stored run (with the true-dynamics line of
benchmarks/results/pets_oracle.csv, `pets_reference.py`'s rows, where one matches the planner).

After every trial it rewrites benchmarks/results/curves/pets_<env>.csv (trial, env_steps, seed,
return; trial 0 is the random-action trial, env_steps the step budget through the trial,
(trial + 1) x episode_length, as pets.py counts it) and pets_<env>.png (return, mean ± std over
seeds, vs trial).

Overrides: `--set key=value ...` sets any pets.Args field (dashes or underscores; the aliases
trials, elites, particles, iterations, epochs, width, depth name num_trials, num_elites,
num_particles, cem_iterations, model_epochs, model_width, model_depth); tuples are
comma-separated (`model_weight_decay=1e-5,1e-5,1e-4`), `none` restores a preset. If the model
depth is changed and the weight decays are not given, the decays are the default's first `depth`
hidden-layer values (the last one repeated if deeper) and its output-layer value; the resolved
values are printed and saved in args.json.
"""

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import jax
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from pets_reference import oracle_row  # noqa: E402  (this folder is on the path of a script run from it)

from algorithms import pets, utils  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "curves"
ALIASES = {"trials": "num_trials", "elites": "num_elites", "particles": "num_particles",
           "iterations": "cem_iterations", "epochs": "model_epochs", "width": "model_width", "depth": "model_depth"}
NOT_SETTABLE = {"env_id", "num_seeds", "seed", "run_dir", "run_name", "resume", "evaluate", "progress"}
FIELDS = {f.name: f for f in dataclasses.fields(pets.Args)}


def parse_value(name, text):
    """`text` as a value of pets.Args field `name`, from its type annotation."""
    kind = FIELDS[name].type
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if text.lower() == "none":
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        utils.check(text.lower() in ("true", "false", "1", "0"), f"--set {name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if typing.get_origin(kind) is tuple:
        return tuple(float(x) for x in text.split(","))
    try:
        return kind(text)
    except ValueError:
        raise SystemExit(f"error: --set {name}: cannot read {text!r} as {kind.__name__}")


def overrides_from(cli):
    out = {}
    for item in cli.set or []:
        utils.check("=" in item, f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        key = ALIASES.get(key, key)
        utils.check(key in FIELDS, f"--set: unknown pets.Args field {key!r}; valid: {', '.join(FIELDS)}")
        utils.check(key not in NOT_SETTABLE, f"--set {key}: use the script's own flag (or it is fixed by the script)")
        out[key] = parse_value(key, text)
    explicit = {"num_trials": cli.num_trials, "population": cli.population, "num_elites": cli.elites,
                "num_particles": cli.particles, "model_width": cli.model_width, "model_depth": cli.model_depth,
                "model_epochs": cli.epochs}
    for key, value in explicit.items():
        if value is not None:
            utils.check(key not in out, f"{key} given both as a flag and in --set")
            out[key] = value
    if "model_depth" in out and "model_weight_decay" not in out:
        default = pets.Args().model_weight_decay
        hidden = list(default[:-1])[: out["model_depth"]]
        hidden += [hidden[-1]] * (out["model_depth"] - len(hidden))
        out["model_weight_decay"] = (*hidden, default[-1])
        print(f"model depth {out['model_depth']}: weight decays {out['model_weight_decay']} (hidden layers, output)")
    return out


def as_json(args):
    return json.loads(json.dumps(dataclasses.asdict(args)))  # tuples -> lists, as stored in args.json


def open_run(path, args):
    """The run directory, created with `args`, or the existing one if its args.json agrees."""
    if (path / "args.json").exists():
        stored = json.loads((path / "args.json").read_text())
        wanted = as_json(args)
        diff = {k: (stored.get(k), wanted[k]) for k in wanted if stored.get(k) != wanted[k]}
        utils.check(not diff, f"{path} was started with other arguments (stored -> requested): "
                              + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
                              + "; rerun with the stored ones, use another --out-dir, or delete the directory")
        return utils.RunDir(path)
    return utils.RunDir(path, args)


def write_curves(run_dir, args, out_dir):
    """Rewrite pets_<env>.csv and .png from the run's metrics.csv."""
    file = run_dir.path / "metrics.csv"
    if not file.exists():
        return
    data = pd.read_csv(file)[["trial", "env_steps", "seed", "charts/trial_return"]]
    data = data.rename(columns={"charts/trial_return": "return"}).astype({"trial": int, "env_steps": int, "seed": int})
    stem = out_dir / f"pets_{args.env_id}"
    data.to_csv(stem.with_suffix(".csv"), index=False)
    stats = data.groupby("trial")["return"].agg(["mean", "std", "count"]).fillna({"std": 0.0})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(stats.index, stats["mean"], marker="o", markersize=3, label=f"PETS ({int(stats['count'].max())} seeds)")
    ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
    oracle = oracle_row(args)
    if oracle is None:
        print(f"no true-dynamics row for this planner in benchmarks/results/pets_oracle.csv: run pets_reference.py "
              f"--env-id {args.env_id} --population {args.population} --elites {args.num_elites} "
              f"--horizon {args.horizon} --iterations {args.cem_iterations} --optimizer {args.optimizer}")
    else:
        ax.axhline(oracle["oracle_mean"], color="black", linestyle="--", linewidth=1,
                   label=f"same planner, true dynamics ({int(oracle['episodes'])} episodes)")
    ax.set(xlabel="trial (0: random actions)", ylabel="trial return (mean ± std over seeds)",
           title=f"PETS {args.env_id}{f' ({args.backend})' if args.env_id in pets.envs.MUJOCO_TASKS else ''}: "
                 f"{args.optimizer}, pop {args.population}, P={args.num_particles}, H={args.horizon}, {args.cem_iterations} it., "
                 f"B={args.ensemble_size}x{args.model_depth}x{args.model_width}",
           xlim=(-0.5, args.num_trials - 0.5))
    ax.title.set_fontsize(9)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="inverted_pendulum")
    parser.add_argument("--num-seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed (vmapped seed i uses seed + i)")
    parser.add_argument("--num-trials", type=int, default=None, help="default: pets preset (15 / 100)")
    parser.add_argument("--population", type=int, default=None)
    parser.add_argument("--elites", type=int, default=None)
    parser.add_argument("--particles", type=int, default=None)
    parser.add_argument("--model-width", type=int, default=None)
    parser.add_argument("--model-depth", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="model epochs after every trial")
    parser.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="any other pets.Args field")
    parser.add_argument("--max-new-trials", type=int, default=None, help="stop after this many trials in this call")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where pets_<env>/, .csv and .png go")
    parser.add_argument("--plot-only", action="store_true",
                        help="only redraw the .csv and .png of the stored run from its args.json (no other flag used)")
    cli = parser.parse_args()
    if cli.plot_only:  # e.g. after a new true-dynamics row; a run stored by an older pets.Args redraws too
        path = Path(cli.out_dir) / f"pets_{cli.env_id}" / "pets"
        utils.check((path / "args.json").exists(), f"--plot-only: no run in {path}")
        stored = types.SimpleNamespace(**json.loads((path / "args.json").read_text()))
        write_curves(types.SimpleNamespace(path=path), stored, Path(cli.out_dir))
        return
    args = pets.resolve(pets.Args(env_id=cli.env_id, num_seeds=cli.num_seeds, seed=cli.seed, progress=False,
                                  **overrides_from(cli)))
    out_dir = Path(cli.out_dir)
    run_dir = open_run(out_dir / f"pets_{args.env_id}" / "pets", args)
    print(f"{run_dir.path}: {json.dumps(as_json(args))}", flush=True)
    utils.enable_compilation_cache()

    checkpoint = run_dir.path / "checkpoint.json"
    info = json.loads(checkpoint.read_text()) if checkpoint.exists() else {"env_steps": 0}
    done_trials = info.get("chunks", info["env_steps"] // args.episode_length)  # older runs: no "chunks"
    write_curves(run_dir, args, out_dir)
    if done_trials:
        print(f"continuing after trial {done_trials - 1} of {args.num_trials}", flush=True)
    stop = args.num_trials if cli.max_new_trials is None else min(args.num_trials, done_trials + cli.max_new_trials)
    if done_trials < stop:
        trainer = pets.make_train(args)
        chunk = jax.jit(jax.vmap(trainer.chunk, in_axes=(0, None)), donate_argnums=0)
        state = jax.jit(jax.vmap(trainer.init))(pets.seed_keys(args))

        def check(metrics, trials):
            # Trial 0 has random actions: no planning statistics (NaN by design); all else must be finite.
            utils.assert_finite({k: v for k, v in metrics.items() if trials > 1 or not k.startswith("plan/")},
                                f"{run_dir.path} trial {trials - 1}")
            returns = metrics["charts/trial_return"]
            print(f"trial {trials - 1}/{args.num_trials - 1}: return {returns.mean():.1f} ± {returns.std():.1f} "
                  f"(per seed {[round(float(r), 1) for r in returns]}), length {metrics['charts/trial_length'].tolist()}",
                  flush=True)

        utils.train_loop(run_dir, args, state, chunk, stop, unit="trial", check_metrics=check,
                         show="charts/trial_return", after_chunk=lambda trials: write_curves(run_dir, args, out_dir))
        done_trials = stop  # the curve was redrawn after every trial (after_chunk)
    if done_trials >= args.num_trials:
        final = pd.read_csv(run_dir.path / "metrics.csv")
        final = final[final["trial"] == final["trial"].max()]["charts/trial_return"]
        run_dir.write_summary({"env_id": args.env_id, "trials": done_trials, "num_seeds": args.num_seeds,
                               "final_trial_return_mean": float(final.mean()),
                               "final_trial_return_per_seed": [float(x) for x in final]})
        print(f"done: {done_trials} trials; curves in {out_dir / f'pets_{args.env_id}'}.{{csv,png}}")


if __name__ == "__main__":
    main()
