"""Compile seconds of MBPO's tiny test epoch (tests/test_mbpo.py TINY) and of its phases alone, on a
chosen task: how much of an algorithm's compile is the env's (tests/README.md).

    ENV=inverted_pendulum python benchmarks/mbpo_compile_parts.py chunk collect eval   # Brax positional
    ENV=pendulum python benchmarks/mbpo_compile_parts.py chunk collect eval            # gymnax's pendulum

Parts: fit, rollout, update, collect, eval, chunk (the epoch), vchunk (as mbpo.run maps seeds).
One process per measurement, alone on the cores; the persistent cache is not used."""

import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jax  # noqa: E402
from test_mbpo import BRAX, tiny_args  # noqa: E402

from algorithms import mbpo, utils  # noqa: E402

env_id = os.environ.get("ENV", "pendulum")
args = tiny_args(**(BRAX if env_id == "inverted_pendulum" else {"env_id": env_id}))
trainer = mbpo.make_train(args)
env, env_params = mbpo.make_env(args)
key = jax.random.PRNGKey(0)
state = trainer.init(key)


def timed(name, fn, *inputs):
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*inputs)
    mid = time.perf_counter()
    lowered.compile()
    print(f"{env_id} {name}: lower {mid - start:.1f} s, compile {time.perf_counter() - mid:.1f} s", flush=True)


parts = {
    "fit": lambda: timed("fit", mbpo.fitter(args), state.model, state.model_opt, state.real, key),
    "rollout": lambda: timed("rollout", lambda s, k: mbpo.model_rollout(args, env, s, 3, k), state, key),
    "update": lambda: timed("update", partial(mbpo.update, args), state, key),
    "collect": lambda: timed("collect", lambda s, k: mbpo.collect(args, env, env_params, s, False, k), state, key),
    "eval": lambda: timed("eval", trainer.evaluate, state.sac.actor, key),
    "chunk": lambda: timed("chunk", trainer.chunk, state, 0),
    "vchunk": lambda: timed("vchunk", lambda s, i: utils.map_in_batches(lambda x: trainer.chunk(x, i), s, 1),
                            jax.vmap(trainer.init)(jax.random.split(key, 1)), 0),
}
for part in sys.argv[1:]:
    if part not in parts:
        raise SystemExit(f"error: unknown part {part!r}; valid: {', '.join(parts)}")
    parts[part]()
