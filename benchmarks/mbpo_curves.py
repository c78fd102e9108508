"""Learning curves: MBPO vs SAC with MBPO's G vs standard SAC (G = 1), one seed per process.

    python benchmarks/mbpo_curves.py --env-id hopper --algo mbpo --seed 0 --total-timesteps 30000
    python benchmarks/mbpo_curves.py --env-id hopper --algo sac_same_g --seed 0 --total-timesteps 30000
    python benchmarks/mbpo_curves.py --env-id hopper --algo sac_g1 --seed 0 --total-timesteps 30000
    python benchmarks/mbpo_curves.py --env-id hopper --plot      # aggregate whatever seeds are present

Why one seed per process: on a 2-core CPU a vmapped model fit runs until the slowest seed's early
stopping fires, so separate runs are the cheaper way to get seeds there (a GPU user vmaps them
with `algorithms/mbpo.py --num-seeds N`). A seed is a normal run of `algorithms/mbpo.py` or
`algorithms/sac.py` in benchmarks/results/curves/<env>/<algo>/seed<S>/, resumable: started again,
the script continues it from its last checkpoint. Each invocation appends its commit, backend,
CPU, steps covered and wall-clock to run.json there, so a curve put together over several
sessions says where every piece came from. A fresh machine has no checkpoint.eqx (git ignores it:
MBPO's holds the model pool); `--portable` writes portable.npz, the state without the pool's rows,
to commit, and a run resumes from it with an empty pool (what that changes: the comment at
PORTABLE). `--total-timesteps` is only where a run stops: the k schedule, buffers and everything
else follow the preset, so a 30k run is the first 30k steps of the full-length one up to rounding
(the real buffer's length is the run's total, and XLA's kernels round by shape).

`--plot` reads every metrics.csv under benchmarks/results/curves/<env>/ and writes <env>.csv
(env_steps, algo, seed, eval_return), <env>.png (mean +- std over the seeds present at each step)
and <env>_table.md, each with the published curves (PUBLISHED) and the task's do-nothing and
random-action returns (benchmarks/results/mujoco_tasks_baselines.md, from
`python benchmarks/mujoco_tasks.py baselines`) beside ours. A backend other than the default
(the papers' task) gets its own directory, <env>_<backend>: its curves are another task's.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import envs  # noqa: E402
from algorithms import mbpo, sac, utils  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "curves"
ALGOS = ("mbpo", "sac_same_g", "sac_g1")
# Published curves (mean over the trials; x: env steps, random steps included, as ours). Not results
# of ours. MBPO: the paper's Fig. 2 curve files (the format jannerm/mbpo's README links to; mean of
# 5 trials, MuJoCo v2 tasks): hopper 6k-30k from data/mbpo/hopper_mbpo.pkl of facebookresearch/svg
# (commit c05887e); the 10k/20k/30k/50k/100k points of both tasks (hopper also 40k and 75k) as the
# MBPO-curves issue quotes them from those files. SAC: erl_lib (TMLR 2025),
# results/main/gym/sac/*.csv, 8 seeds on Gymnasium v4, one update per step, an ensemble critic and
# its own warm-up: an approximate SAC reference, as quoted in the same issue.
PUBLISHED = {
    "hopper": {
        "MBPO (paper)": {6000: 167, 10000: 329, 15000: 459, 20000: 530, 25000: 587, 30000: 697, 40000: 897,
                         50000: 1702, 75000: 3034, 100000: 3315},
        "SAC (erl_lib)": {10000: 291, 20000: 301, 30000: 484, 50000: 1125, 100000: 2667},
    },
    "halfcheetah": {
        "MBPO (paper)": {10000: 1720, 20000: 4236, 30000: 5777, 50000: 7963, 100000: 9553},
        "SAC (erl_lib)": {10000: 536, 20000: 4047, 30000: 4759, 50000: 5733, 100000: 7039},
    },
}
BASELINES = Path(__file__).parent / "results" / "mujoco_tasks_baselines.md"


def curve_name(env_id, backend=None):
    """The task's directory under results/curves: <env> on the default backend, else <env>_<backend>."""
    return env_id if backend in (None, envs.DEFAULT_BACKEND) else f"{env_id}_{backend}"


def baselines(env_id, backend=None):
    """{"do nothing": return, "random": return} of the task (mean over its episodes), read from
    mujoco_tasks_baselines.md; {} where the table has no row."""
    backend = backend or envs.DEFAULT_BACKEND
    for line in BASELINES.read_text().splitlines() if BASELINES.exists() else []:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[:2] == [env_id, backend]:
            return {"do nothing": float(cells[3]), "random actions": float(cells[5])}
    return {}


