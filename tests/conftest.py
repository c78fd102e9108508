"""Test setup: CPU only, a persistent XLA compilation cache, and a loud failure on a missing
dependency (pytest aborts collection with the ImportError below)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib

REQUIRED = ["jax", "brax", "gymnax", "equinox", "optax", "distrax", "chex", "tyro", "tqdm", "matplotlib", "pandas", "envs"]
_missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"missing dependencies {_missing}: run `pip install -r requirements.txt`")

import jax  # noqa: E402

# Brax tasks take 10-60 s each to compile on CPU; the cache makes a second run pay ~10% of that.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("MBRL_JAX_CACHE", os.path.expanduser("~/.cache/mbrl-jax/xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
