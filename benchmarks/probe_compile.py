"""Compile time and the longest call of the MuJoCo tests' stepping function (tests/probe.py `run`),
with the envs vmapped or stepped one after another (lax.map): how tests/probe.py's MAPPED was chosen.

    python benchmarks/probe_compile.py humanoid mapped      # or vmapped; one task and mode per process
    python benchmarks/probe_compile.py hopper mapped positional   # Brax's variant (MAPPED_POSITIONAL)

Prints: task, mode, compile seconds, seconds for GYM_HORIZON steps (Brax's variants: 120, the
probes of test_brax_tasks.py) of probe.BATCH envs. Run alone on the cores (two at once slow each
compile ~1.6x)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jax  # noqa: E402

import probe  # noqa: E402

task, mode = sys.argv[1], sys.argv[2]
backend = sys.argv[3] if len(sys.argv) > 3 else probe.envs.DEFAULT_BACKEND
if mode not in ("mapped", "vmapped"):
    raise SystemExit("error: mode must be mapped or vmapped")
if backend not in (probe.envs.DEFAULT_BACKEND, "positional"):
    raise SystemExit("error: backend must be gymnasium or positional")
chosen = probe.MAPPED if backend == probe.envs.DEFAULT_BACKEND else probe.MAPPED_POSITIONAL
(chosen.add if mode == "mapped" else chosen.discard)(task)
env = probe.env_of(task, backend)[0]
params = probe.params_of(env)
horizon = probe.GYM_HORIZON[task] if backend == probe.envs.DEFAULT_BACKEND else 120
run, _ = probe.runner(env, horizon)
_, states = probe.reset(env, jax.random.PRNGKey(0), params)
actions = jax.random.uniform(jax.random.PRNGKey(1), (probe.BATCH, horizon, env.action_size), minval=-1, maxval=1)
keys = probe.step_keys(jax.random.PRNGKey(2), horizon)
start = time.perf_counter()
compiled = run.jitted.lower(states, actions, keys, horizon, params, False).compile()
compile_s = time.perf_counter() - start
start = time.perf_counter()
jax.block_until_ready(compiled(states, actions, keys, horizon, params, False))
print(f"{task} {backend} {mode}: compile {compile_s:.1f} s, {horizon} steps x {probe.BATCH} envs {time.perf_counter() - start:.2f} s")