def make_args(env_id, algo, seed, total_timesteps, backend):
    common = dict(env_id=env_id, seed=seed, total_timesteps=total_timesteps, progress=False,
                  run_dir=str(RESULTS / curve_name(env_id, backend) / algo), run_name=f"seed{seed}")
    if backend:
        common["backend"] = backend
    if algo == "mbpo":
        return mbpo, mbpo.Args(**common)
    g = mbpo.resolve(mbpo.Args(env_id=env_id)).updates_per_step if algo == "sac_same_g" else 1
    return sac, sac.Args(**common, updates_per_step=g)


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def commit():
    root = Path(__file__).parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "algorithms", "envs"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- resuming on a fresh machine ----------------------------------------------------------------
# checkpoint.eqx (ignored by git) holds MBPO's model pool, allocated for the run's largest k: 0.7 GB
# on hopper. portable.npz is the same state without the pool's rows, compressed (`--portable`
# writes it from the checkpoint, for a commit at a session's end). A run that has portable.npz and
# no checkpoint.eqx continues from it with an empty pool. What that changes: the reference's pool
# (retain_epochs = 1) still holds the previous epoch's rollouts when an epoch starts; after such a
# resume the SAC batches of the first epoch's model periods draw their model rows only from the
# rollouts made since (the fit and the first branch come before any update, so the pool is never
# empty when sampled), and every random draw differs from an unbroken run's from there on.
PORTABLE = "portable.npz"
POOL_ROWS = ("obs", "action", "reward", "next_obs", "terminated")  # the Buffer fields that hold rows


def _state_shape(module, path):
    args = utils.RunDir(path).load_args(module.Args)
    return jax.eval_shape(jax.vmap(module.make_train(args).init), module.seed_keys(args))


def _pool_field(key_path):
    """The Buffer field name if this leaf is in MBPO's model pool (`RunnerState.model_data`), else None."""
    names = [getattr(k, "name", None) for k in key_path]
    return names[-1] if "model_data" in names else None  # model_data.data.obs, model_data.size, ...


def save_portable(module, path):
    like = _state_shape(module, path)
    state, info = utils.RunDir(path).load_checkpoint(like)
    utils.check(state is not None, f"{path}: no checkpoint.eqx to make {PORTABLE} from")
    kept = {str(i): np.asarray(x) for i, (key_path, x) in enumerate(jax.tree_util.tree_flatten_with_path(state)[0])
            if hasattr(x, "dtype") and _pool_field(key_path) not in POOL_ROWS}
    np.savez_compressed(path / PORTABLE, env_steps=info["env_steps"], chunks=info["chunks"], **kept)
    print(json.dumps({"portable": str(path / PORTABLE), "env_steps": info["env_steps"],
                      "bytes": (path / PORTABLE).stat().st_size}))


def restore_portable(module, path):
    """checkpoint.eqx from portable.npz: the saved leaves, and an empty model pool of the same capacity."""
    saved = np.load(path / PORTABLE)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(_state_shape(module, path))
    state = []
    for i, (key_path, like) in enumerate(leaves):
        if not hasattr(like, "dtype"):
            state.append(like)
        elif _pool_field(key_path) in (*POOL_ROWS, "insert_pos", "size"):
            state.append(np.zeros(like.shape, like.dtype))  # no rows: size 0, next row at 0
        else:
            utils.check(str(i) in saved and saved[str(i)].shape == like.shape,
                        f"{path / PORTABLE} does not match this code's state (leaf {i})")
            state.append(saved[str(i)])
    env_steps, chunks = int(saved["env_steps"]), int(saved["chunks"])
    utils.RunDir(path).save_checkpoint(jax.tree_util.tree_unflatten(treedef, state), env_steps, chunks)
    return env_steps


def train_one(env_id, algo, seed, total_timesteps, backend):
    module, args = make_args(env_id, algo, seed, total_timesteps, backend)
    path = Path(args.run_dir) / args.run_name
    resuming = (path / "args.json").exists()
    note = None
    if resuming and not (path / "checkpoint.eqx").exists() and (path / PORTABLE).exists():
        note = f"resumed from {PORTABLE} at env step {restore_portable(module, path)}, with an empty model pool"
    if resuming:
        stored = json.loads((path / "args.json").read_text())
        utils.check(total_timesteps is None or stored["total_timesteps"] == total_timesteps,
                    f"{path} was started with --total-timesteps {stored['total_timesteps']}; "
                    f"pass that or remove the directory")
    start_steps = json.loads((path / "checkpoint.json").read_text())["env_steps"] if (path / "checkpoint.json").exists() else 0
    start, revision = time.time(), commit()
    # A session that ends (SIGTERM) or is interrupted still records what it covered.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    interrupted = True
    try:
        module.run(type(args)(resume=str(path), progress=False) if resuming else args)
        interrupted = False
    finally:
        end = time.time()
        record_file = path / "run.json"
        record = json.loads(record_file.read_text()) if record_file.exists() else {"sessions": []}
        saved = json.loads((path / "args.json").read_text())
        done = json.loads((path / "checkpoint.json").read_text())["env_steps"] if (path / "checkpoint.json").exists() else 0
        record["sessions"].append({
            "commit": revision, "backend": saved["backend"], "cpu": cpu_name(), "cores": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
            "env_steps_from": start_steps, "env_steps_to": done, "wall_clock_s": round(end - start, 1),
            **({"interrupted": "stopped before the end; steps after the last checkpoint are redone on resume"}
               if interrupted else {}),
            **({"resume": note} if note else {}),
        })
        record["wall_clock_s_total"] = round(sum(s["wall_clock_s"] for s in record["sessions"]), 1)
        record_file.write_text(json.dumps(record, indent=2))
        print(json.dumps({"run": str(path), **record["sessions"][-1]}))


