"""GPU check: for every algorithm, compile time, steady-state throughput and peak device memory at
1 and 8 vmapped seeds, in one short command, for the day a GPU is lent.

    python benchmarks/gpu_check.py --budget 1800     # on the GPU machine (H200: ~30 min), writes benchmarks/results/gpu_check.md
    python benchmarks/gpu_check.py --smoke           # tiny configs on CPU (minutes): checks this script, writes to /tmp
    python benchmarks/gpu_check.py --algos mbpo pets --seeds 1 8 --budget 300

Each case (algorithm x seed count) is a real `run()` of the algorithm file (the same compiled
chunks, host loop and checkpoints a user gets) in a fresh child process, so compile times are
not hidden by the previous case and peak memory is the case's own. The child does not turn the
persistent compilation cache on (`run()` alone never does) unless `--cache` asks (the test suite
does, so that its smoke run reads the programs its other runs compiled), and measures:
* compile s: JAX's own compile events (tracing + lowering + XLA compile, `jax.monitoring`),
  summed over the run: the one-off cost before the first chunk's work;
* total s: wall-clock from importing the algorithm's module to the end of its run (the import and
  `Args` can compile small programs, which compile s counts);
* steady: the median wall-clock of the chunks after the first two (the first holds the compile,
  the second MBPO's first model fit from scratch), in the algorithm's unit per second, summed
  over seeds and per seed;
* peak memory: the device's `peak_bytes_in_use` (GPU), or the process's peak RSS on CPU.
The sizes below follow each paper's settings (hopper MBPO, halfcheetah PETS with the reference
planner, ...) but shorten the runs (on an H200 SAC alone took 5 minutes at one seed: give
`--budget` ~30 min). `--smoke` shrinks every network and loop and runs on gymnax's pendulum
(TDML, which restarts the physics from snapshots, on Brax's `positional` inverted pendulum): it
checks this script, not the physics, and a pendulum compiles in a third of the time (MBPO's
tiny epoch: 7 s against 23 s), so the CPU can run it in the test suite. SAC's and MBPO's smoke configs are the
ones tests/test_devices.py runs in one process and in two (it imports them from here).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TDML_POLICY = str(ROOT / "benchmarks" / "results" / "tdml" / "sac_policy")
# algorithm -> (unit of its chunks, the metrics column that counts them, paper-sized config, smoke config)
CASES = {
    "sac": ("env step", "env_steps",
            dict(env_id="hopper", total_timesteps=3000, epoch_length=500, init_steps=500, updates_per_step=20),
            dict(env_id="pendulum", total_timesteps=1000, buffer_size=1000,
                 epoch_length=250, init_steps=500, updates_per_step=2, sac_width=64, sac_batch_size=128)),
    "mbpo": ("env step", "env_steps",  # hopper at the paper's settings, in epochs of one model period (250 steps)
             dict(env_id="hopper", total_timesteps=1500, epoch_length=250, init_steps=250),
             dict(env_id="pendulum", total_timesteps=750, epoch_length=250,
                  init_steps=250, model_train_freq=250, rollout_batch_size=500, ensemble_size=3, num_elites=2,
                  model_width=32, model_depth=2, model_weight_decay=(1e-5, 1e-5, 1e-5), sac_width=32,
                  updates_per_step=2, model_max_epochs=5, max_holdout=100, eval_episodes=2,
                  rollout_schedule=(0, 2, 1, 3))),
    "pets": ("env step", "env_steps",  # halfcheetah with the reference planner (400 / 40, P = 20, H = 30)
             dict(env_id="halfcheetah", num_trials=4, episode_length=100),
             # the smoke case runs PETS' other paths (tests/test_pets.py's CLI run is this config)
             dict(env_id="pendulum", num_trials=4, episode_length=20, population=20, num_elites=4,
                  ensemble_size=2, num_particles=2, horizon=5, cem_iterations=2, model_width=32, model_depth=2,
                  model_weight_decay=(1e-5, 1e-5, 1e-5), propagation="ts1", optimizer="random", learn_reward=True)),
    "dam": ("round", "env_steps",
            dict(env_id="Intersection", rounds=4),
            # tests/test_dam.py's TINY: its reference run is this case's program
            dict(env_id="IcyRoad", rounds=2, init_episodes=4, num_sequences=32, num_particles=2, model_width=32,
                 disc_width=32, model_train_steps=100, disc_train_steps=100, model_batch_size=64, disc_batch_size=64)),
    "tdml": ("model step", "steps",  # hopper, Figure 2's slbo model, the committed SAC data policy
             dict(env_id="hopper", policy_run=TDML_POLICY, arch="slbo", num_trajectories=20, total_steps=2000,
                  eval_every=250, eval_starts=4, eval_horizon=200),
             # tests/test_tdml.py's TINY: its 2-seed run is this case's program
             dict(env_id="pendulum", random_policy=True, num_trajectories=8, trajectory_length=40, total_steps=60,
                  eval_every=20, model_layers=(32, 32), model_batch_size=32, critic_layers=(32, 32),
                  critic_batch_size=64, eval_starts=4, eval_horizon=30, n_step_batch=16)),
}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def run_case(algo, seeds, smoke, run_dir, cache):
    """In the child: one real run of `algo`; prints one JSON line with its figures."""
    import importlib

    import jax
    import numpy as np
    import pandas as pd

    from algorithms import utils

    if cache:
        utils.enable_compilation_cache()

    compile_s = [0.0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compile_s.__setitem__(0, compile_s[0] + duration) if event in COMPILE_EVENTS else None)
    # The clock starts before the import, whose compiles the listener counts too (CI saw compile 1.5 > total 1.4 s).
    start = time.perf_counter()
    module = importlib.import_module(f"algorithms.{algo}")
    unit, column, config, small = CASES[algo]
    args = module.Args(**(small if smoke else config), num_seeds=seeds, run_dir=str(run_dir),
                       run_name=f"{algo}-{seeds}", progress=False)
    module.run(args)
    total = time.perf_counter() - start
    rows = pd.read_csv(Path(run_dir) / f"{algo}-{seeds}" / "metrics.csv")
    rows = rows[rows.seed == rows.seed.min()]  # one row per chunk; the x-axis counts the first seed's progress
    moved = np.diff(np.concatenate([[0], rows[column].to_numpy()]))
    chunk_s = moved / rows["charts/steps_per_second"].to_numpy()  # the host loop's own timing of each chunk
    units = np.ones_like(moved) if unit == "round" else moved  # per chunk and seed
    later = slice(2, None) if len(chunk_s) > 2 else slice(-1, None)
    steady_s, steady_units = float(np.median(chunk_s[later])), float(np.median(units[later]))
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    print(json.dumps({
        "algo": algo, "seeds": seeds, "unit": unit, "platform": device.platform, "device": device.device_kind,
        "compile_s": round(compile_s[0], 1), "total_s": round(total, 1), "chunks": len(chunk_s),
        "steady_chunk_s": round(steady_s, 3), "steady_per_s": round(seeds * steady_units / steady_s, 2),
        "peak_memory_gib": round((peak if peak is not None else
                                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 2),
        "memory_of": "device peak_bytes_in_use" if peak is not None else "host peak RSS",
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="vmapped seed counts (default: 1 8; smoke: 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny configs, for the CPU (checks the script)")
    parser.add_argument("--cache", action="store_true",
                        help="the persistent compilation cache on (MBRL_JAX_CACHE): compile s then counts cache reads")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all cases; a case past it is skipped")
    parser.add_argument("--out", default=None, help="markdown report (default: benchmarks/results/gpu_check.md; smoke: a temp file)")
    parser.add_argument("--case", nargs=2, metavar=("ALGO", "SEEDS"), help=argparse.SUPPRESS)  # the child's entry
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.case:
        return run_case(cli.case[0], int(cli.case[1]), cli.smoke, cli.run_dir, cli.cache)
    seeds = cli.seeds or ([2] if cli.smoke else [1, 8])
    out = Path(cli.out or (Path(tempfile.gettempdir()) / "gpu_check_smoke.md" if cli.smoke else
                           ROOT / "benchmarks" / "results" / "gpu_check.md"))
    devices = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"], capture_output=True, text=True,
                             check=True).stdout.strip()
    print(f"devices: {devices}", flush=True)
    start, rows = time.time(), []
    with tempfile.TemporaryDirectory() as run_dir:
        for algo in cli.algos:
            for n in seeds:
                left = cli.budget - (time.time() - start)
                if left <= 10:
                    rows.append({"algo": algo, "seeds": n, "error": "skipped: over --budget"})
                    continue
                command = [sys.executable, __file__, "--case", algo, str(n), "--run-dir", run_dir] + \
                          (["--smoke"] if cli.smoke else []) + (["--cache"] if cli.cache else [])
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=left, cwd=ROOT)
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                                {"algo": algo, "seeds": n, "error": done.stderr.strip().splitlines()[-1][:200]})
                except subprocess.TimeoutExpired:
                    rows.append({"algo": algo, "seeds": n, "error": f"timed out after {left:.0f} s (--budget)"})
                print(json.dumps(rows[-1]), flush=True)
    lines = [f"# GPU check ({'smoke, tiny configs' if cli.smoke else 'paper-sized configs'})", "",
             f"`python benchmarks/gpu_check.py{' --smoke' if cli.smoke else ''}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - start:.0f} s in all.", "",
             f"Devices: `{devices}`", "",
             "| algorithm | seeds | compile s | run s | steady s / chunk | per s (all seeds) | per s per seed | peak memory GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algo']} | {r['seeds']} | {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['algo']} | {r['seeds']} | {r['compile_s']} | {r['total_s']} | {r['steady_chunk_s']} | "
                         f"{r['steady_per_s']} {r['unit']}s | {r['steady_per_s'] / r['seeds']:.2f} | "
                         f"{r['peak_memory_gib']} ({r['memory_of']}) |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [r for r in rows if "error" in r]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
