"""The little every algorithm file needs and nothing algorithmic: argument checks, the run
directory (arguments, metrics CSV, summary, checkpoints), non-finite detection, compile cache,
and the one host loop every algorithm runs around its compiled chunk (`open_run`, `train_loop`,
`load_saved`, `cli`), with optional TensorBoard / W&B tracking.

Kept small on purpose: each algorithm file stays readable and copyable with this one module.
A multi-process run joins `jax.distributed` by an explicit call, `join_processes(sys.argv[1:])`,
which each algorithm file makes as a script before it imports `envs` (whose import starts JAX's
backend, after which no process can join).
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm import tqdm


@dataclasses.dataclass
class Run:
    """The host flags of every algorithm: the base class of each file's `Args` (so the flags stay
    flat, `--run-dir`, `--resume`, ..., and a run's args.json lists them beside the algorithm's)."""

    run_dir: str = "runs"
    """where runs/<run-name>/ is created"""
    run_name: str | None = None
    """name of the run directory (default: <env>__<algorithm>__<seed>__<time>)"""
    resume: str | None = None
    """continue the run in this directory from its last checkpoint (other arguments are ignored)"""
    progress: bool = True
    """show a progress bar"""
    devices: int | None = None
    """devices to split the seeds over (default: all); --num-seeds must be a multiple of it"""
    coordinator: str | None = None
    """join a multi-process run (jax.distributed): HOST:PORT of process 0, or "auto" (SLURM, Open MPI...)"""
    num_processes: int | None = None
    """processes of a multi-process run (with --coordinator HOST:PORT); the seeds split over all their devices"""
    process_id: int | None = None
    """this process's index, 0 .. num_processes - 1 (process 0 writes the run directory)"""
    track: bool = False
    """log every metric to TensorBoard: event files in <run>/tensorboard/ (no network)"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project (optional `pip install wandb`; WANDB_MODE=offline works offline)"""


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


def available_memory(args):
    """(bytes, where, seeds): the memory one share of the seeds lives in, and that share: on an
    accelerator one device's limit and the seeds each device trains; on a CPU the host's
    available RAM, which all local devices share, and the seeds of this process."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit), f"{device.platform} device 0", args.num_seeds // (args.devices or jax.device_count())
    seeds = args.num_seeds // jax.process_count()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine (MemAvailable)", seeds
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine", seeds


class NonFiniteError(FloatingPointError):
    pass


def to_env_actions(env, params):
    """`f(action)`: a tanh policy's action in [-1, 1] mapped linearly onto the env's action bounds.
    The identity (the same array, no arithmetic) where the bounds are [-1, 1], as on every MuJoCo
    task; pendulum's torque bounds are [-2, 2]."""
    space = env.action_space(params)
    low, high = (np.broadcast_to(np.asarray(b, np.float32), (env.action_size,)) for b in (space.low, space.high))
    if np.all(low == -1.0) and np.all(high == 1.0):
        return lambda action: action
    return lambda action: low + (action + 1.0) * (0.5 * (high - low))


def assert_finite(metrics: dict, where: str):
    """Raise, naming the quantity, the seeds and `where`, if any metric is NaN or infinite."""
    for name, value in metrics.items():
        value = np.asarray(value)
        if not np.all(np.isfinite(value)):
            seeds = np.nonzero(~np.isfinite(value.reshape(value.shape[0], -1)).all(-1))[0].tolist() if value.ndim else []
            raise NonFiniteError(f"non-finite {name} at {where} (seeds {seeds}): {value}")


def nan_like(shapes):
    """What a phase that did not run reports, for `jax.lax.cond`'s other branch: NaN in its
    float metrics, 0 in its counts. `shapes`: the phase's metrics under `jax.eval_shape`."""
    return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.floating) else 0, s.dtype),
                        shapes)


@contextlib.contextmanager
def reported_failures():
    """A run that hits a non-finite value ends with one line and exit status 1, not a traceback."""
    try:
        yield
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def cli(args_cls):
    """Parse the command line into `args_cls` (tyro) and turn the persistent compile cache on."""
    enable_compilation_cache()
    return tyro.cli(args_cls)


