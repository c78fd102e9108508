"""Test setup: CPU only, a loud failure on a missing dependency (pytest aborts collection with the
ImportError below), compiled programs kept in memory within a file and freed after it, and the
order of files for pytest-xdist (`-n 2 --dist loadfile`, set in pyproject.toml).

Compile once, test many: the suite's time is mostly XLA compiling, and much of a compile uses one
of the two cores. Two workers compile in parallel; each file runs on one worker, so its
module-level caches compile once. Files are queued longest first (GROUP_SECONDS)."""

import gc
import importlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's fast-compile preset for every program the tests compile, in the test processes and in
# their subprocesses (CLI runs, multi-process runs, the GPU check: they inherit XLA_FLAGS), so that
# a CLI run and an in-process run of the same config still give the same bits. Compiling is most of
# the suite's time: measured alone, sac.py's one-seed CLI run (inverted_pendulum) took 44.5 s of CPU
# with XLA's defaults and 36.0 s with the preset. The programs are the same; what differs from a
# user's run (XLA's defaults) is float rounding, which RL amplifies (that run's final evaluation:
# 63.2 vs 139.0), so no test compares with a number measured outside the suite bit for bit.
# MBRL_TEST_XLA_DEFAULTS=1 runs the suite with XLA's defaults.
FAST_PRESET = "CPU_OPT_PRESET_FAST_COMPILE"
FAST_COMPILE_FLAG = f"--xla_cpu_opt_preset={FAST_PRESET}"
if not os.environ.get("MBRL_TEST_XLA_DEFAULTS") and FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()

REQUIRED = ["jax", "brax", "gymnax", "equinox", "optax", "distrax", "chex", "tyro", "tqdm", "matplotlib", "pandas", "envs"]
_missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"missing dependencies {_missing}: run `pip install -r requirements.txt`")

import jax  # noqa: E402
import pytest  # noqa: E402

import envs  # noqa: E402

# The tests' subprocesses (CLI runs, multi-process and multi-device runs, the GPU check's cases)
# share one persistent cache per pytest session: MBRL_JAX_CACHE if set, else a fresh directory
# that pytest's first process makes and its xdist workers inherit (never ~/.cache/mbrl-jax, so a
# cold run stays cold). Runs of the same program then compile it once: the GPU check's SAC and
# MBPO cases are test_devices.py's one-process runs, and the 4-device test's killed and resumed
# runs are its first two. The workers' own compiles stay in memory unless MBRL_JAX_CACHE was set.
if "MBRL_TEST_SUBPROCESS_CACHE" not in os.environ:  # pytest's first process; its workers inherit these
    import tempfile

    os.environ["MBRL_TEST_WORKERS_PERSIST"] = "1" if os.environ.get("MBRL_JAX_CACHE") else ""
    os.environ["MBRL_TEST_SUBPROCESS_CACHE"] = os.environ.get("MBRL_JAX_CACHE") or tempfile.mkdtemp(prefix="mbrl-jax-tests-")
    os.environ["MBRL_JAX_CACHE"] = os.environ["MBRL_TEST_SUBPROCESS_CACHE"]

