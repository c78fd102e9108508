"""Intersection's optimum by exact dynamic programming over the env itself (envs/intersection.py).

    python benchmarks/intersection_dp.py          # writes benchmarks/results/intersection_dp.md

(`exact_values(params)` gives the same numbers for any EnvParams: benchmarks/dam_intersection_readings.py.)

The only randomness is the oncoming car's turn (left or right, 1/2 each, drawn at reset); the
rest is deterministic. Every transition below is `Intersection.step_env` (vmapped over all
reachable states at once), so the numbers are the env's as implemented, not a model of it.

* Single world (the turn known from the start): W_w(t, s) = max_a r + W_w(t + 1, s').
* Open loop (the turn never used): one action sequence for both worlds,
  J(t, s_L, s_R) = max_a (r_L + r_R) / 2 + J(t + 1, s_L', s_R').
* Closed loop (acting on the turn once it is visible): as the open loop while the two
  worlds' observations are equal; from the first step where they differ the agent knows the
  turn, so the value there is (W_L(t, s_L) + W_R(t, s_R)) / 2. This is the optimum of any
  policy on the observations (the ceiling of a planner with the true model).

States are merged when their observations agree to 1e-4 (the lattice of speeds and positions
is exact in float32 up to rounding).
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from envs.intersection import Intersection

ACTIONS = (0, 1, 2)  # accelerate, decelerate, neither
OUT = Path(__file__).parent / "results" / "intersection_dp.md"


def make_step(env, params):
    step = jax.jit(jax.vmap(lambda s, a: env.step_env(jax.random.PRNGKey(0), s, a, params)[:3], (0, None)),
                   static_argnums=1)
    obs = jax.jit(jax.vmap(env.get_obs))
    return step, obs


def enumerate_worlds(env, params, T, worlds):
    """Forward: the reachable tuples of states (one per world, the same actions in all) at every
    t. Returns per t: (obs (n, worlds, d), successor index (n, 3), rewards (n, 3, worlds))."""
    step, get_obs = make_step(env, params)
    _, start = env.reset(jax.random.PRNGKey(0), params)
    # A layer: per world a batched EnvState of the n reachable tuples.
    layer = [jax.tree.map(lambda x: x[None], start.replace(turn_left=jnp.array(w))) for w in worlds]
    tables = []
    for _ in range(T):
        n = int(layer[0].time.shape[0])
        obs = np.stack([np.asarray(get_obs(b)) for b in layer], 1)
        outs = [[step(b, a) for b in layer] for a in ACTIONS]  # [action][world] -> (obs, state, reward)
        reward = np.stack([np.stack([np.asarray(o[2]) for o in per_world], -1) for per_world in outs], 1)
        next_obs = np.concatenate([np.stack([np.asarray(o[0]) for o in per_world], 1) for per_world in outs])
        keys = np.round(next_obs.reshape(len(ACTIONS) * n, -1), 4)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        tables.append((obs, inverse.reshape(len(ACTIONS), n).T, reward))
        layer = [jax.tree.map(lambda *x: jnp.concatenate(x)[first], *[outs[a][w][1] for a in range(len(ACTIONS))])
                 for w in range(len(worlds))]
    return tables


def backward(tables, combine, over_actions=np.max):
    """Values at t = 0..T of every reachable tuple: V_t = max_a combine(r) + V_{t+1}[next] (or
    the mean over actions: the uniform-random policy)."""
    values = [None] * len(tables) + [np.zeros(tables[-1][1].max() + 1)]
    for t in reversed(range(len(tables))):
        _, next_index, reward = tables[t]
        values[t] = over_actions(combine(reward) + values[t + 1][next_index], axis=1)
    return values


def key_of(obs):
    return tuple(np.round(obs, 4).tolist())


def exact_values(params=None):
    """{name: expected return} of Intersection with `params` (default: the env's), exactly."""
    env = Intersection()
    params = env.default_params if params is None else params
    T = params.max_steps_in_episode
    single = {w: enumerate_worlds(env, params, T, (w,)) for w in (True, False)}
    w_values = {w: backward(single[w], lambda r: r[..., 0]) for w in single}
    w_lookup = {w: [{key_of(o[0]): v for o, v in zip(single[w][t][0], w_values[w][t])} for t in range(T)]
                for w in single}
    joint = enumerate_worlds(env, params, T, (True, False))
    mean = lambda r: r.mean(-1)  # noqa: E731
    # Closed loop: split where the two worlds' observations first differ.
    closed = [None] * T + [np.zeros(joint[-1][1].max() + 1)]
    for t in reversed(range(T)):
        obs, next_index, reward = joint[t]
        value = np.max(mean(reward) + closed[t + 1][next_index], axis=1)
        differs = np.any(np.abs(obs[:, 0] - obs[:, 1]) > 1e-4, -1)
        for n in np.flatnonzero(differs):
            value[n] = 0.5 * (w_lookup[True][t][key_of(obs[n, 0])] + w_lookup[False][t][key_of(obs[n, 1])])
        closed[t] = value
    return {
        "turn known from the start, left": float(w_values[True][0][0]),
        "turn known from the start, right": float(w_values[False][0][0]),
        "open loop (one action sequence, turn unknown)": float(backward(joint, mean)[0][0]),
        "closed loop (acting on the turn once visible): the optimum": float(closed[0][0]),
        "uniform-random policy": float(backward(joint, mean, np.mean)[0][0]),
    }


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    results = exact_values()
    lines = ["| Intersection, exact DP over the env | expected return |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in results.items()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n\n`python benchmarks/intersection_dp.py`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
