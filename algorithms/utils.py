"""The little every algorithm file needs and nothing algorithmic: argument checks, the run
directory (arguments, metrics CSV, summary, checkpoints), non-finite detection, compile cache.

Kept tiny on purpose: each algorithm file stays readable and copyable with this one module.
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np


def enable_compilation_cache():
    """Persistent XLA cache: a second run skips most compile time (Brax: ~30 s -> ~4 s)."""
    jax.config.update(
        "jax_compilation_cache_dir",
        os.environ.get("MBRL_JAX_CACHE", os.path.expanduser("~/.cache/mbrl-jax/xla")),
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def check(ok: bool, message: str):
    """Reject a bad argument with a one-line error, before anything compiles."""
    if not ok:
        raise SystemExit(f"error: {message}")


def available_memory():
    """(bytes, where): the memory limit of the first accelerator, else the host's available RAM."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit), f"{device.platform} device 0"
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine (MemAvailable)"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine"


class NonFiniteError(FloatingPointError):
    pass


def assert_finite(metrics: dict, where: str):
    """Raise, naming the quantity, the seeds and `where`, if any metric is NaN or infinite."""
    for name, value in metrics.items():
        value = np.asarray(value)
        if not np.all(np.isfinite(value)):
            seeds = np.nonzero(~np.isfinite(value.reshape(value.shape[0], -1)).all(-1))[0].tolist() if value.ndim else []
            raise NonFiniteError(f"non-finite {name} at {where} (seeds {seeds}): {value}")


class RunDir:
    """runs/<run-name>/: args.json, metrics.csv (one row per seed and chunk), summary.json,
    checkpoint.eqx + checkpoint.json (the whole training state at the last chunk boundary)."""

    def __init__(self, path, args=None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if args is not None:
            (self.path / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))

    @staticmethod
    def new_name(env_id: str, algo: str, seed: int) -> str:
        return f"{env_id}__{algo}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}"

    def load_args(self, args_cls):
        return args_cls(**json.loads((self.path / "args.json").read_text()))

    # --- metrics: a CSV that `pandas.read_csv(path)` reads in one line ---------------------
    def write_metrics(self, metrics: dict, first_seed: int):
        """Append one row per seed; `metrics` maps names to arrays of shape (num_seeds,)."""
        names = sorted(metrics)
        file = self.path / "metrics.csv"
        new = not file.exists()
        with open(file, "a") as f:
            if new:
                f.write(",".join(["seed", *names]) + "\n")
            for i in range(len(np.asarray(metrics[names[0]]))):
                values = [f"{float(np.asarray(metrics[n])[i]):.7g}" for n in names]
                f.write(",".join([str(first_seed + i), *values]) + "\n")

    def truncate_metrics(self, last_step: int, column: str = "env_steps"):
        """On resume: drop rows written after the checkpoint (`column` > last_step)."""
        file = self.path / "metrics.csv"
        if not file.exists():
            return
        lines = file.read_text().splitlines()
        column = lines[0].split(",").index(column)
        kept = [lines[0]] + [line for line in lines[1:] if float(line.split(",")[column]) <= last_step]
        file.write_text("\n".join(kept) + "\n")

    def write_summary(self, summary: dict):
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, state, env_steps: int, **parts):
        """Atomically replace the checkpoint: a kill mid-write leaves the previous one intact.
        `parts` are pytrees saved alone as <name>.eqx beside it (e.g. sac.py's actor.eqx), so
        other programs can load them without this program's whole training state."""
        for name, tree in {"checkpoint": state, **parts}.items():
            tmp = self.path / f"{name}.eqx.tmp"
            eqx.tree_serialise_leaves(tmp, tree)
            os.replace(tmp, self.path / f"{name}.eqx")
        (self.path / "checkpoint.json").write_text(json.dumps({"env_steps": env_steps}))

    def load_checkpoint(self, like):
        """Returns (state, env_steps), or (None, 0) if there is no checkpoint yet."""
        if not (self.path / "checkpoint.json").exists():
            return None, 0
        env_steps = json.loads((self.path / "checkpoint.json").read_text())["env_steps"]
        return eqx.tree_deserialise_leaves(self.path / "checkpoint.eqx", like), env_steps

