"""A MuJoCo task's state from (qpos, qvel) by MuJoCo's kinematics (envs/mujoco_tasks.py `state_from`)
against the whole forward pass that Gymnasium's `set_state` runs: compile time of a vmapped reset
and of a vmapped step (its auto-reset inside), the step's run time, and the largest difference in
what 60 steps from the same resets return (observations, rewards, terminations, auto-resets included).

    python benchmarks/mujoco_reset_kinematics.py hopper     # any task of envs.MUJOCO_TASKS

Each variant runs in its own process (a variant is a different program); run alone on the cores.
"""

import json
import subprocess
import sys
import time

import numpy as np

ENVS, STEPS = 32, 60


def measure(task, variant, out):
    import jax
    from mujoco import mjx

    from envs import mujoco_tasks

    if variant == "forward":  # the state as Gymnasium's set_state leaves it: mj_forward
        kinematics_only = mujoco_tasks.MujocoTask.state_from

        def state_from(self, qpos, qvel, qacc_warmstart=None, time=0):
            state = kinematics_only(self, qpos, qvel, qacc_warmstart, time)
            return state.replace(data=mjx.forward(self.model, state.data).replace(qpos=state.data.qpos))

        mujoco_tasks.MujocoTask.state_from = state_from
    env = mujoco_tasks.MujocoTask(task)
    params = env.default_params
    keys = jax.random.split(jax.random.PRNGKey(0), ENVS)
    start = time.perf_counter()
    reset = jax.jit(jax.vmap(lambda k: env.reset(k, params))).lower(keys).compile()
    reset_s = time.perf_counter() - start
    obs, states = reset(keys)
    actions = jax.random.uniform(jax.random.PRNGKey(1), (STEPS, ENVS, env.action_size), minval=-1, maxval=1)
    step = jax.jit(jax.vmap(lambda k, s, a: env.step(k, s, a, params)))
    start = time.perf_counter()
    step = step.lower(keys, states, actions[0]).compile()
    step_s = time.perf_counter() - start
    outputs, elapsed = [np.asarray(obs)], 0.0
    for t in range(STEPS):
        step_keys = jax.random.split(jax.random.PRNGKey(100 + t), ENVS)
        start = time.perf_counter()
        obs, states, reward, terminated, truncated, info = jax.block_until_ready(step(step_keys, states, actions[t]))
        elapsed += time.perf_counter() - start
        outputs += [np.asarray(x) for x in (obs, info["final_observation"], reward, terminated)]
    np.save(out, np.concatenate([x.astype(np.float64).ravel() for x in outputs]))
    print(json.dumps({"variant": variant, "reset_compile_s": round(reset_s, 1), "step_compile_s": round(step_s, 1),
                      "ms_per_vmapped_step": round(1000 * elapsed / STEPS, 2)}))


if __name__ == "__main__":
    if len(sys.argv) == 4:
        measure(*sys.argv[1:])
    else:
        task = sys.argv[1]
        rows = {}
        for variant in ("forward", "kinematics"):
            done = subprocess.run([sys.executable, __file__, task, variant, f"/tmp/reset_{variant}.npy"],
                                  capture_output=True, text=True, check=True)
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        diff = np.abs(np.load("/tmp/reset_forward.npy") - np.load("/tmp/reset_kinematics.npy")).max()
        for row in rows.values():
            print(f"{task} {row['variant']:10s}: reset compiles in {row['reset_compile_s']} s, step in "
                  f"{row['step_compile_s']} s, {row['ms_per_vmapped_step']} ms per step of {ENVS} envs")
        print(f"largest difference over {STEPS} steps of {ENVS} envs: {diff}")
