"""What every algorithm shares and a user meets first: the host loop of algorithms/utils.py
(resume, a non-finite value ends the run cleanly with the checkpoint kept), a quiet start,
episode rendering (PNG for IcyRoad / Intersection; Brax's HTML viewer in a headless browser) and
benchmarks/plot.py. Each algorithm's own --render and tracking are tested in its test file."""

import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import envs
from algorithms import utils

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoopArgs:  # the fields train_loop reads
    num_seeds: int = 2
    seed: int = 0
    progress: bool = False
    track: bool = False
    wandb_project: str | None = None


def _chunk(bad_chunk):
    """A fake compiled chunk: counts chunks in the state; its metric turns NaN for seed 1 at `bad_chunk`."""
    def chunk(state, i):
        value = jnp.where((i == bad_chunk) & (jnp.arange(2) == 1), jnp.nan, 1.0 * i)
        return state + 1, {"env_steps": jnp.full(2, 10 * (i + 1)), "eval/return": value}
    return chunk


def test_train_loop_resumes_and_a_nonfinite_value_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = utils.RunDir(tmp_path / "run")
    with pytest.raises(utils.NonFiniteError, match=r"eval/return at env steps 30 \(seeds \[1\]\).*"
                                                   r"last good checkpoint \(at env_steps 20\) kept"):
        utils.train_loop(run_dir, LoopArgs(), jnp.zeros(2), _chunk(bad_chunk=2), 5)
    assert json.loads((run_dir.path / "checkpoint.json").read_text()) == {"env_steps": 20, "chunks": 2}
    assert len(pd.read_csv(run_dir.path / "metrics.csv")) == 4  # 2 chunks x 2 seeds, nothing of the bad one
    # Resumed with a chunk that stays finite: continues from chunk 2 and ends at 5 chunks.
    # after_chunk (pets_curves redraws its curve there) sees each chunk's rows already on disk.
    rows_seen = {}
    state, metrics, steps = utils.train_loop(
        run_dir, LoopArgs(), jnp.zeros(2), _chunk(bad_chunk=-1), 5,
        after_chunk=lambda done: rows_seen.update({done: len(pd.read_csv(run_dir.path / "metrics.csv"))}))
    assert rows_seen == {3: 6, 4: 8, 5: 10}
    assert steps == 50 and state.tolist() == [5, 5] and metrics["eval/return"].tolist() == [4, 4]
    assert pd.read_csv(run_dir.path / "metrics.csv")["env_steps"].tolist() == [10, 10, 20, 20, 30, 30, 40, 40, 50, 50]


def test_a_nonfinite_value_ends_a_command_with_one_line_and_status_1():
    code = ("from algorithms import utils\nwith utils.reported_failures():\n"
            "    raise utils.NonFiniteError('non-finite losses/critic at env step 500 (seeds [1]); run runs/x, its last "
            "good checkpoint (at env_steps 250) kept')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: non-finite losses/critic at env step 500 (seeds [1]); run "
                                                "runs/x, its last good checkpoint (at env_steps 250) kept"]


def test_quiet_start():
    """Importing envs (Brax, MJX) prints nothing: no 'Failed to import warp', no maintenance warning."""
    done = subprocess.run([sys.executable, "-W", "default", "-c", "import envs; envs.make('hopper')"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)


# --- rendering ---------------------------------------------------------------------------------
def _random_policy(env):
    if env.name in envs.CONTINUOUS:
        return lambda obs, carry, key: (jax.random.uniform(key, (env.action_size,), minval=-1, maxval=1), carry)
    return lambda obs, carry, key: (jax.random.randint(key, (), 0, 3), carry)


@pytest.mark.parametrize("name", ["IcyRoad", "Intersection"])
def test_png_of_an_episode(tmp_path, name):
    env, _ = envs.make(name)
    file, total = envs.render_episode(env, _random_policy(env), None, jax.random.PRNGKey(0), tmp_path)
    assert file == tmp_path / "episode.png" and np.isfinite(total)
    image = matplotlib.image.imread(file)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05  # axes, paths and labels drawn


def test_rollout_counts_an_episode_that_terminates():
    """inverted_pendulum under random actions falls within the time limit: the rendered length is
    the steps up to the fall, and the return is one per step taken (its reward)."""
    env, params = envs.make("inverted_pendulum", backend="positional")
    states, observations, length, total = jax.jit(envs.rollout, static_argnums=(0, 1))(
        env, _random_policy(env), None, jax.random.PRNGKey(0))
    assert 0 < int(length) < params.max_steps_in_episode and float(total) == float(length)
    assert observations.shape == (params.max_steps_in_episode + 1, env.obs_size)



@functools.lru_cache(maxsize=None)
def _viewer_assets(cache: Path):
    """The viewer's JavaScript (three.js, lil-gui, pako, es-module-shims, the versions Brax's HTML
    asks for) from the npm registry into a cache directory, so the page needs no CDN."""
    wanted = ["three@0.150.1", "pako@2.1.0", "lil-gui@0.18.0", "es-module-shims@1.6.3"]
    if not (cache / "node_modules" / "three" / "build" / "three.module.js").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(cache), *wanted],
                       check=True, capture_output=True, timeout=600)
    return cache / "node_modules"


