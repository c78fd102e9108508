"""Same seed, same result across two checkouts: sha1 of each config's metrics.csv (without the
steps-per-second column) and of its saved .eqx files, to compare a refactor with the code before it.

    PYTHONPATH=<old checkout> python benchmarks/bit_identity.py tdml /tmp/old    # writes /tmp/old/hashes.json
    PYTHONPATH=<new checkout> python benchmarks/bit_identity.py tdml /tmp/new
    diff /tmp/old/hashes.json /tmp/new/hashes.json && echo identical

Configs: the GPU check's smoke config of the algorithm (2 seeds) and variants that reach other
branches. Run from the checkout under test (PYTHONPATH decides which `algorithms` is imported)."""

import hashlib
import importlib
import json
import sys
from pathlib import Path

import pandas as pd

VARIANTS = {
    "sac": [dict(), dict(env_id="inverted_pendulum", backend="positional", num_seeds=1, seed=3)],
    "mbpo": [dict(), dict(seed=2, num_seeds=1, rollout_schedule=(0, 2, 1, 4))],
    "pets": [dict(), dict(propagation="expectation", optimizer="random", num_seeds=1, seed=2)],
    "tdml": [dict(), dict(loss="one-step"), dict(critic_target="algorithm1", update_delay=2, num_seeds=1, seed=3)],
    "dam": [dict(), dict(method="minvar", model="mdn"), dict(env_id="Intersection", rounds=2, num_seeds=1, seed=2)],
}


def main():
    algo, out = sys.argv[1], Path(sys.argv[2])
    module = importlib.import_module(f"algorithms.{algo}")
    sys.path.insert(0, str(Path(module.__file__).resolve().parents[1] / "benchmarks"))
    from gpu_check import CASES

    base = {**CASES[algo][3], "progress": False, "num_seeds": 2}
    hashes = {}
    for i, variant in enumerate(VARIANTS[algo]):
        run_dir, _ = module.run(module.Args(**{**base, **variant, "run_dir": str(out), "run_name": f"c{i}"}))
        path = Path(run_dir.path)
        df = pd.read_csv(path / "metrics.csv")
        df = df.drop(columns=[c for c in df.columns if "per_second" in c])
        hashes[f"c{i}/metrics"] = hashlib.sha1(df.to_csv(index=False).encode()).hexdigest()
        for f in sorted(path.glob("*.eqx")):
            hashes[f"c{i}/{f.name}"] = hashlib.sha1(f.read_bytes()).hexdigest()
    (out / "hashes.json").write_text(json.dumps(hashes, indent=1))
    print(json.dumps(hashes, indent=1))


if __name__ == "__main__":
    main()
