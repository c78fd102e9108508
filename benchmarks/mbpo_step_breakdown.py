"""Where the time of one MBPO hopper env step goes, at 5k, 15k and 30k real transitions.

    python benchmarks/mbpo_step_breakdown.py [--transitions 5000 15000 30000] [--run DIR]

At the paper's settings, each phase is timed alone (jitted, best of 3, 1 seed) on a real buffer
of N random-action hopper transitions:
* fit: the fixed cost of a fit (split, normalizer, bootstrap draw) and the cost of one epoch
  (ceil(0.8 N / 256) SGD steps of the 7 members + the holdout loss), from two fits of exactly 1
  and 11 epochs;
* rollout: one branch of 100k model rollouts at k = 1;
* SAC: the G = 20 updates of one env step (batch sampling included);
* collect: one env step of the real env with the policy.
A fit runs every 250 env steps and the number of epochs it takes depends on training, so the
per-step cost uses the epochs that the real run `--run` (a hopper run of `mbpo_curves.py`) logged
near N (`model/epochs`, last fit of each epoch), and compares the prediction with that run's
measured seconds per step. The real buffer is allocated as in that run (its total_timesteps), because a fit's static shapes
follow the allocation. Writes benchmarks/results/mbpo_step_breakdown.md.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pandas as pd
from mbpo_throughput import best_time, cpu_name

from algorithms import mbpo, utils

RESULTS = Path(__file__).parent / "results"


def phase_seconds(n, capacity):
    """Seconds of each phase with a real buffer of `n` random-action transitions (1 seed) and
    `capacity` rows (the static shapes a fit works on follow the buffer's allocation)."""
    timings = {}
    for epochs in (1, 11):
        args = mbpo.resolve(mbpo.Args(env_id="hopper", init_steps=n, total_timesteps=max(capacity, n + 1000), progress=False,
                                      model_max_epochs=epochs, model_patience=epochs))
        trainer = mbpo.make_train(args)
        env, env_params = mbpo.make_env(args)
        if epochs == 1:  # fill the real buffer once: random actions, nothing is learned before init_steps
            chunk = jax.jit(trainer.chunk, donate_argnums=0)
            state = jax.jit(trainer.init)(jax.random.PRNGKey(0))
            for step in range(0, n, args.epoch_length):
                state, _ = chunk(state, jnp.int32(step))
            opt = optax.adam(args.model_lr).init(mbpo.eqx.filter(state.model, mbpo.eqx.is_array))
        # Only the model leaves the program: returning the buffers too would time copies of them.
        fit = jax.jit(lambda *a: mbpo.fit_model(args, *a)[0])
        timings[f"fit{epochs}"] = best_time(fit, state.model, opt, state.real, jax.random.PRNGKey(1))
    state = state._replace(model=fit(state.model, opt, state.real, jax.random.PRNGKey(1)),
                           model_data=state.model_data.resize(args.rollout_batch_size))
    # The rollout writes into the model buffer in place, as in training: donate a fresh copy per call.
    rollout = jax.jit(lambda data, s, k: mbpo.model_rollout(args, env, s._replace(model_data=data), 1, k)[0], donate_argnums=0)
    times = []
    for repeat in range(4):
        data = jax.block_until_ready(jax.tree.map(jnp.copy, state.model_data))
        start = time.perf_counter()
        filled = jax.block_until_ready(rollout(data, state._replace(model_data=None), jax.random.PRNGKey(2)))
        times.append(time.perf_counter() - start)
    timings["rollout"] = min(times[1:])  # the first call compiles
    state = state._replace(model_data=filled)
    timings["sac"] = best_time(jax.jit(lambda s, k: mbpo.update(args, s, k)[0].sac), state, jax.random.PRNGKey(3))
    collect = jax.jit(lambda s, k: jax.lax.scan(lambda c, kk: (mbpo.collect(args, env, env_params, c, False, kk)[0], None), s, k)[0].obs)
    small = state._replace(model_data=mbpo.Buffer.empty(1, state.obs.shape[-1], state.real.data.action.shape[-1]))
    timings["collect"] = best_time(collect, small, jax.random.split(jax.random.PRNGKey(4), 100)) / 100
    per_epoch = (timings["fit11"] - timings["fit1"]) / 10
    return {"fit_fixed": timings["fit1"] - per_epoch, "fit_epoch": per_epoch, "rollout": timings["rollout"],
            "sac": timings["sac"], "collect": timings["collect"]}, args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transitions", type=int, nargs="+", default=[5000, 15000, 30000])
    parser.add_argument("--run", default=str(RESULTS / "curves" / "hopper" / "mbpo" / "seed0"))
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    metrics_file = Path(cli.run) / "metrics.csv"
    utils.check(metrics_file.exists(), f"no metrics.csv in {cli.run}: run benchmarks/mbpo_curves.py first")
    run = pd.read_csv(metrics_file)
    capacity = json.loads((Path(cli.run) / "args.json").read_text())["total_timesteps"]
    lines = [f"MBPO hopper, time of one env step by phase (paper settings, 1 seed), jax {jax.__version__} on "
             f"{jax.devices()[0].platform}, {cpu_name()}; fit epochs and measured s/step from {cli.run}", "",
             "| real transitions | fit: fixed + epochs x per epoch | per fit | rollout (100k, k=1) | SAC (G=20) "
             "| collect | predicted s/step | measured s/step (epoch) | fit share |", "|---" * 9 + "|"]
    for n in cli.transitions:
        t, args = phase_seconds(n, capacity)
        # The run's epoch ending nearest n (the fit at its start saw about n - 750 .. n transitions).
        row = run.iloc[(run["env_steps"] - (n + args.epoch_length)).abs().argsort().iloc[0]]
        epochs = float(row["model/epochs"])
        fit = t["fit_fixed"] + epochs * t["fit_epoch"]
        per_step = (fit + t["rollout"]) / args.model_train_freq + t["sac"] + t["collect"]
        measured = 1.0 / float(row["charts/steps_per_second"])
        line = (f"| {n} | {t['fit_fixed']:.2f} s + {epochs:.0f} x {t['fit_epoch']:.3f} s | {fit:.1f} s | "
                f"{t['rollout']:.2f} s | {t['sac'] * 1e3:.0f} ms | {t['collect'] * 1e3:.2f} ms | {per_step:.3f} s | "
                f"{measured:.3f} s (to {int(row['env_steps'])}) | {fit / args.model_train_freq / per_step:.0%} |")
        lines.append(line)
        print(line, flush=True)
    out = RESULTS / "mbpo_step_breakdown.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
