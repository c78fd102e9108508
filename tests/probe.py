"""The one compiled stepping function per MuJoCo env that test_brax_tasks.py and
test_mujoco_tasks.py share.

Compiling a task's step is what those tests cost (measured cold on this CPU, Gymnasium's hopper
on MJX: 46 s for a vmapped step, 1.6 s for the forward pass that a reset or a restore is), and
each copy of the step in a compiled graph costs it again. So every test of an env runs the same
`run`: `n` gymnax steps (auto-reset included) from given states with given actions and step keys,
`n` a traced loop bound (one compile serves one step and 300), every output kept per step. What
is built from states is compiled apart and is cheap: reset, snapshot/restore and (Gymnasium's
tasks) the state at given (qpos, qvel). The two files share it: conftest.py runs the tests of one
task and backend, from both files, on one worker, one after another."""

import functools

import jax
import jax.numpy as jnp

import envs

BATCH = 32  # states per call, for every use (a batch size is a shape: each one more compile)
# Gymnasium's tasks whose envs `run` steps one after another (lax.map) instead of vmapped. MJX's
# vmapped step is slow on this CPU for all but the smallest models; measured alone with
# benchmarks/probe_compile.py (compile s, then s for the longest call: GYM_HORIZON steps of 32
# envs; the figures were taken with the same code before it was a script), vmapped -> mapped: humanoid 69.5,
# 60.7 -> 66.9, 21.7; ant 45.3, 97.4 -> 36.0, 27.2; walker2d 52.1, 31.2 -> 40.5, 21.4; halfcheetah
# 24.6, 5.9 -> 17.3, 1.1; but hopper 46-49, 6-7 -> 44.6, 19.2 (vmapped kept). Pusher vmapped did
# not finish a 1-step call of 64 envs in minutes; 32 envs mapped take 0.4 s for 20 steps.
MAPPED = {"pusher", "humanoid", "ant", "walker2d", "halfcheetah"}
# Brax's positional variants stepped one after another: measured alone on this CPU (compile s, then
# s for 120 steps of 32 envs; 2026-12-05, `benchmarks/probe_compile.py <task> <mode> positional`),
# vmapped -> mapped: hopper 16.8, 0.20 -> 9.3, 0.58; walker2d 15.2, 0.26 -> 10.2, 0.68; ant 13.3,
# 0.65 -> 7.7, 1.43; reacher 10.3, 0.11 -> 6.2, 0.25; inverted_pendulum 7.4, 0.08 -> 4.3, 0.17;
# inverted_double_pendulum 9.1, 0.11 -> 5.0, 0.17. Kept vmapped, where the longer steps cost what the
# compile saves over test_brax_tasks.py's ~2-4 calls: humanoid 19.6, 0.77 -> 13.9, 2.06; halfcheetah
# 15.8, 1.03 -> 9.6, 3.72; pusher 23.5, 4.26 -> 11.8, 13.5.
MAPPED_POSITIONAL = {"hopper", "walker2d", "ant", "reacher", "inverted_pendulum", "inverted_double_pendulum"}
# Gymnasium's tasks: the steps `run` is compiled for, the longest call of any test of the task
# (test_mujoco_tasks.py's episodes, HORIZON there; test_brax_tasks.py's probe, 60 steps).
GYM_HORIZON = {"hopper": 250, "walker2d": 200, "halfcheetah": 60, "ant": 300, "humanoid": 80,
               "inverted_pendulum": 100, "inverted_double_pendulum": 60, "reacher": 60, "pusher": 100}


@functools.lru_cache(maxsize=None)
def env_of(task, backend=envs.DEFAULT_BACKEND):
    return envs.make(task, backend=backend)


def params_of(env, max_steps_in_episode=None):
    """The env's parameters with the time limit as an array, so that it is an input of `run`."""
    steps = env.default_params.max_steps_in_episode if max_steps_in_episode is None else max_steps_in_episode
    return env.default_params.replace(max_steps_in_episode=jnp.int32(steps))


def _mapped(env):
    if isinstance(env, envs.MujocoTask):
        return env.task in MAPPED
    return env.backend == "positional" and env.task in MAPPED_POSITIONAL