def test_brax_html_shows_the_scene_in_a_headless_browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH: install Debian's chromium (apt-get install chromium); .ci/run tries to")
    if shutil.which("npm") is None:
        pytest.skip("no npm: the viewer's JavaScript (three.js) is fetched from the npm registry")
    env, _ = envs.make("inverted_pendulum", backend="positional")
    file, _ = envs.render_episode(env, _random_policy(env), None, jax.random.PRNGKey(0), tmp_path)
    assert file.name == "episode.html"
    modules = _viewer_assets(Path.home() / ".cache" / "mbrl-jax" / "npm")
    # Serve the page with its CDN addresses pointed at local copies (this machine has no CDN).
    site = tmp_path / "site"
    site.mkdir()
    (site / "node_modules").symlink_to(modules)
    (site / "brax").symlink_to(Path(envs.brax_tasks.brax_envs.__file__).parent.parent / "visualizer" / "js")
    page = file.read_text()
    page = re.sub(r"https://unpkg\.com/([a-z-]+)@[0-9.]+/", r"/node_modules/\1/", page)
    page = page.replace("https://cdn.jsdelivr.net/npm/lil-gui@0.18.0/+esm", "/node_modules/lil-gui/dist/lil-gui.esm.js")
    page = re.sub(r"https://cdn\.jsdelivr\.net/gh/google/brax@v[0-9.]+/brax/visualizer/js/", "/brax/", page)
    assert "https://" not in page
    (site / "episode.html").write_text(page)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shot = tmp_path / "shot.png"
    try:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=800,600",
                        "--virtual-time-budget=15000", f"--screenshot={shot}",
                        f"http://127.0.0.1:{server.server_address[1]}/episode.html"],
                       check=True, capture_output=True, timeout=180)
    finally:
        server.shutdown()
    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).astype(int)
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[counts.argmax()]
    # The WebGL canvas fills the page with the scene's background (a blank page is white) ...
    assert counts.max() > 0.5 * pixels.size / 3 and not (background == 255).all(), background
    # ... and the pendulum is drawn on it (the controls box sits in the top-right corner).
    centre = pixels[150:450, 100:550]
    assert (np.abs(centre - background).sum(-1) > 30).sum() > 50


def test_a_run_directory_that_cannot_be_written_stops_with_one_line(tmp_path):
    """Before anything compiles: `--run-dir` under /proc, where no directory can be made, and under
    a regular file. Both used to end in an OSError traceback."""
    (tmp_path / "file").write_text("")
    for run_dir in ["/proc/mbrl-jax-run", str(tmp_path / "file" / "runs")]:
        done = subprocess.run([sys.executable, str(ROOT / "algorithms" / "sac.py"), "--env-id", "pendulum",
                               "--run-dir", run_dir, "--run-name", "x"], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: cannot write the run directory"), done.stderr


# --- benchmarks/plot.py ------------------------------------------------------------------------
def _fake_run(path, seeds, offset):
    path.mkdir(parents=True)
    rows = [{"seed": s, "env_steps": 1000 * (c + 1), "eval/return": offset + 10 * c + s} for c in range(4) for s in seeds]
    pd.DataFrame(rows).to_csv(path / "metrics.csv", index=False)
    return path


def test_plot_script_compares_runs(tmp_path):
    runs = [_fake_run(tmp_path / "a", [0, 1, 2], 0), _fake_run(tmp_path / "b", [0], 100)]
    out = tmp_path / "cmp.png"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), *map(str, runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert matplotlib.image.imread(out)[..., :3].std() > 0.05
    pooled = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), *map(str, runs), "--label", "x", "x",
                             "--out", str(tmp_path / "pooled.png")], capture_output=True, text=True, timeout=120)
    assert pooled.returncode == 0 and (tmp_path / "pooled.png").exists(), pooled.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and missing.stderr.strip().startswith("error:") and "Traceback" not in missing.stderr


