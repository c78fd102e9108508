"""Reference returns for a PETS learning curve: zero actions, and PETS' planner with the true
dynamics (the real env as its model, one particle: the env is deterministic), per episode.

    python benchmarks/pets_reference.py --env-id reacher --population 400 --elites 40 --horizon 25 --iterations 5
    python benchmarks/pets_reference.py --env-id reacher --population 100 --elites 10 --horizon 25 --iterations 3

What a learned model can reach is at most about what the planner reaches with the true model,
so this separates "the model is not good enough" from "the planner (or the task's reward over
the planning horizon) does not do better".
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from algorithms import pets, utils


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="reacher")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--population", type=int, default=None)
    parser.add_argument("--elites", type=int, default=None)
    parser.add_argument("--horizon", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    given = dict(population=cli.population, num_elites=cli.elites, horizon=cli.horizon, cem_iterations=cli.iterations)
    args = pets.resolve(pets.Args(env_id=cli.env_id, progress=False, **{k: v for k, v in given.items() if v is not None}))
    trainer = pets.make_train(args)
    env, params = pets.envs.make(args.env_id, backend=args.backend, max_steps_in_episode=args.episode_length)
    batched_step = jax.vmap(jax.vmap(env.step_env, (None, 0, 0, None)), (None, 0, 0, None))

    def true_step(states, actions, t, key):  # the planner's model interface: (N, P) particles
        _, states, reward, terminated, _ = batched_step(key, states, actions, params)
        return states, reward, terminated

    def episode(key, planner):
        _, state = env.reset(key, params)

        def step(carry, key):
            state, plan_mean, done = carry
            plan_key, step_key = jax.random.split(key)
            if planner:
                value = lambda seqs, k: pets.trajectory_values(true_step, state, seqs, k, num_particles=1)
                action, plan_mean, _ = trainer.plan(value, plan_mean, plan_key)
            else:
                action = jnp.zeros(env.action_size)
            _, state, reward, terminated, _ = env.step_env(step_key, state, action, params)
            return (state, plan_mean, done | terminated), reward * (1 - done)

        init = (state, jnp.zeros((args.horizon, env.action_size)), jnp.bool_(False))
        _, rewards = jax.lax.scan(step, init, jax.random.split(key, args.episode_length))
        return rewards.sum()

    keys = jax.random.split(jax.random.PRNGKey(0), cli.episodes)
    zero = jax.jit(jax.vmap(lambda k: episode(k, False)))(keys)
    planned_episode = jax.jit(lambda k: episode(k, True))  # compiled once, run per episode (memory)
    planned = np.array([float(planned_episode(k)) for k in keys])
    print(f"{args.env_id}, {args.episode_length}-step episodes, {cli.episodes} episodes (seeds 0..{cli.episodes - 1})")
    print(f"zero actions: mean {float(zero.mean()):.2f} (per episode {np.round(np.asarray(zero), 2).tolist()})")
    print(f"true-dynamics CEM (population {args.population}, elites {args.num_elites}, horizon {args.horizon}, "
          f"{args.cem_iterations} iterations): mean {planned.mean():.2f} (per episode {np.round(planned, 2).tolist()})")


if __name__ == "__main__":
    main()