@functools.lru_cache(maxsize=None)
def runner(env, horizon):
    """(`run`, a list that grows by one at each trace). `run(states, actions (B, horizon, A),
    keys (B, horizon, 2), n, params, until_terminated=False)` -> (states after n steps, {output:
    (B, horizon, ...)}), the outputs past step n zero; `final_obs` is the observation the step
    reached (before a reset). With `until_terminated` (a traced flag: the same program) an env stops
    after its first termination, its later outputs zero: the episode tests need no more, and the
    MAPPED envs, stepped one after another, then take only their episode's steps."""
    traces = []

    def one(state, actions, keys, n, params, until_terminated):
        traces.append(1)
        obs = jnp.zeros((horizon, env.obs_size))
        flag, value = jnp.zeros(horizon, bool), jnp.zeros(horizon)
        zeros = dict(obs=obs, next_obs=obs, final_obs=obs, reward=value, terminated=flag, truncated=flag,
                     reward_fn=value, termination_fn=flag)

        def body(carry):
            t, state, out, _ = carry
            obs, action = env.get_obs(state), actions[t]
            next_obs, state, reward, terminated, truncated, info = env.step(keys[t], state, action, params)
            final = info["final_observation"]
            row = dict(obs=obs, next_obs=next_obs, final_obs=final, reward=reward, terminated=terminated,
                       truncated=truncated, reward_fn=env.reward_fn(obs, action, final),
                       termination_fn=env.termination_fn(obs, action, final))
            out = {k: out[k].at[t].set(jnp.asarray(v, out[k].dtype)) for k, v in row.items()}
            return t + 1, state, out, until_terminated & jnp.asarray(terminated, bool)

        def going(carry):
            t, _, _, stopped = carry
            return (t < n) & ~stopped

        _, state, out, _ = jax.lax.while_loop(going, body, (0, state, zeros, False))
        return state, out

    if _mapped(env):
        jitted = jax.jit(lambda states, actions, keys, n, params, until: jax.lax.map(
            lambda x: one(*x, n, params, until), (states, actions, keys)), compiler_options=FAST_COMPILE_PRESET)
    else:
        jitted = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None, None)), compiler_options=FAST_COMPILE_PRESET)

    def run(states, actions, keys, n, params, until_terminated=False):
        return jitted(states, actions, keys, n, params, jnp.asarray(until_terminated))

    run.jitted = jitted  # benchmarks/probe_compile.py compiles it apart from the first call
    return run, traces


# XLA:CPU's fast-compile preset for `run`: measured alone on this CPU (benchmarks/probe_compile.py,
# Gymnasium's hopper vmapped), compile 42.2 -> 32.3 s and the 250-step call 6.0 -> 7.7 s. (Not for the
# algorithms' programs: their learning tests' outcomes follow the rounding, and users compile with
# XLA's defaults; MBPO's tiny epoch compiled 23 -> 17 s with it.)
FAST_COMPILE_PRESET = {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}


# XLA's backend optimisation off for the programs built from states (reset, snapshot/restore,
# state at (qpos, qvel)): each runs a few times on BATCH states, where a forward pass compiles in
# 6.4 s instead of 11.3 s and runs in 0.16 s instead of 0.05 s (Gymnasium's hopper, measured alone
# on this CPU). Not for `run`: there it made a 250-step call take minutes instead of 7 s. The
# MAPPED tasks' states are built one after another too: pusher's state at (qpos, qvel), vmapped
# over 32, compiled in 20.8 s and took 5.2 s a call (at level 0: over 100 s); mapped, 10.8 s and 0.05 s.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def _batched(env, method):
    fn = getattr(env, method)
    if isinstance(env, envs.MujocoTask) and env.task in MAPPED:
        if method == "reset":
            return jax.jit(lambda keys, params: jax.lax.map(lambda k: fn(k, params), keys), compiler_options=FAST_COMPILE)
        return jax.jit(lambda *xs: jax.lax.map(lambda x: fn(*x), xs), compiler_options=FAST_COMPILE)
    return jax.jit(jax.vmap(fn, in_axes=(0, None) if method == "reset" else 0), compiler_options=FAST_COMPILE)


def reset(env, key, params):
    """BATCH fresh starts: (obs, states)."""
    return _batched(env, "reset")(jax.random.split(key, BATCH), params)


def snapshot(env, states):
    return _batched(env, "snapshot")(states)


def restore(env, snapshots):
    return _batched(env, "restore")(snapshots)


def state_from(env, qpos, qvel, warm):
    """Gymnasium's tasks: the states at given (qpos, qvel, qacc_warmstart), BATCH of them."""
    return _batched(env, "state_from")(qpos, qvel, warm)


def step_keys(key, horizon):
    return jax.vmap(lambda k: jax.random.split(k, horizon))(jax.random.split(key, BATCH))
