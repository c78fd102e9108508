"""Where a test run's time and CPU go, by group: from the log that `MBRL_TEST_COMPILE_LOG=<dir>`
makes the tests write (tests/conftest.py): <worker>-tests.jsonl (each test's wall, CPU, its
subprocesses' CPU, JAX's tracing and lowering seconds) and <worker>.jsonl (each compile).

    MBRL_TEST_COMPILE_LOG=/tmp/clog python -m pytest -q -p no:cacheprovider tests   # a cold run
    python benchmarks/suite_cpu.py /tmp/clog [N]       # per group, per part, then the N longest tests

Groups are conftest.group_of's (what one worker runs in a row)."""

import collections
import glob
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import group_of  # noqa: E402

ALGORITHMS = {"test_dam", "test_mbpo", "test_pets", "test_sac", "test_tdml"}
KEYS = ["wall", "cpu", "children_cpu", "trace", "lower", "compile"]


def part_of(group):
    if group in ALGORITHMS:
        return "algorithm groups"
    if group == "test_devices":
        return "test_devices"
    if "/" in group or group in ("test_brax_tasks", "test_mujoco_tasks"):
        return "MuJoCo groups"
    return "the rest"


def main():
    log, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    compiled = collections.Counter()
    for file in [f for f in glob.glob(f"{log}/*.jsonl") if not f.endswith("-tests.jsonl")]:
        for line in open(file):
            row = json.loads(line)
            if row["seconds"] and row["seconds"] > 0:  # null: in-memory hit; -1: read of the subprocesses' cache
                compiled[row["test"]] += row["seconds"]
    rows = []
    for file in sorted(glob.glob(f"{log}/*-tests.jsonl")):
        for line in open(file):
            row = json.loads(line)
            rows.append({**row, "worker": Path(file).name.split("-")[0], "compile": compiled[row["test"]]})
    total = collections.Counter()
    for row in rows:
        total.update({k: row.get(k, 0.0) for k in KEYS})
    print(f"tests' wall added {total['wall']:.0f} s; CPU {total['cpu']:.0f} s, subprocesses' "
          f"{total['children_cpu']:.0f} s; tracing {total['trace']:.0f} s, lowering "
          f"{total['lower']:.0f} s; workers' compiles {total['compile']:.0f} s")
    for name, key in (("group", group_of), ("part", lambda t: part_of(group_of(t)))):
        sums = collections.defaultdict(collections.Counter)
        for row in rows:
            sums[key(row["test"])].update({k: row.get(k, 0.0) for k in KEYS})
        print(f"\n| {name} | " + " | ".join(KEYS) + " |\n" + "|---" * (len(KEYS) + 1) + "|")
        for label, s in sorted(sums.items(), key=lambda x: -x[1]["wall"]):
            print(f"| {label} | " + " | ".join(f"{s[k]:.0f}" for k in KEYS) + " |")
    print()
    for row in sorted(rows, key=lambda r: -r["wall"])[:top]:
        print(f"{row['wall']:6.1f} s  cpu {row['cpu']:6.1f}  sub {row['children_cpu']:6.1f}  trace {row.get('trace', 0):5.1f}  "
              f"compile {row['compile']:5.1f}  {row['worker']}  {row['test']}")


if __name__ == "__main__":
    main()
