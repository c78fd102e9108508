"""See what a policy does: one episode, written as Brax's HTML viewer (the MuJoCo tasks, any
backend) or as a PNG of the trajectory (IcyRoad, Intersection: each env's `plot_trajectory`).

    file, ret = envs.render_episode(env, policy, carry, key, "runs/<run>")   # -> runs/<run>/episode.html

`policy(obs, carry, key) -> (action, carry)` is any policy with a carried state (a planner's warm
start; `None` for a plain actor). The episode runs until termination or the time limit.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def rollout(env, policy, carry, key, params=None):
    """One episode: (states before each step, observations (the first, then after each step),
    length, return). Arrays have the time limit's length (+1 for observations); entries after
    `length` are past the episode's end."""
    params = env.default_params if params is None else params
    reset_key, key = jax.random.split(key)
    obs, state = env.reset(reset_key, params)

    def step(c, key):
        obs, state, carry, done, total = c
        act_key, step_key = jax.random.split(key)
        action, carry = policy(obs, carry, act_key)
        next_obs, next_state, reward, terminated, truncated, info = env.step(step_key, state, action, params)
        total = total + jnp.where(done, 0.0, reward)
        return (next_obs, next_state, carry, done | terminated | truncated, total), (state, info["final_observation"], done)

    init = (obs, state, carry, jnp.bool_(False), jnp.float32(0))
    (_, _, _, _, total), (states, next_obs, was_done) = jax.lax.scan(
        step, init, jax.random.split(key, params.max_steps_in_episode))
    return states, jnp.concatenate([obs[None], next_obs]), jnp.sum(~was_done), total


def render_episode(env, policy, carry, key, directory, params=None):
    """Run one episode of `policy` and write it into `directory`: episode.html for Brax tasks,
    episode.png otherwise. Returns (file, episode return)."""
    states, observations, length, total = jax.jit(rollout, static_argnums=(0, 1))(env, policy, carry, key, params)
    length = int(length)
    physics = hasattr(env, "mj_model") or hasattr(env, "brax_env")
    path = Path(directory) / ("episode.html" if physics else "episode.png")
    if physics:
        from brax.io import html

        with open(path, "w") as f:
            f.write(html.render(*_brax_frames(env, states, length), height="100vh", colab=False))
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        env.plot_trajectory(ax, np.asarray(observations[:length + 1]))
        ax.set_title(f"{env.name}: one episode, {length} steps, return {float(total):.2f}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return path, float(total)


def _brax_frames(env, states, length):
    """Brax's viewer draws a Brax `System` at body poses: Brax's own states, or for the MuJoCo
    tasks the system of the same model file and the poses MJX computed."""
    if hasattr(env, "brax_env"):
        return env.brax_env.sys, [jax.tree.map(lambda x: x[t], states.pipeline_state) for t in range(length)]
    from brax.base import Motion, State, Transform
    from brax.io import mjcf

    data = states.data
    frames = [State(q=data.qpos[t], qd=data.qvel[t], x=Transform(pos=data.xpos[t, 1:], rot=data.xquat[t, 1:]),
                    xd=Motion.zero((data.xpos.shape[1] - 1,)), contact=None) for t in range(length)]
    return mjcf.load_model(env.mj_model), frames
