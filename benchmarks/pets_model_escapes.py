"""How often a saved PETS model's imagined rollouts leave the data and blow up.

    python benchmarks/pets_model_escapes.py RUN_DIR [--starts 10] [--candidates 200] [--episode]

For every seed of the run: `--starts` real states from the last trial's data, `--candidates`
uniform random action sequences of the run's horizon, the run's particles and propagation (the
model exactly as the planner steps it). Counts the particles whose imagined return (the task's
reward function) exceeds 1e3 in size, the step at which they first left the data's range by
more than its width, and the dimension farthest out (in data std) at the end. A diagnostic for
the exploding `plan/best_value` of the halfcheetah curve (benchmarks/README.md#halfcheetah).

`--episode` also drives one MPC episode per seed in the real env with the saved model (the run's
planner, data not kept) and counts the steps whose best planned value exceeds `--threshold`
(default 100: a real 15-step halfcheetah return stays far below; trials 8-30 averaged 7-16).
"""
import argparse
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from algorithms import pets, utils  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--episode", action="store_true")
    parser.add_argument("--threshold", type=float, default=100.0)
    parser.add_argument("--guard-ab", type=int, default=0, metavar="EPISODES",
                        help="EPISODES MPC episodes per seed with and without a guard that fails a particle "
                             "once it leaves the data's range by more than its width (same keys)")
    cli = parser.parse_args()
    args, _, state, _ = utils.load_saved(cli.run_dir, pets.Args, pets.make_train, pets.seed_keys)
    env, env_params = pets.make_env(args)
    horizon, n, p = args.horizon, cli.candidates, args.num_particles
    step = jax.jit(partial(pets.model_step, args))
    space = env.action_space(env_params)
    # One compiled episode per guard setting, reused for every seed and key.
    episode = {guard: jax.jit(partial(planned_episode, args, env, env_params, guard)) for guard in (False, True)}
    for seed in range(args.num_seeds):
        model, buffer = jax.tree.map(lambda x: x[seed], (state.model, state.buffer))
        size = int(buffer.size)
        data = np.asarray(buffer.data.obs[:size])
        mean, std, low, high = data.mean(0), data.std(0) + 1e-6, data.min(0), data.max(0)
        starts = data[np.random.RandomState(seed).choice(np.arange(size - args.episode_length, size), cli.starts)]
        key = jax.random.PRNGKey(seed)
        exploded, first_out, dims = 0, [], []
        for obs0 in starts:
            key, action_key, member_key, step_key = jax.random.split(key, 4)
            actions = jax.random.uniform(action_key, (n, horizon, env.action_size), minval=space.low, maxval=space.high)
            members = pets.particle_members(member_key, args.propagation, horizon, n, p, args.ensemble_size)
            obs = np.broadcast_to(obs0, (n, p, obs0.shape[0]))
            total, first = np.zeros((n, p)), np.full((n, p), -1)
            for t in range(horizon):
                action = np.broadcast_to(np.asarray(actions[:, t])[:, None], (n, p, env.action_size))
                next_obs, _ = step(model, obs, action, members[t], jax.random.fold_in(step_key, t))
                total += np.asarray(env.reward_fn(obs, action, next_obs))
                obs = np.asarray(next_obs)
                out = ((obs < low - (high - low)) | (obs > high + (high - low))).any(-1)
                first = np.where(out & (first < 0), t, first)
            big = ~(np.abs(total) <= 1e3)  # NaN counts as exploded
            exploded += int(big.sum())
            first_out += first[big].tolist()
            dims += np.argmax(np.abs((obs[big] - mean) / std), -1).tolist()
        total_particles = cli.starts * n * p
        print(f"seed {seed}: {size} transitions; {exploded} of {total_particles} particles "
              f"({exploded / total_particles:.2%}) with |imagined return| > 1e3; first step out of the data's "
              f"range (-1: never): {first_out}; dimension farthest out at the end: {dims}", flush=True)
    if cli.episode:
        for seed in range(args.num_seeds):
            runner = jax.tree.map(lambda x: x[seed], state)
            best, total = episode[False](runner, jax.random.PRNGKey(seed))
            best = np.asarray(best)
            print(f"seed {seed}: MPC episode return {float(total):.1f}; {int((best > cli.threshold).sum())} of "
                  f"{best.size} steps with best planned value > {cli.threshold:g} (largest {best.max():.3g}, "
                  f"median {np.median(best):.3g})", flush=True)
    for i in range(cli.guard_ab):
        for seed in range(args.num_seeds):
            runner = jax.tree.map(lambda x: x[seed], state)
            key = jax.random.fold_in(jax.random.PRNGKey(seed), 1000 + i)
            returns = [float(episode[guard](runner, key)[1]) for guard in (False, True)]
            print(f"guard A/B, seed {seed}, episode {i}: return without guard {returns[0]:.1f}, "
                  f"with guard {returns[1]:.1f}", flush=True)


def planned_episode(args, env, env_params, guard, runner, key):
    """(best planned value per step, return) of one MPC episode in the real env. Its value function
    is the run's (`pets.make_train`'s model_value: trajectory sampling with the run's members);
    with `guard` it fails a particle, with the -1e6 the planner gives a NaN return, at the first
    step its imagined state leaves [low - width, high + width] of the stored data."""
    size = runner.buffer.size
    valid = (jax.numpy.arange(runner.buffer.data.obs.shape[0]) < size)[:, None]
    low = jax.numpy.min(jax.numpy.where(valid, runner.buffer.data.obs, jax.numpy.inf), 0)
    high = jax.numpy.max(jax.numpy.where(valid, runner.buffer.data.obs, -jax.numpy.inf), 0)
    low, high = low - (high - low), high + (high - low)

    def value_fn(obs, action_seqs, key):
        member_key, key = jax.random.split(key)
        n, horizon, _ = action_seqs.shape
        members = pets.particle_members(member_key, args.propagation, horizon, n, args.num_particles,
                                        args.ensemble_size)

        def step(obs, action, t, key):
            next_obs, _ = pets.model_step(args, runner.model, obs, action, members[t], key)
            reward = env.reward_fn(obs, action, next_obs)
            out = ((next_obs < low) | (next_obs > high)).any(-1) & guard
            return next_obs, jax.numpy.where(out, pets.NONFINITE_RETURN, reward), env.termination_fn(obs, action, next_obs) | out

        return pets.trajectory_values(step, obs, action_seqs, key, args.num_particles)

    obs, env_state = env.reset(key, env_params)
    space = env.action_space(env_params)
    middle = (np.asarray(space.low, np.float32) + np.asarray(space.high, np.float32)) / 2
    plan_mean = np.broadcast_to(middle, (args.horizon, env.action_size))

    def step(carry, key):
        obs, env_state, plan_mean = carry
        plan_key, step_key = jax.random.split(key)
        action, plan_mean, stats = pets.plan(args, env, env_params, partial(value_fn, obs), plan_mean, plan_key)
        obs, env_state, reward, _, _, _ = env.step(step_key, env_state, action, env_params)
        return (obs, env_state, plan_mean), (stats["plan/best_value"], reward)

    _, (best, rewards) = jax.lax.scan(step, (obs, env_state, plan_mean), jax.random.split(key, args.episode_length))
    return best, rewards.sum()


if __name__ == "__main__":
    main()
