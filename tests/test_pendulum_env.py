"""pendulum (gymnax's Pendulum-v1 behind the registry): the task functions against `step`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs


def test_reward_and_termination_functions_equal_step_on_random_transitions():
    env, params = envs.make("pendulum")
    assert (env.obs_size, env.action_size, params.max_steps_in_episode) == (3, 1, 200)

    @jax.jit
    def transitions(key):
        _, state = env.reset(key, params)

        def step(state, key):
            act_key, step_key = jax.random.split(key)
            action = jax.random.uniform(act_key, (1,), minval=-3, maxval=3)  # beyond the bounds: clipped
            obs = env.get_obs(state)
            _, state, reward, terminated, truncated, info = env.step(step_key, state, action, params)
            return state, (obs, action, info["final_observation"], reward, terminated, truncated, state.theta)

        return jax.lax.scan(step, state, jax.random.split(key, 450))[1]

    obs, action, next_obs, reward, terminated, truncated, theta = transitions(jax.random.PRNGKey(0))
    # The pole swings past the bottom: gymnax's theta leaves [-pi, pi] (its reward wraps it, ours
    # reads it from (cos, sin)).
    assert float(jnp.max(jnp.abs(theta))) > np.pi
    np.testing.assert_allclose(env.reward_fn(obs, action, next_obs), reward, rtol=1e-5, atol=1e-5)
    assert not np.any(terminated) and not np.any(env.termination_fn(obs, action, next_obs))
    assert np.flatnonzero(truncated).tolist() == [199, 399]  # the time limit is truncation only
    # Batched over leading dims.
    assert env.reward_fn(obs.reshape(9, 50, 3), action.reshape(9, 50, 1), next_obs.reshape(9, 50, 3)).shape == (9, 50)


def test_overrides_and_bad_parameters():
    env, params = envs.make("pendulum", max_steps_in_episode=50)
    assert params.max_steps_in_episode == 50 and env.default_params.max_steps_in_episode == 50
    with pytest.raises(ValueError, match="unknown pendulum parameter"):
        envs.make("pendulum", backend="positional")
    with pytest.raises(ValueError, match="max_torque"):
        envs.make("pendulum", max_torque=0.0)


def test_a_reset_state_and_a_stepped_state_have_the_same_types():
    """A compiled loop that carries the state (an algorithm's epoch) is traced once: the state
    from `reset` has the types of the state from `step` (gymnax's own reset gives weak types)."""
    env, params = envs.make("pendulum")
    traces = []

    @jax.jit
    def step(state, key):
        traces.append(1)
        return env.step(key, state, jnp.ones(1), params)[1]

    _, state = env.reset(jax.random.PRNGKey(0), params)
    for key in jax.random.split(jax.random.PRNGKey(1), 3):
        state = step(state, key)
    assert len(traces) == 1


def test_a_restored_snapshot_steps_and_truncates_like_the_stored_state():
    """restore(snapshot(s)) is s: from states along a random-action episode, the restored copy
    gives the same observations, rewards and truncation step over the following steps (the time
    limit reads `time`, the render reads `last_u`)."""
    env, params = envs.make("pendulum", max_steps_in_episode=30)
    assert env.snapshot_size == 4

    @jax.jit
    def follow(state, key):
        def step(state, key):
            _, state, reward, _, truncated, info = env.step(key, state, jnp.ones(1), params)
            return state, (info["final_observation"], reward, truncated)

        return jax.lax.scan(step, state, jax.random.split(key, 12))[1]

    _, state = env.reset(jax.random.PRNGKey(0), params)
    for t, key in enumerate(jax.random.split(jax.random.PRNGKey(1), 25)):
        state = env.step(key, state, jax.random.uniform(key, (1,), minval=-2, maxval=2), params)[1]
        if t in (3, 19, 24):
            restored = env.restore(env.snapshot(state))
            assert jax.tree.map(lambda x: x.dtype, restored) == jax.tree.map(lambda x: jnp.asarray(x).dtype, state)
            for a, b in zip(follow(state, key), follow(restored, key)):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(restored.last_u, state.last_u)