# --- seeds over devices and processes -----------------------------------------------
def join_processes(argv):
    """Join a multi-process run (`jax.distributed`) if the command line asks for one:
    `--coordinator HOST:PORT --num-processes N --process-id I`, or `--coordinator auto` where JAX
    reads them from the cluster (SLURM, Open MPI, Kubernetes). Call it before anything starts JAX's
    backend (importing `envs` does: gymnax and Brax create arrays at import); the same flags are
    fields of every Args, so `--help` documents them and tyro accepts them. Every flag is checked
    before joining: a process that fails after it has joined leaves its peers waiting."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    for name in ("--run-name", "--resume", "--evaluate", "--render"):
        parser.add_argument(name)
    flags = parser.parse_known_args(argv)[0]
    if flags.coordinator is None:
        check(flags.num_processes in (None, 1), "--num-processes > 1 needs --coordinator HOST:PORT (or auto)")
        return
    auto = flags.coordinator == "auto"
    check(auto or None not in (flags.num_processes, flags.process_id),
          "--coordinator HOST:PORT needs --num-processes and --process-id (or use --coordinator auto)")
    # Checked before joining: a process that fails after it has joined leaves its peers waiting.
    check(flags.run_name or flags.resume or flags.evaluate or flags.render,
          "a multi-process run needs --run-name: every process opens the same run directory")
    jax.distributed.initialize(None if auto else flags.coordinator, flags.num_processes, flags.process_id)


def seed_mesh(args):
    """A 1-D mesh ("seed") over the first `--devices` devices of all processes (default: all):
    each device trains num_seeds / D of the seeds."""
    devices = jax.devices()
    count = args.devices or len(devices)
    check(0 < count <= len(devices), f"--devices {args.devices}: there are {len(devices)} device(s)")
    check(count == len(devices) or jax.process_count() == 1, "--devices: a multi-process run uses every device")
    check(args.num_seeds % count == 0, f"--num-seeds {args.num_seeds} must be a multiple of the {count} devices "
                                       f"(--devices, default: all)")
    return jax.sharding.Mesh(np.array(devices[:count]), ("seed",))


def over_devices(fn, mesh, replicated=0, donate=True):
    """jit of `fn(seed_batch, *others)` with the leading seed axis of its first argument and of
    every output split over `mesh`: each device runs `fn` on its own seeds (shard_map), so nothing
    is gathered and no device talks to another. `replicated` other arguments are copied to all."""
    P = jax.sharding.PartitionSpec
    # check_vma off: per-seed code mixes values from the split and the replicated inputs freely
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P("seed"),) + (P(),) * replicated, out_specs=P("seed"),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=0 if donate else ())


def map_in_batches(fn, tree, batch_size):
    """`jax.lax.map(fn, tree, batch_size=batch_size)` (vmapped within a batch, batches one after
    another), which also takes zero-size leaves: lax.map's own reshape divides by their size, and
    MJX's states have some (a model with no actuator activations, no mocap bodies)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    full = n - n % batch_size
    split = jax.tree.map(lambda x: x[:full].reshape(full // batch_size, batch_size, *x.shape[1:]), tree)
    out = jax.tree.map(lambda x: x.reshape(full, *x.shape[2:]), jax.lax.map(jax.vmap(fn), split))
    if full == n:
        return out
    rest = jax.vmap(fn)(jax.tree.map(lambda x: x[full:], tree))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)


def place(x, sharding):
    """A host array (the same in every process) as a jax.Array with `sharding`: each device, in
    whichever process, takes its own slice."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def on_devices(tree, mesh):
    """Place arrays (host or device) with their leading seed axis split over `mesh`. A program's
    inputs are placed as its outputs were left (on one device, XLA leaves them unsplit), and a
    jit compiles for its inputs' placement: placed here, a saved state and a run's own state
    give the same program (dam.py's final evaluation and --evaluate)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))
    return jax.tree.map(lambda x: (jax.device_put(x, sharding) if isinstance(x, jax.Array) else place(x, sharding))
                        if eqx.is_array(x) else x, tree)


_GATHERS = itertools.count()  # each barrier needs its own name; every process counts the same


def to_host(tree):
    """numpy copies of (possibly sharded) arrays, gathered from every device and process."""
    arrays, rest = eqx.partition(tree, eqx.is_array)
    if jax.process_count() > 1:
        from jax._src import distributed
        from jax.experimental import multihost_utils

        # The gather's CPU collectives (gloo) give up if a process arrives 30 s after another, and
        # compiling the first chunk can take longer than that in one process than in the other:
        # first meet at the coordination service's barrier, which waits as long as we say.
        distributed.global_state.client.wait_at_barrier(f"gather_{next(_GATHERS)}", 3_600_000)
        return eqx.combine(multihost_utils.process_allgather(arrays, tiled=True), rest)
    return eqx.combine(jax.tree.map(np.asarray, arrays), rest)


def is_writer():
    """In a multi-process run, process 0 writes the run directory, trackers and progress bar for
    all (the run directory must be on a filesystem every process reads, for --resume)."""
    return jax.process_index() == 0


def writer_only(method):
    def write(*args, **kwargs):
        return method(*args, **kwargs) if is_writer() else None

    return write


class RunDir:
    """runs/<run-name>/: args.json, metrics.csv (one row per seed and chunk), summary.json,
    checkpoint.eqx + checkpoint.json (the whole training state at the last chunk boundary)."""

    def __init__(self, path, args=None):
        self.path = Path(path)
        if is_writer():
            try:  # before anything compiles: a run that cannot write its directory stops at once
                self.path.mkdir(parents=True, exist_ok=True)
                if args is not None:
                    (self.path / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
            except OSError as error:
                check(False, f"cannot write the run directory {self.path}: {error.strerror}")

    @staticmethod
    def new_name(env_id: str, algo: str, seed: int) -> str:
        return f"{env_id}__{algo}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}"

    def load_args(self, args_cls):
        return args_cls(**json.loads((self.path / "args.json").read_text()))

    # --- metrics: a CSV that `pandas.read_csv(path)` reads in one line ---------------------
    @writer_only
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

    @writer_only
    def truncate_metrics(self, rows: int):
        """On resume: keep the header and the first `rows` rows (those the checkpoint covers)."""
        file = self.path / "metrics.csv"
        if file.exists() and rows:
            file.write_text("\n".join(file.read_text().splitlines()[:1 + rows]) + "\n")
        elif file.exists():
            file.unlink()

    @writer_only
    def write_summary(self, summary: dict):
        used = json.loads((self.path / "args.json").read_text()).get("devices") or jax.device_count()  # --devices
        summary = {"run_dir": str(self.path), "num_devices": used, "num_processes": jax.process_count(), **summary}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, state, env_steps: int, chunks: int, **parts):
        """Atomically replace the checkpoint (the state and its counters in one file: a kill
        mid-write leaves the previous one intact). `parts` are pytrees saved alone as <name>.eqx
        (e.g. sac.py's actor.eqx), for programs that load them without the whole state;
        checkpoint.json repeats the counters for scripts. Sharded states are gathered to the host."""
        state, parts = to_host(state), to_host(parts)  # every process takes part in the gather
        if not is_writer():
            return
        for name, tree in {"checkpoint": (state, np.array([env_steps, chunks], np.int64)), **parts}.items():
            eqx.tree_serialise_leaves(self.path / f"{name}.eqx.tmp", tree)
            os.replace(self.path / f"{name}.eqx.tmp", self.path / f"{name}.eqx")
        (self.path / "checkpoint.json").write_text(json.dumps({"env_steps": env_steps, "chunks": chunks}))

    def load_checkpoint(self, like):
        """Returns (state, {"env_steps", "chunks"}), or (None, zeros) if there is no checkpoint yet.
        The state is placed as `like` is (its sharding), whatever the devices that wrote it."""
        if not (self.path / "checkpoint.eqx").exists():
            return None, {"env_steps": 0, "chunks": 0}
        host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype) if hasattr(x, "dtype") else x, like)
        state, (env_steps, chunks) = eqx.tree_deserialise_leaves(self.path / "checkpoint.eqx",
                                                                 (host, np.zeros(2, np.int64)))
        placed = jax.tree.map(lambda x, y: place(x, y.sharding) if isinstance(y, jax.Array) else x, state, like)
        return placed, {"env_steps": int(env_steps), "chunks": int(chunks)}