# --- benchmarks/gpu_check.py -------------------------------------------------------------------
def test_gpu_check_paper_sized_configs_are_valid_arguments():
    """The configs only a GPU runs pass each file's own argument checks (at 8 seeds)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from algorithms import dam, mbpo, pets, sac, tdml

    import gpu_check

    for name, module in dict(sac=sac, mbpo=mbpo, pets=pets, dam=dam, tdml=tdml).items():
        args = module.resolve(module.Args(**gpu_check.CASES[name][2], num_seeds=8))
        assert args.num_seeds == 8


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_map_in_batches_is_a_per_seed_map_and_takes_zero_size_leaves(batch_size):
    """mbpo's seed batches: the result of mapping each seed alone, with a remainder (5 = 2 x 2 + 1)
    and a zero-size leaf as MJX's states have (jax.lax.map(batch_size=...) divides by zero there)."""
    tree = dict(x=jnp.arange(10.0).reshape(5, 2), empty=jnp.zeros((5, 0, 3)))
    fn = lambda s: dict(y=s["x"] * s["x"].sum(), empty=s["empty"] + 1.0)  # noqa: E731
    out = jax.jit(lambda t: utils.map_in_batches(fn, t, batch_size))(tree)
    for i in range(5):
        np.testing.assert_array_equal(out["y"][i], fn(jax.tree.map(lambda x: x[i], tree))["y"])
    assert out["empty"].shape == (5, 0, 3)


@pytest.mark.parametrize("algo", ["sac", "mbpo", "pets", "dam", "tdml"])
def test_a_fresh_state_has_a_restored_ones_types_so_resuming_reuses_the_compile(algo):
    """A checkpoint restores arrays with strong dtypes (utils.RunDir.load_checkpoint). A weakly
    typed leaf in a fresh state (`jnp.full(shape, 0.5)` without a dtype) makes the restored state
    another input type, so a resumed run compiles its whole chunk again (measured on mbpo's killed
    and resumed test run: 33 s). Traced only (jax.eval_shape): the GPU check's smoke configs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import importlib

    import gpu_check

    module = importlib.import_module(f"algorithms.{algo}")
    args = module.resolve(module.Args(**gpu_check.CASES[algo][3]))
    fresh = jax.eval_shape(jax.vmap(module.make_train(args).init), module.seed_keys(args))
    weak = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(fresh)
            if getattr(leaf, "weak_type", False)]
    assert not weak, weak


def test_the_code_passes_the_linter():
    """pyproject.toml's ruff rules (pyflakes, pycodestyle, import order) on every source file."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "algorithms", "envs", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


# --- the test setup itself (conftest.py) -------------------------------------------------------------
def test_programs_compiled_without_backend_optimisation_give_the_same_bits():
    """conftest.py compiles the eager programs named in EXACT_AT_LEVEL_0 with XLA's backend
    optimisation off, to save compile time: each must give the bits of the default compile (large
    shapes, where XLA:CPU vectorises). `jax.random.normal` would fail here (its erf_inv)."""
    import conftest

    key, shape = jax.random.PRNGKey(3), (32, 250, 8)
    x = jax.random.uniform(jax.random.PRNGKey(4), (5000, 11))
    checks = {
        "jit__uniform": lambda k: jax.random.uniform(k, shape, minval=-2.0, maxval=2.0),
        "jit__threefry_split": lambda k: jax.random.split(k, 5000),
        "jit__threefry_seed": lambda k: jax.random.PRNGKey(k[0] + 5),
        "jit__threefry_fold_in": lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, jnp.arange(5000)),
        "jit__randint": lambda k: jax.random.randint(k, shape, -7, 1000),
        "jit__bernoulli": lambda k: jax.random.bernoulli(k, 0.3, shape),
        "jit__random_bits": lambda k: jax.random.bits(k, shape),
        "jit_dynamic_slice": lambda k: jax.lax.dynamic_slice_in_dim(x, k[0] % 100, 4000),
        "jit_broadcast_in_dim": lambda k: jnp.broadcast_to(x[None] * 1.5, (4, 5000, 11)),
        "jit_unstack": lambda k: jnp.stack(jnp.unstack(x[:64] * 0.5))[::-1],
        "jit_gather": lambda k: x[jax.random.randint(k, (4096,), 0, 5000)],
        "jit_concatenate": lambda k: jnp.concatenate([x * 0.1, x[::-1]], -1),
    }
    assert conftest.EXACT_AT_LEVEL_0 <= set(checks), conftest.EXACT_AT_LEVEL_0 - set(checks)
    for name in conftest.EXACT_AT_LEVEL_0:
        default = np.asarray(jax.jit(checks[name])(key))
        level_0 = np.asarray(jax.jit(checks[name], compiler_options={"xla_backend_optimization_level": 0})(key))
        np.testing.assert_array_equal(default, level_0, err_msg=name)
