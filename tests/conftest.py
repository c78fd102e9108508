"""Test setup: CPU only, a loud failure on a missing dependency (pytest aborts collection with the
ImportError below), compiled programs kept in memory within a file and freed after it, and the
order of files for pytest-xdist (`-n 2 --dist loadfile`, set in pyproject.toml).

Compile once, test many: the suite's time is mostly XLA compiling, and much of a compile uses one
of the two cores. Two workers compile in parallel; each file runs on one worker, so its
module-level caches compile once. Files are queued longest first (GROUP_SECONDS)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc
import importlib

REQUIRED = ["jax", "brax", "gymnax", "equinox", "optax", "distrax", "chex", "tyro", "tqdm", "matplotlib", "pandas", "envs"]
_missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"missing dependencies {_missing}: run `pip install -r requirements.txt`")

import jax  # noqa: E402
import pytest  # noqa: E402

# Compile once per process: many tests build the same program afresh (a new `make_train`, a new
# jit), which XLA compiles again unless a compilation cache answers. The persistent cache did, but
# writing it crashed the test process (a segfault inside XLA's executable serialisation,
# `put_executable_and_time`, in CI after ~170 tests in one process, and once here), and a fresh
# machine gains nothing from its files. So the tests keep compiled executables in memory, under
# the persistent cache's own key, and never serialise them (this patches jax._src, tests only).
# MBRL_JAX_CACHE=<dir> restores the persistent cache. The CLI tests' subprocesses use the
# algorithms' own cache (~/.cache/mbrl-jax/xla).
if os.environ.get("MBRL_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["MBRL_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
else:
    import tempfile

    from jax._src import compiler

    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="mbrl-jax-unused-"))  # enables the keys

    def _read(module_name, cache_key, compile_options, backend, executable_devices):
        executable = _EXECUTABLES.get(cache_key)
        return (executable, 0) if executable is not None else (None, None)

    def _write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if not host_callbacks:
            _EXECUTABLES[cache_key] = executable

    compiler._cache_read, compiler._cache_write = _read, _write


_EXECUTABLES = {}


def pytest_runtest_teardown(item, nextitem):
    """Free every compiled program at the end of a group. An XLA:CPU executable holds its memory
    maps while anything caches it, and a process may hold vm.max_map_count = 65530 of them:
    measured, a worker that had run about half the suite held 54,381 maps, and the other worker
    died of a segfault inside an XLA compile; the CI crash of 2544b31 (inside a cache write, after
    ~170 tests in one process) fits the same cause."""
    if nextitem is None or group_of(nextitem) != group_of(item):
        _EXECUTABLES.clear()
        jax.clear_caches()
        gc.collect()


def group_of(item) -> str:
    """The xdist group of a test: its file (`--dist loadfile`). The tests of a MuJoCo task in
    test_brax_tasks.py and test_mujoco_tasks.py carry `task_group(T)` to run on one worker and share
    tests/probe.py's compile, but xdist's `loadgroup` did not honour marks added here (measured:
    one file's tests went to both workers), so for now each file compiles its own."""
    return item.module.__name__


# Seconds per file, to queue the longest first: the cold run of 2544b31 (tests/README.md), except
# the two MuJoCo files, whose figures are guesses for the shared probe (not yet measured). Files
# not listed queue after these, in file order.
GROUP_SECONDS = {
    "test_mujoco_tasks": 700, "test_brax_tasks": 600, "test_mbpo": 410, "test_devices": 354, "test_host": 280,
    "test_dam": 220, "test_tdml": 212, "test_pets": 169, "test_sac": 150,
}


def pytest_configure(config):
    config.addinivalue_line("markers", "task_group(task): run with the other tests of this MuJoCo task")


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(dict.fromkeys(group_of(item) for item in items))}
    items.sort(key=lambda item: (-GROUP_SECONDS.get(group_of(item), 0), order[group_of(item)]))
