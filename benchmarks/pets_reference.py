"""Reference returns for a PETS learning curve: zero actions, and PETS' planner with the true
dynamics (the real env as its model, one particle: the env is deterministic), per episode.

    python benchmarks/pets_reference.py --env-id reacher --population 400 --elites 40 --horizon 25 --iterations 5
    python benchmarks/pets_reference.py --env-id reacher --population 100 --elites 10 --horizon 25 --iterations 3
    python benchmarks/pets_reference.py --env-id pendulum --optimizer icem --set icem_noise_beta=0.25

What a learned model can reach is at most about what the planner reaches with the true model,
so this separates "the model is not good enough" from "the planner (or the task's reward over
the planning horizon) does not do better".

Each call stores its row in benchmarks/results/pets_oracle.csv (replacing a row with the same
task and planner settings: the key columns below, and the optimizer's own settings in
`settings`); `pets_curves.py` draws the row matching its curve's planner as a horizontal line.
`pets_planners.py` compares the optimizers at equal budgets with `true_dynamics_returns`.
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from algorithms import pets, utils

ORACLE_FILE = Path(__file__).parent / "results" / "pets_oracle.csv"
KEY = ["env_id", "backend", "episode_length", "optimizer", "population", "num_elites", "horizon", "cem_iterations",
       "settings"]
# The settings of each optimizer beyond the key's (CEM's: the rows written before this column).
OWN = {"cem": ["cem_alpha", "cem_epsilon"], "icem": ["cem_alpha", "icem_decay", "icem_noise_beta", "icem_keep_fraction"],
       "mppi": ["mppi_gamma", "mppi_sigma", "mppi_beta"], "random": []}


def settings(args):
    return " ".join(f"{k}={getattr(args, k)}" for k in OWN[args.optimizer]) if args.optimizer != "cem" else ""


def _key(args):
    return {**{k: getattr(args, k) for k in KEY if k != "settings"}, "settings": settings(args)}


def oracle_row(args):
    """The stored true-dynamics row for the task and planner of `args` (pets.Args), or None."""
    if not ORACLE_FILE.exists():
        return None
    rows = _read()
    match = rows[np.all([rows[k] == v for k, v in _key(args).items()], axis=0)]
    return None if match.empty else match.iloc[-1]


def _read():
    rows = pd.read_csv(ORACLE_FILE, keep_default_na=False)
    rows["optimizer"] = rows["optimizer"].replace("", "cem") if "optimizer" in rows else "cem"
    if "settings" not in rows:
        rows["settings"] = ""
    return rows


def store_row(args, row):
    key = _key(args)
    rows = _read() if ORACLE_FILE.exists() else pd.DataFrame(columns=[*KEY, *row])
    rows = rows[~np.all([rows[k] == v for k, v in key.items()], axis=0)]
    new = pd.DataFrame([{**key, **row}])
    rows = pd.concat([rows, new] if len(rows) else [new]).sort_values(KEY)
    rows[[*KEY, *[c for c in rows if c not in KEY]]].to_csv(ORACLE_FILE, index=False)


def true_dynamics_returns(args, keys):
    """(zero-action returns, returns of the planner of `args` with the real env as its model),
    one episode per key; the planned episode is compiled once and run per key (memory)."""
    env, params = pets.make_env(args)
    batched_step = jax.vmap(jax.vmap(env.step_env, (None, 0, 0, None)), (None, 0, 0, None))

    def true_step(states, actions, t, key):  # the planner's model interface: (N, P) particles
        _, states, reward, terminated, _ = batched_step(key, states, actions, params)
        return states, reward, terminated

    def episode(key, planner):
        _, state = env.reset(key, params)

        def step(carry, key):
            state, plan_state, done = carry
            plan_key, step_key = jax.random.split(key)
            if planner:
                value = lambda seqs, k: pets.trajectory_values(true_step, state, seqs, k, num_particles=1)
                action, plan_state, _ = pets.plan(args, env, params, value, plan_state, plan_key)
            else:
                action = jnp.zeros(env.action_size)
            _, state, reward, terminated, _ = env.step_env(step_key, state, action, params)
            return (state, plan_state, done | terminated), reward * (1 - done)

        init = (state, pets.init_plan(args, env, params), jnp.bool_(False))
        _, rewards = jax.lax.scan(step, init, jax.random.split(key, args.episode_length))
        return rewards.sum()

    zero = np.asarray(jax.jit(jax.vmap(lambda k: episode(k, False)))(keys))
    planned_episode = jax.jit(lambda k: episode(k, True))
    return zero, np.array([float(planned_episode(k)) for k in keys])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="reacher")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--population", type=int, default=None)
    parser.add_argument("--elites", type=int, default=None)
    parser.add_argument("--horizon", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--optimizer", default="cem", choices=pets.OPTIMIZERS)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="any other float field of pets.Args (e.g. icem_noise_beta=0.25)")
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    given = dict(population=cli.population, num_elites=cli.elites, horizon=cli.horizon, cem_iterations=cli.iterations)
    given.update({k: float(v) for k, v in (item.split("=", 1) for item in cli.set)})
    args = pets.resolve(pets.Args(env_id=cli.env_id, progress=False, optimizer=cli.optimizer,
                                  **{k: v for k, v in given.items() if v is not None}))
    keys = jax.random.split(jax.random.PRNGKey(0), cli.episodes)
    start = time.time()
    zero, planned = true_dynamics_returns(args, keys)
    seconds = (time.time() - start) / cli.episodes
    print(f"{args.env_id}, {args.episode_length}-step episodes, {cli.episodes} episodes (seeds 0..{cli.episodes - 1})")
    print(f"zero actions: mean {float(zero.mean()):.2f} (per episode {[round(float(x), 2) for x in zero]})")
    print(f"true-dynamics {args.optimizer} {settings(args)} (population {args.population}, elites {args.num_elites}, horizon {args.horizon}, "
          f"{args.cem_iterations} iterations): mean {planned.mean():.2f} (per episode {np.round(planned, 2).tolist()}; "
          f"{seconds:.0f} s per episode with compilation)")
    store_row(args, {"episodes": cli.episodes, "zero_action_mean": round(float(zero.mean()), 3),
                     "oracle_mean": round(float(planned.mean()), 3), "oracle_min": round(float(planned.min()), 3),
                     "oracle_per_episode": " ".join(f"{x:.2f}" for x in planned),
                     "seconds_per_episode": round(seconds, 1)})
    print(f"stored in {ORACLE_FILE}")


if __name__ == "__main__":
    main()