def load(name):
    frames = []
    for algo in ALGOS:
        for file in sorted((RESULTS / name / algo).rglob("metrics.csv")):
            df = pd.read_csv(file)[["env_steps", "seed", "eval/return"]].rename(columns={"eval/return": "eval_return"})
            frames.append(df.assign(algo=algo))
    utils.check(bool(frames), f"no runs under {RESULTS / name}")
    return pd.concat(frames)[["env_steps", "algo", "seed", "eval_return"]].sort_values(["algo", "seed", "env_steps"])


def plot(env_id, backend, table_steps):
    name = curve_name(env_id, backend)
    data = load(name)
    data.to_csv(RESULTS / f"{name}.csv", index=False)
    published = PUBLISHED.get(env_id, {}) if name == env_id else {}  # the papers' task only
    lines_at = baselines(env_id, backend)
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, group in data.groupby("algo", sort=False):
        stats = group.groupby("env_steps")["eval_return"].agg(["mean", "std", "count"])
        ax.plot(stats.index, stats["mean"], label=f"{algo} ({group['seed'].nunique()} seeds)")
        ax.fill_between(stats.index, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                        alpha=0.2)
    for (label, curve), style in zip(published.items(), ("k--", "k:")):
        ax.plot(list(curve), list(curve.values()), style, label=f"{label}, published")
    for (label, value), style in zip(lines_at.items(), ("-.", ":")):
        ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=f"{label} ({value:.0f})")
    ax.set(xlabel="env steps (incl. random-action steps)", ylabel="eval return (mean ± std over seeds)", title=name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    plt.close(fig)
    # Table: mean ± std (seeds) at the chosen steps, the published curves beside.
    extra = [f"{label}, published" for label in published]
    lines = ["| env steps | " + " | ".join([*ALGOS, *extra]) + " |", "|---" * (len(ALGOS) + 1 + len(extra)) + "|"]
    for step in table_steps:
        cells = []
        for algo in ALGOS:
            values = data[(data.algo == algo) & (data.env_steps == step)]["eval_return"]
            cells.append("-" if values.empty else
                         f"{values.mean():.0f} ± {values.std():.0f} ({len(values)})" if len(values) > 1
                         else f"{values.mean():.0f} (1)")
        cells += [str(curve.get(step, "-")) for curve in published.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Baselines of the task (mean episode return, benchmarks/results/mujoco_tasks_baselines.md): "
              + (", ".join(f"{label} {value:.1f}" for label, value in lines_at.items()) or "none measured")]
    (RESULTS / f"{name}_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="hopper")
    parser.add_argument("--algo", choices=ALGOS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total-timesteps", type=int, default=None, help="default: MBPO's preset")
    parser.add_argument("--backend", default=None, help="default: envs.DEFAULT_BACKEND")
    parser.add_argument("--plot", action="store_true", help="only aggregate the runs present")
    parser.add_argument("--portable", action="store_true",
                        help=f"write the seed's {PORTABLE} from its checkpoint (to commit), then stop")
    parser.add_argument("--table-steps", type=int, nargs="+",
                        default=[5000, 6000, 10000, 15000, 20000, 25000, 30000, 40000, 50000, 75000, 100000])
    cli = parser.parse_args()
    utils.check(cli.plot or cli.algo is not None, "give --algo (to train one seed) or --plot")
    utils.enable_compilation_cache()
    if cli.portable:
        module, args = make_args(cli.env_id, cli.algo, cli.seed, None, cli.backend)
        return save_portable(module, Path(args.run_dir) / args.run_name)
    if not cli.plot:
        train_one(cli.env_id, cli.algo, cli.seed, cli.total_timesteps, cli.backend)
    plot(cli.env_id, cli.backend, cli.table_steps)


if __name__ == "__main__":
    main()
