"""What the MJX pose refresh in `envs/brax_tasks.py` costs: hopper on `mjx`, steps/s with the
refresh (`fresh`, the default) and without it (`stale`, Brax's own step), 1 env (1000-step scan)
or 64 vmapped envs (100 steps), best of 5 timed runs after one compile. One process per setting,
so the toggle cannot leak into a cached trace; alternate settings for a ratio:

    for r in 1 2; do for m in fresh stale; do for n in 1 64; do
        python benchmarks/mjx_pose_refresh.py $m $n; done; done; done
"""

import sys
import time

import jax
from brax_speed import make_rollout

import envs
import envs.brax_tasks

mode, num_envs = sys.argv[1], int(sys.argv[2])
if mode == "stale":
    envs.brax_tasks._fresh_poses = lambda sys, data: data
env, params = envs.make("hopper", backend="mjx")
steps = 1000 if num_envs == 1 else 100
rollout = jax.jit(make_rollout(env, params, num_envs, steps))
jax.block_until_ready(rollout(jax.random.PRNGKey(0)))
times = []
for i in range(1, 6):
    start = time.perf_counter()
    jax.block_until_ready(rollout(jax.random.PRNGKey(i)))
    times.append(time.perf_counter() - start)
print(f"{mode} {num_envs} env(s): {num_envs * steps / min(times):.0f} steps/s")
