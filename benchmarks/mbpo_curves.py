"""Learning curves: MBPO vs SAC with MBPO's G vs standard SAC (G = 1), same seeds, vmapped.

    python benchmarks/mbpo_curves.py --env-id inverted_pendulum --num-seeds 3
    python benchmarks/mbpo_curves.py --env-id hopper --num-seeds 3 --total-timesteps 125000

Resumable: each run lives in benchmarks/results/curves/<env>/<algo>/ and continues from its last
checkpoint when the script is started again (a run stopped at 30k of 125k steps goes on to 125k).
Runs are trained one after another, one epoch at a time round-robin, so all three curves grow
together and a stopped script leaves comparable partial curves. After every round it rewrites
benchmarks/results/curves/<env>.csv (env_steps, algo, seed, eval_return) and <env>.png.
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from algorithms import mbpo, sac, utils  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "curves"


class Run:
    """One algorithm's vmapped seeds, advanced one compiled epoch at a time, checkpointed."""

    def __init__(self, module, args, path):
        self.module = module
        self.run_dir = utils.RunDir(path, None if (path / "args.json").exists() else args)
        self.args = self.run_dir.load_args(module.Args)
        trainer = module.make_train(self.args)
        self.chunk = jax.jit(jax.vmap(trainer.chunk, in_axes=(0, None)), donate_argnums=0)
        self.state = jax.jit(jax.vmap(trainer.init))(module.seed_keys(self.args))
        loaded, self.steps = self.run_dir.load_checkpoint(self.state)
        if loaded is not None:
            self.state = loaded
        self.run_dir.truncate_metrics(self.steps)  # rows written after the checkpoint (all, if none)

    @property
    def done(self):
        return self.steps >= self.args.total_timesteps

    def advance(self):
        self.state, metrics = self.chunk(self.state, jnp.int32(self.steps))
        metrics = jax.tree.map(np.asarray, metrics)
        self.steps += self.args.epoch_length
        utils.assert_finite({"eval/return": metrics["eval/return"]}, f"{self.run_dir.path} step {self.steps}")
        self.run_dir.write_metrics(metrics, self.args.seed)
        self.run_dir.save_checkpoint(self.state, self.steps)
        return float(np.mean(metrics["eval/return"]))


def plot(env_id, runs):
    frames = []
    for name, run in runs.items():
        file = run.run_dir.path / "metrics.csv"
        if file.exists():
            df = pd.read_csv(file)[["env_steps", "seed", "eval/return"]].rename(columns={"eval/return": "eval_return"})
            frames.append(df.assign(algo=name))
    if not frames:
        return
    data = pd.concat(frames)[["env_steps", "algo", "seed", "eval_return"]]
    data.to_csv(RESULTS / f"{env_id}.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, group in data.groupby("algo"):
        stats = group.groupby("env_steps")["eval_return"].agg(["mean", "std", "count"])
        ax.plot(stats.index, stats["mean"], label=f"{name} ({int(stats['count'].max())} seeds)")
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
    ax.set(xlabel="env steps", ylabel="eval return (mean ± std over seeds)", title=f"{env_id} ({envs_backend(runs)})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{env_id}.png", dpi=100)
    plt.close(fig)


def envs_backend(runs):
    return next(iter(runs.values())).args.backend


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="inverted_pendulum")
    parser.add_argument("--num-seeds", type=int, default=3)
    parser.add_argument("--total-timesteps", type=int, default=None, help="default: MBPO's preset")
    parser.add_argument("--algos", nargs="+", default=["mbpo", "sac_same_g", "sac_g1"])
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    common = dict(env_id=cli.env_id, num_seeds=cli.num_seeds, total_timesteps=cli.total_timesteps, progress=False)
    mbpo_args = mbpo.resolve(mbpo.Args(**common))
    g = mbpo_args.updates_per_step
    configs = {
        "mbpo": (mbpo, mbpo_args),
        "sac_same_g": (sac, sac.resolve(sac.Args(**common, updates_per_step=g))),
        "sac_g1": (sac, sac.resolve(sac.Args(**common, updates_per_step=1))),
    }
    folder = RESULTS / cli.env_id
    runs = {name: Run(module, args, folder / name) for name, (module, args) in configs.items() if name in cli.algos}
    while not all(run.done for run in runs.values()):
        for name, run in runs.items():
            if not run.done:
                print(f"{name}: {run.steps + run.args.epoch_length} steps, eval return {run.advance():.1f}", flush=True)
        plot(cli.env_id, runs)


if __name__ == "__main__":
    main()