HOST_FLAGS = ("devices", "coordinator", "num_processes", "process_id", "progress", "track", "wandb_project")


# --- the host loop ----------------------------------------------------------------------------------
def open_run(args, args_cls, algo: str, resolve=lambda a: a, validate=lambda a: None):
    """(args, run_dir): a new run directory for `args` (resolved, then validated before anything
    is written), or, with `--resume DIR`, that run with the arguments it was started with."""
    if args.resume:
        check((Path(args.resume) / "args.json").exists(), f"--resume {args.resume}: no run there (no args.json)")
        run_dir = RunDir(args.resume)
        # The run's own arguments, but where and how it runs now: devices, progress, tracking.
        args = dataclasses.replace(run_dir.load_args(args_cls), **{k: getattr(args, k) for k in HOST_FLAGS})
        validate(args)
        return args, RunDir(run_dir.path, args)  # args.json now records where it runs
    args = resolve(args)
    validate(args)
    return args, RunDir(Path(args.run_dir) / (args.run_name or RunDir.new_name(args.env_id, algo, args.seed)), args)


def load_saved(path, args_cls, make_train, seed_keys, **overrides):
    """(args, trainer, state, env_steps) of a saved run, for --evaluate and --render. The seeds are
    split over this process's devices as a run splits them (over one where they do not divide), so
    an evaluation compiles the program of the run's own final evaluation (dam.py: a cache hit)."""
    check((Path(path) / "args.json").exists(), f"{path}: no run there (no args.json)")
    run_dir = RunDir(path)
    args = dataclasses.replace(run_dir.load_args(args_cls), **overrides)
    trainer = make_train(args)
    state, info = run_dir.load_checkpoint(jax.eval_shape(jax.vmap(trainer.init), seed_keys(args)))
    check(state is not None, f"no checkpoint in {path}")
    count = jax.local_device_count()
    mesh = seed_mesh(dataclasses.replace(args, devices=count if args.num_seeds % count == 0 else 1))
    return args, trainer, on_devices(state, mesh), info["env_steps"]


