"""The ranking oracle for DAM's corrected values: on a fixed state, with a learned model (and
discriminator), how well do the planner's values rank K random action sequences against their
*true* values under the real environment?

    python benchmarks/dam_ranking.py --env-id Intersection --model gaussian --method disc
    python benchmarks/dam_ranking.py --env-id IcyRoad --model mdn --method dam

One run of dam.py's Algorithm 3 (J rounds, dam.py's defaults, seed 0) gives the model and the
discriminator; a second one keeps the discriminator's last Adam step instead of its early-stopped
parameters (`--disc-eval-every` = `--disc-train-steps`). From the env's start state (episode
step 0), K uniformly random sequences over the planner's horizon H get:
* their true value: the same estimator (Eq. 4 without weights) with the env itself as the
  model (`sample_true`: hidden variables drawn given the observation), `--true-particles` each;
* their planner values with the learned model, one per weighting: none (the baseline's), Eq. 4
  as written (w = exp(logit)), Alg. 1's sigmoid, self-normalised, flattened w^alpha (alpha 0.25,
  0.5, 0.75) and clipped max(w, beta) (beta 0.01, 0.1, 1), Grover et al. 2019's grid.
Reported per weighting: Spearman's rank correlation with the true values, the true value of the
sequence the planner would pick (its argmax) against the best true value, and the mean log-weight
at the horizon. A weighting that ranks worse than none is a defect of the correction, shown here.
Writes benchmarks/results/dam_ranking_<env>_<model>_<method>.md.
"""

import argparse
import dataclasses
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from algorithms import dam, utils

RESULTS = Path(__file__).parent / "results"
WEIGHTINGS = {  # name -> dam.Args overrides of the planner's value estimate
    "none (baseline)": dict(method="baseline"),
    "Eq. 4, w = exp(logit)": {},
    "Alg. 1, w = sigmoid(logit)": dict(weight="sigmoid"),
    "self-normalised": dict(self_normalize=True),
    **{f"flattened, alpha {a}": dict(weight_power=a) for a in (0.25, 0.5, 0.75)},
    **{f"clipped, beta {b}": dict(weight_floor=b) for b in (0.01, 0.1, 1.0)},
}


def ranking_problem(args, env, env_params, sequences=1000, true_particles=64):
    """(start observation, K random sequences over the planner's horizon, their true values: Eq. 4
    without weights with the env itself as the model, `true_particles` rollouts each)."""
    obs, _ = env.reset(jax.random.PRNGKey(100), env_params)
    seqs = jax.random.randint(jax.random.PRNGKey(101), (sequences, args.horizon), 0, dam.NUM_ACTIONS)
    truth_args = dataclasses.replace(args, num_particles=true_particles, method="baseline", self_normalize=False)
    zero = lambda s, a, s2: jnp.zeros(s.shape[:-1])  # noqa: E731
    values, _ = jax.jit(lambda key: dam.estimate_values(truth_args, env, env_params, partial(dam.sample_true, env, env_params),
                                                        zero, obs, 0, seqs, key))(VALUE_KEY)
    return obs, seqs, np.asarray(values)


def planner_values(args, env, env_params, runner, obs, sequences):
    """The values the planner of `args` gives the sequences with the runner's model and discriminator
    (the env itself for `--model true`), and the mean log-weight at the horizon."""
    if args.model == "true":
        sample_next = partial(dam.sample_true, env, env_params)
    else:
        sample_next = partial(dam.sample_model, args, runner.model, runner.norm)
    return dam.estimate_values(args, env, env_params, sample_next, dam.log_weight_fn(args, runner), obs, 0,
                               sequences, VALUE_KEY)


VALUE_KEY = jax.random.PRNGKey(102)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Intersection", choices=dam.ENV_IDS)
    parser.add_argument("--model", default="gaussian", choices=["gaussian", "mdn"])
    parser.add_argument("--method", default="disc", choices=["disc", "dam"])
    parser.add_argument("--rounds", type=int, default=dam.Args.rounds)
    parser.add_argument("--sequences", type=int, default=1000, help="K, the candidates ranked")
    parser.add_argument("--true-particles", type=int, default=64)
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    base = dam.resolve(dam.Args(env_id=cli.env_id, model=cli.model, method=cli.method, rounds=cli.rounds,
                                progress=False))
    env, env_params = dam.make_env(base)
    obs, sequences, true_values = ranking_problem(base, env, env_params, cli.sequences, cli.true_particles)
    lines = [f"# DAM's values against the true ones: {cli.env_id}, {cli.model} model, {cli.method}", "",
             f"`python benchmarks/dam_ranking.py --env-id {cli.env_id} --model {cli.model} --method {cli.method}"
             + (f" --rounds {cli.rounds}" if cli.rounds != dam.Args.rounds else "") + f"`: seed 0, {cli.rounds} rounds; "
             f"{cli.sequences} random sequences of H = {base.horizon} from the start state; true values with "
             f"{cli.true_particles} env rollouts each (best {true_values.max():.2f}, mean {true_values.mean():.2f}); "
             f"planner values with {base.num_particles} model rollouts each, common random numbers.", "",
             "| discriminator | weighting | Spearman with the true values | true value of the planner's pick | "
             "mean log-weight at H |", "|---|---|---|---|---|"]
    for disc_name, overrides in [("early-stopped", {}), ("last Adam step", dict(disc_eval_every=base.disc_train_steps))]:
        args = dam.resolve(dataclasses.replace(base, **overrides))
        start = time.time()
        runner, metrics = jax.jit(lambda key: dam.train(args, env, env_params, key))(dam.seed_keys(args)[0])
        ratio_real = float(metrics["disc/holdout_ratio_real"][-1])
        print(f"{disc_name}: trained in {time.time() - start:.0f} s; final held-out E_p[exp(-logit)] {ratio_real:.3g}",
              flush=True)
        for name, weighting in WEIGHTINGS.items():
            if disc_name != "early-stopped" and name.startswith("none"):
                continue  # the same model: the same values
            planner = dataclasses.replace(args, **weighting)
            values, log_w = jax.jit(partial(planner_values, planner, env, env_params))(runner, obs, sequences)
            values = np.asarray(values)
            rho = spearmanr(values, true_values).statistic
            lines.append(f"| {disc_name} (held-out E_p[exp(-logit)] {ratio_real:.3g}) | {name} | {rho:.3f} | "
                         f"{true_values[np.argmax(values)]:.2f} | {float(log_w):.2f} |")
            print(lines[-1], flush=True)
    stem = RESULTS / f"dam_ranking_{cli.env_id}_{cli.model}_{cli.method}"
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
