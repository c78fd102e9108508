"""Seeds split over devices (algorithms/utils.py: seed_mesh, over_devices): on 4 forced CPU
devices, 4 seeds on 4 devices give the metrics of 4 seeds vmapped on one device (to the rounding
of batch-size-dependent XLA kernels), the state really is split, and a run killed on 4 devices
resumes on 1; and 2 processes under jax.distributed give the metrics of one process. Each case
runs in subprocesses, since the device count is fixed at JAX's start."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import as_cli

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from algorithms import sac, utils

    root = sys.argv[1]
    # The four runs compile two programs (4 devices, 1 device): the killed run and the resumed one
    # read them from the persistent cache (the tests' shared one, conftest.py) instead of compiling again.
    utils.enable_compilation_cache()
    config = dict(env_id="pendulum", total_timesteps=1000, buffer_size=1000, epoch_length=250, init_steps=500,
                  updates_per_step=2, sac_width=64, sac_batch_size=128, progress=False, num_seeds=4, run_dir=root)
    assert jax.device_count() == 4
    # The state is split: each device holds one seed's buffer.
    args = sac.resolve(sac.Args(**config, devices=4))
    mesh = utils.seed_mesh(args)
    trainer = sac.make_train(args)
    state = utils.over_devices(jax.vmap(trainer.init), mesh, donate=False)(utils.on_devices(sac.seed_keys(args), mesh))
    shards = state.buffer.data.obs.addressable_shards
    out = {"shard_shapes": [list(s.data.shape) for s in shards], "shard_devices": len({s.device for s in shards}),
           "full_shape": list(state.buffer.data.obs.shape)}
    sac.run(sac.Args(**config, devices=4, run_name="d4"))
    sac.run(sac.Args(**config, devices=1, run_name="d1"))
    # Killed after its 2nd epoch on 4 devices, resumed on 1.
    write = utils.RunDir.write_metrics
    calls = []
    def killed(self, metrics, first_seed):
        write(self, metrics, first_seed)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
    utils.RunDir.write_metrics = killed
    try:
        sac.run(sac.Args(**config, devices=4, run_name="killed"))
    except KeyboardInterrupt:
        pass
    utils.RunDir.write_metrics = write
    sac.run(sac.Args(resume=root + "/killed", devices=1))
    print(json.dumps(out))
''')


def test_seeds_split_over_devices_match_one_device_and_resume_on_another_count(tmp_path):
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["shard_devices"] == 4 and out["shard_shapes"] == [[1, *out["full_shape"][1:]]] * 4
    d4, d1, resumed = (pd.read_csv(tmp_path / name / "metrics.csv").drop(columns="charts/steps_per_second")
                       for name in ("d4", "d1", "killed"))
    assert len(d4) == len(d1) == len(resumed) == 16  # 4 epochs x 4 seeds
    # 1 seed per device vs 4 vmapped, and the run resumed on 1 device: the same seeds. Through the
    # 2 random-action epochs (collect, buffers, evaluation) equal to physics rounding; once SAC
    # learns, batch-dependent rounding grows (README: many seeds; measured: an eval return 46.0 vs
    # 43.4 in the first learning epoch), so there the losses are compared, loosely.
    random, learning = slice(0, 8), slice(8, 12)
    pd.testing.assert_frame_equal(d4[random], d1[random], rtol=1e-4, atol=1e-4)
    pd.testing.assert_frame_equal(resumed[random], d4[random])  # written before the kill
    for name in ["losses/critic", "losses/actor", "charts/alpha"]:
        np.testing.assert_allclose(d1[name][learning], d4[name][learning], rtol=0.05)
        np.testing.assert_allclose(resumed[name][learning], d4[name][learning], rtol=0.05)
    assert resumed[8:].notna().all().all() and (resumed["env_steps"] == d4["env_steps"]).all()  # losses: NaN before learning
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["num_devices"] == 1 and summary["num_processes"] == 1  # what the resumed part ran on


# --- across processes (jax.distributed): 2 processes on 127.0.0.1, one CPU device each --------------
# The GPU check's smoke configs (benchmarks/gpu_check.py): its smoke test (below; a group of its own,
# queued after these and the algorithm groups, conftest.py) then reads the one-process runs'
# programs from the tests' shared persistent cache.
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import CASES  # noqa: E402

SAC_TINY, MBPO_TINY = CASES["sac"][3], CASES["mbpo"][3]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("algo, config, random_rows", [("sac", SAC_TINY, 4), ("mbpo", MBPO_TINY, 2)])
def test_two_processes_match_one_process(tmp_path, algo, config, random_rows):
    """The same file under jax.distributed (2 processes, 1 device each: the global mesh spans both,
    each process trains its seed, process 0 writes) gives the metrics of the 2-seed run in one
    process, to the rounding of batch-size-dependent kernels (as above)."""
    script = [sys.executable, str(ROOT / "algorithms" / f"{algo}.py"),
              *as_cli({**config, "num_seeds": 2, "run_dir": str(tmp_path), "progress": False})]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port = free_port()
    workers = [subprocess.Popen(script + ["--run-name", "two", "--coordinator", f"127.0.0.1:{port}",
                                          "--num-processes", "2", "--process-id", str(i)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
               for i in range(2)]
    single = subprocess.run(script + ["--run-name", "one"], env=env, capture_output=True, text=True, timeout=1200,
                            cwd=tmp_path)
    outputs = [w.communicate(timeout=1200) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    assert '"run_dir"' in outputs[0][0] and '"run_dir"' not in outputs[1][0]  # process 0 writes the summary for both
    two, one = (pd.read_csv(tmp_path / name / "metrics.csv").drop(columns="charts/steps_per_second")
                for name in ("two", "one"))
    assert len(two) == len(one) == 2 * config["total_timesteps"] // config["epoch_length"]
    assert sorted(two["seed"].unique()) == [0, 1]
    # Random-action epochs (collect, buffers, evaluation) equal to physics rounding; once SAC learns,
    # the losses, loosely (batch-dependent rounding grows as above).
    pd.testing.assert_frame_equal(two[:random_rows], one[:random_rows], rtol=1e-4, atol=1e-4)
    for name in ["losses/critic", "losses/actor", "charts/alpha"]:
        np.testing.assert_allclose(two[name][random_rows:], one[name][random_rows:], rtol=0.05)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_devices"] == 2
    assert (tmp_path / "two" / "checkpoint.eqx").exists()


def test_gpu_check_smoke_runs_every_algorithm(tmp_path):
    """`--smoke`: every algorithm's real run() with tiny configs, 2 vmapped seeds, in its own process;
    one row each with compile time, steady-state throughput and peak memory (host RSS on CPU). Here,
    after the one-process runs above, whose programs SAC's and MBPO's cases read from the shared
    persistent cache (`--cache`; conftest.py)."""
    out = tmp_path / "gpu_check.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--cache", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["algo"] for r in rows] == ["sac", "mbpo", "pets", "dam", "tdml"] and all(r["seeds"] == 2 for r in rows)
    for r in rows:
        # compile_s <= total_s: a pendulum run is mostly its compile (PETS': 11.2 s of 11.2 s, rounded)
        assert 0 < r["compile_s"] <= r["total_s"] and 0 < r["steady_chunk_s"] < r["total_s"], r
        assert r["steady_per_s"] > 0 and r["peak_memory_gib"] > 0.1 and r["memory_of"] == "host peak RSS", r
    assert out.read_text().count("| 2 |") == 5


def test_multi_process_flags_are_checked_before_anything_starts():
    """Each bad combination stops with one line before the process joins: a process that has
    joined waits for its peers (tdml.py without --run-name used to wait there, with no peer)."""
    port = free_port()
    for algo, flags, message in [
        ("sac", ["--num-processes", "2"], "needs --coordinator"),
        ("sac", ["--coordinator", "127.0.0.1:1234"], "needs --num-processes and --process-id"),
        ("tdml", ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1"], "needs --run-name"),
    ]:
        done = subprocess.run([sys.executable, str(ROOT / "algorithms" / f"{algo}.py"), *flags], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