def first_seed(tree):
    """Seed index 0 of a vmapped pytree (e.g. the saved actor, for --render)."""
    return jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, tree)


def train_loop(run_dir, args, state, chunk, num_chunks: int, *, progress="env_steps", unit="step",
               check_metrics=None, parts=lambda state: {}, show="eval/return", after_chunk=None):
    """Resume from the checkpoint, then run `chunk(state, i) -> (state, metrics)` for the chunks
    i left. Per chunk: time it, check it (`check_metrics(metrics, chunks_done)` raises
    NonFiniteError naming the quantity; default: every metric finite), append one row per seed to
    metrics.csv (and TensorBoard / W&B), replace the checkpoint (with `parts(state)` beside it),
    update the progress bar, then call `after_chunk(chunks_done)` if given (e.g. redraw a curve).
    `metrics[progress]` counts the x-axis (env steps, or iterations).
    Returns (state, metrics of the last chunk, progress)."""
    loaded, info = run_dir.load_checkpoint(state)
    state = state if loaded is None else loaded
    done, position = info["chunks"], info["env_steps"]
    run_dir.truncate_metrics(done * args.num_seeds)  # rows written after the checkpoint (all, if none)
    check_metrics = check_metrics or (lambda m, i: assert_finite(m, f"{progress.replace('_', ' ')} {m[progress][0]}"))
    tracker = Tracker(run_dir, args)
    bar = tqdm(total=num_chunks, initial=done, unit=unit, disable=not (args.progress and is_writer()))
    metrics = {}
    try:
        while done < num_chunks:
            start = time.perf_counter()
            state, metrics = chunk(state, np.int32(done))
            metrics = to_host(metrics)  # waits for the chunk, so the time below is real
            done, previous, position = done + 1, position, int(metrics[progress][0])
            metrics["charts/steps_per_second"] = np.full(args.num_seeds, (position - previous) / (time.perf_counter() - start))
            try:
                check_metrics(metrics, done)
            except NonFiniteError as error:
                raise NonFiniteError(f"{error}; run {run_dir.path}, its last good checkpoint (at {progress} {previous}) "
                                     f"kept") from None
            run_dir.write_metrics(metrics, args.seed)
            tracker.log(metrics, position, args.seed)
            run_dir.save_checkpoint(state, position, done, **parts(state))
            if after_chunk is not None:
                after_chunk(done)
            bar.update(1)
            bar.set_postfix({show.split("/")[-1]: f"{metrics[show].mean():.4g}",
                             "sps": f"{metrics['charts/steps_per_second'][0]:.0f}"})
    finally:
        bar.close()
        tracker.close()
    return state, metrics, position


class Tracker:
    """`--track`: TensorBoard event files in <run>/tensorboard/seed<S> (no network).
    `--wandb-project NAME`: one W&B run per run directory, resumed with it; WANDB_MODE=offline
    writes it under <run>/wandb without network (`wandb sync` uploads it later). Both optional
    packages are imported only when asked for."""

    def __init__(self, run_dir, args):
        self.tensorboard, self.wandb = [], None
        if not is_writer():
            return
        if getattr(args, "track", False):
            from tensorboardX import SummaryWriter
            self.tensorboard = [SummaryWriter(str(run_dir.path / "tensorboard" / f"seed{args.seed + i}"))
                                for i in range(args.num_seeds)]
        if getattr(args, "wandb_project", None):
            try:
                import wandb
            except ImportError:
                raise SystemExit("error: --wandb-project needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=args.wandb_project, name=run_dir.path.name, dir=str(run_dir.path),
                                    id=run_dir.path.name.replace("/", "-")[-64:], resume="allow",
                                    config=dataclasses.asdict(args))

    def log(self, metrics, step, first_seed):
        for i, writer in enumerate(self.tensorboard):
            for name, value in metrics.items():
                writer.add_scalar(name, float(value[i]), step)
            writer.flush()
        if self.wandb is not None:  # the mean over seeds, and each seed when there are several
            row = {name: float(np.mean(value)) for name, value in metrics.items()}
            if len(metrics[next(iter(metrics))]) > 1:
                row |= {f"seed{first_seed + i}/{n}": float(v[i]) for n, v in metrics.items() for i in range(len(v))}
            self.wandb.log(row, step=step)

    def close(self):
        for writer in self.tensorboard:
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()