# Compile once per process: many tests build the same program afresh (a new `make_train`, a new
# jit), which XLA compiles again unless a compilation cache answers. The persistent cache did, but
# writing it crashed the test process (a segfault inside XLA's executable serialisation,
# `put_executable_and_time`, in CI after ~170 tests in one process, and once here), and a fresh
# machine gains nothing from its files. So the tests keep compiled executables in memory, under
# the persistent cache's own key, and never serialise them (this patches jax._src, tests only).
# MBRL_JAX_CACHE=<dir> restores the persistent cache.
if os.environ.get("MBRL_TEST_WORKERS_PERSIST"):
    jax.config.update("jax_compilation_cache_dir", os.environ["MBRL_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
else:
    from jax._src import compiler

    # Read-only, the subprocesses' cache: a program a CLI run already compiled (test_sac.py's one-seed
    # run, test_tdml.py's) is read from its file instead of compiled again in the worker.
    jax.config.update("jax_compilation_cache_dir", os.environ["MBRL_TEST_SUBPROCESS_CACHE"])
    _disk_read = compiler._cache_read

    def _read(module_name, cache_key, compile_options, backend, executable_devices):
        executable = _EXECUTABLES.get(cache_key)
        if executable is None:
            executable, _ = _disk_read(module_name, cache_key, compile_options, backend, executable_devices)
            if executable is not None:
                _EXECUTABLES[cache_key] = executable
                _log_compile(module_name, cache_key, -1.0)
        else:
            _log_compile(module_name, cache_key, None)
        return (executable, 0) if executable is not None else (None, None)

    def _write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        _log_compile(module_name, cache_key, compile_time_secs)
        if not host_callbacks:
            _EXECUTABLES[cache_key] = executable

    compiler._cache_read, compiler._cache_write = _read, _write


# The tests' eager random numbers (`jax.random.uniform(key, (32, 250, 8))` and the like, outside any
# jit) each compile a small program per shape, and XLA:CPU's backend optimisation makes that slow
# for large shapes: measured alone, a (32, 250, 8) uniform 408 ms -> 89 ms, 32 x 250 split keys
# 227 -> 128 ms; in the cold suite of 63a7e60 these programs took 46 s of compile (90 uniform, 82
# split, ...). The programs below are integer and bit operations (threefry, and the bitcast that
# makes a uniform float) and data movement, so they compile with the optimisation off to the same bits: checked by
# test_host.py. (Not `_normal` or `_truncated_normal`: their erf_inv differs in the last float bit.)
EXACT_AT_LEVEL_0 = {"jit__uniform", "jit__threefry_split", "jit__threefry_seed", "jit__threefry_fold_in",
                    "jit__randint", "jit__bernoulli", "jit__random_bits", "jit_dynamic_slice", "jit_broadcast_in_dim",
                    "jit_unstack", "jit_gather", "jit_concatenate"}
from jax._src import compiler  # noqa: E402

_backend_compile = compiler.backend_compile_and_load


def _compile(backend, module, executable_devices, options, host_callbacks):
    from jax._src.lib.mlir import ir

    if ir.StringAttr(module.operation.attributes["sym_name"]).value in EXACT_AT_LEVEL_0:
        options.executable_build_options.debug_options.xla_backend_optimization_level = 0
    if FAST_COMPILE_FLAG in os.environ.get("XLA_FLAGS", "") and not any(
            name == "xla_cpu_opt_preset" for name, _ in options.env_option_overrides):
        # The preset of XLA_FLAGS (top of this file), for this process too: XLA read XLA_FLAGS in a
        # worker before this file set it (measured: its compiles ran as slowly as without it).
        options.env_option_overrides = [*options.env_option_overrides, ("xla_cpu_opt_preset", FAST_PRESET)]
    return _backend_compile(backend, module, executable_devices, options, host_callbacks)


compiler.backend_compile_and_load = _compile


_EXECUTABLES = {}
# MBRL_TEST_COMPILE_LOG=<dir>: one JSON line per compile (seconds), in-memory hit (null) or read of the
# subprocesses' cache (-1) of the test processes, with the test and the program's cache key, to find
# what is compiled twice.
_COMPILE_LOG = os.environ.get("MBRL_TEST_COMPILE_LOG")


def _log_compile(module_name, cache_key, seconds):
    if _COMPILE_LOG:
        import json

        os.makedirs(_COMPILE_LOG, exist_ok=True)
        line = dict(test=os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0], module=module_name,
                    key=cache_key[-24:], seconds=seconds)
        with open(os.path.join(_COMPILE_LOG, f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


if _COMPILE_LOG:
    # The tracing and lowering JAX does before each compile or cache read, and each test's CPU
    # seconds (this process's and its finished subprocesses'), in <worker>-tests.jsonl.
    import resource

    from jax._src import monitoring

    _STAGES = {"/jax/core/compile/jaxpr_trace_duration": "trace", "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}
    _stage_seconds = {}

    def _on_duration(event, seconds, **_):
        if event in _STAGES:
            _stage_seconds[_STAGES[event]] = _stage_seconds.get(_STAGES[event], 0.0) + seconds

    monitoring.register_event_duration_secs_listener(_on_duration)

    def _cpu():
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        import json
        import time

        _stage_seconds.clear()
        (me, children), start = _cpu(), time.time()
        yield
        (me2, children2), wall = _cpu(), time.time() - start
        line = dict(test=item.nodeid, wall=round(wall, 2), cpu=round(me2 - me, 2), children_cpu=round(children2 - children, 2),
                    **{k: round(v, 2) for k, v in _stage_seconds.items()})
        os.makedirs(_COMPILE_LOG, exist_ok=True)
        with open(os.path.join(_COMPILE_LOG, f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-tests.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def pytest_runtest_teardown(item, nextitem):
    """Free every compiled program at the end of a group. An XLA:CPU executable holds its memory
    maps while anything caches it, and a process may hold vm.max_map_count = 65530 of them:
    measured, a worker that had run about half the suite held 54,381 maps, and the other worker
    died of a segfault inside an XLA compile; the CI crash of 2544b31 (inside a cache write, after
    ~170 tests in one process) fits the same cause."""
    if nextitem is None or group_of(nextitem.nodeid) != group_of(item.nodeid):
        _EXECUTABLES.clear()
        jax.clear_caches()
        gc.collect()


def group_of(nodeid: str) -> str:
    """The tests that run on one worker, one after another: a test file, except the tests of one
    MuJoCo task on one backend, which form a group across files (the task and backend are in the
    test's id: `[hopper]` in test_mujoco_tasks.py is the default backend, as `[hopper-gymnasium]`
    in test_brax_tasks.py; elsewhere both must be named, as test_pets.py's
    `[halfcheetah-positional]`), so that they share tests/probe.py's one compile."""
    path, _, test = nodeid.partition("::")
    module = path.rsplit("/", 1)[-1].removesuffix(".py")
    if test == GPU_CHECK_SMOKE:
        return "gpu_check"
    params = test.partition("[")[2].rstrip("]").split("-")
    if params[0] in envs.MUJOCO_TASKS:
        if len(params) > 1 and params[1] in envs.BACKENDS:
            return f"{params[0]}/{params[1]}"
        if module in ("test_brax_tasks", "test_mujoco_tasks"):
            return f"{params[0]}/{envs.DEFAULT_BACKEND}"
    return module


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's `loadfile` with group_of as the unit (its `loadgroup` reads only marks written in
    the test files, and splits every unmarked file test by test)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return group_of(nodeid)

    return GroupScheduling(config, log)


# Seconds per group (its tests' wall times added, two workers), to queue the longest first: the cold
# run of c890a6e (tests/README.md), with test_brax_tasks' MJX body-pose test counted in hopper/mjx
# and the Gymnasium probes at 60 steps. Groups not listed queue after these, in file order.
GROUP_SECONDS = {
    "test_dam": 217, "test_mbpo": 203, "test_devices": 124, "test_tdml": 155, "test_sac": 130, "test_pets": 123,
    "humanoid/gymnasium": 83, "ant/gymnasium": 80, "walker2d/gymnasium": 55, "hopper/gymnasium": 45,
    "hopper/mjx": 50, "pusher/gymnasium": 39, "test_mujoco_tasks": 32, "halfcheetah/gymnasium": 29,
    "pusher/positional": 30, "reacher/gymnasium": 27, "test_host": 26, "humanoid/positional": 26,
    "halfcheetah/positional": 25, "inverted_double_pendulum/gymnasium": 23, "inverted_pendulum/gymnasium": 20,
    "walker2d/positional": 17, "hopper/positional": 16, "ant/positional": 16, "test_brax_tasks": 16,
    "test_dam_envs": 14, "reacher/positional": 12, "inverted_double_pendulum/positional": 11,
    "inverted_pendulum/positional": 7, "test_pendulum_env": 4,
}
# The GPU check's smoke test (`benchmarks/gpu_check.py --smoke`) is a group of its own, queued after
# every group of 20 s or more: its five cases are runs that test_devices.py (SAC, MBPO) and the
# algorithm groups' CLI runs (PETS, DAM, TDML) compile, and it reads their programs from the
# subprocesses' shared cache only if they ran first. Queued inside test_devices, it overlapped
# test_pets' CLI run in 63a7e60's cold run (a precaution: no gain measured).
GPU_CHECK_SMOKE = "test_gpu_check_smoke_runs_every_algorithm"
QUEUED_LATE = {"gpu_check": 19.5}


def _queue_key(group):
    return -QUEUED_LATE.get(group, GROUP_SECONDS.get(group, 0))


def pytest_collection_modifyitems(config, items):
    groups = {item.nodeid: group_of(item.nodeid) for item in items}
    order = {name: i for i, name in enumerate(dict.fromkeys(groups.values()))}
    items.sort(key=lambda item: (_queue_key(groups[item.nodeid]), order[groups[item.nodeid]]))
