"""IcyRoad under each reading of Appendix C's open choices (envs/icy_road.py): the Euler step
(semi-implicit, ours, or explicit "simple Euler") x where Eq. 20 is evaluated (on s', ours, or on s
as "r(s, a)" is written). Per reading:
* the exact optimum, the uniform-random policy's and doing nothing's (cruise at the start speed)
  expected returns, by dynamic programming over the text's dynamics, written here from Appendix C
  and not from envs/icy_road.py (the env's own returns are checked against closed forms per
  reading in tests/test_dam_envs.py; their best sequences reach this optimum on three readings:
  10, 19 and 9);
* dam.py's planner with the true dynamics (`--model true`), and the baseline with each learned model
  (Gaussian, mixture), J = 10 rounds: dam.py's defaults, `--seeds` seeds, each seed's final model on
  `--eval-episodes` planner episodes (benchmarks/dam_table.py's cells, same keys).
The paper's Table 1 puts the baselines at 0.71 (Gaussian) and 5.34 (mixture), far below the optimum;
a reading on which every method sits at the optimum cannot rank them.

    python benchmarks/dam_icy_readings.py [--seeds 10] [--readings semi/next explicit/next ...]

Resumable: each finished cell is appended to benchmarks/results/dam_icy_readings.csv and skipped on
the next start; dam_icy_readings.md is rebuilt after every cell.
"""

import functools
from pathlib import Path

import jax
import numpy as np
from dam_table import by_model, readings_parser, run_cells, run_reading

from algorithms import utils

RESULTS = Path(__file__).parent / "results"
READINGS = {"semi/next": (True, True), "explicit/next": (False, True), "semi/s": (True, False),
            "explicit/s": (False, False)}
PAPER = {"gaussian": "0.71 ± 1.72", "mdn": "5.34 ± 0.84"}


def exact_values(semi_implicit, on_next, swerve_prob=0.8, steps=5):
    """(optimum, uniform-random policy, always cruise) expected returns from (x, y, xdot, ydot) = (0, 0, 1, 0), by
    recursion over Appendix C: xdot += 1 / -1 / 0 clipped to [0, 5]; above xdot 2 a car that has not
    swerved swerves with `swerve_prob`, to ydot = +-2 with equal chance; positions by Euler (dt 1);
    reward Eq. 20 (xdot - 6 off the road |y| > 1, xdot + 8 on it above xdot 2, else xdot)."""

    def reward(y, xdot):
        return xdot - 6.0 if abs(y) > 1 else (xdot + 8.0 if xdot > 2 else xdot)

    @functools.cache
    def value(y, xdot, ydot, t, policy):
        if t == steps:
            return 0.0
        totals = []
        for delta in ((0,) if policy == "cruise" else (1, -1, 0)):
            new_xdot = min(max(xdot + delta, 0), 5)
            swerves = new_xdot > 2 and ydot == 0
            outcomes = ([(swerve_prob / 2, -2), (swerve_prob / 2, 2), (1 - swerve_prob, 0)] if swerves
                        else [(1.0, ydot)])
            total = 0.0
            for prob, new_ydot in outcomes:
                new_y = y + (new_ydot if semi_implicit else ydot)
                r = reward(new_y, new_xdot) if on_next else reward(y, xdot)
                total += prob * (r + value(new_y, new_xdot, new_ydot, t + 1, policy))
            totals.append(total)
        return max(totals) if policy == "optimal" else float(np.mean(totals))

    return tuple(value(0, 1, 0, 0, policy) for policy in ("optimal", "random", "cruise"))


def table(df):
    lines = ["| reading (Euler / Eq. 20 on) | optimum (exact) | random policy (exact) | do nothing | true-model planner "
             "| Gaussian baseline | mixture baseline | seeds |", "|---|---|---|---|---|---|---|---|"]
    for reading in READINGS:
        cells = df[df.reading == reading]
        if cells.empty:
            continue
        optimum, random, cruise = exact_values(*READINGS[reading])
        shown = by_model(cells)
        lines.append(f"| {reading} | {optimum:.2f} | {random:.2f} | {cruise:.2f} | {shown['true']} | {shown['gaussian']} | "
                     f"{shown['mdn']} | {cells.groupby('model').size().max()} |")
    lines.append(f"\nPaper, Table 1 (3 seeds): Gaussian baseline {PAPER['gaussian']}, mixture baseline {PAPER['mdn']}. "
                 f"Ours: mean ± s.e. over seeds of each seed's final-model evaluation. Wall-clock of these cells: "
                 f"{df.groupby(['reading', 'model'])['seconds_cell'].first().sum():.0f} s on {jax.devices()[0].platform}.")
    return "\n".join(lines)


def main():
    cli = readings_parser(__doc__, READINGS).parse_args()
    utils.enable_compilation_cache()
    csv, markdown = RESULTS / "dam_icy_readings.csv", RESULTS / "dam_icy_readings.md"
    done = run_cells(csv, markdown, [dict(reading=r, model=m) for r in cli.readings for m in cli.models],
                     lambda reading, model: run_reading("IcyRoad", dict(zip(("semi_implicit_euler", "reward_on_next_state"), READINGS[reading])),
                                                         model, cli.seeds, cli.eval_episodes), table,
                     ["reading", "model"])
    markdown.write_text(table(done) + "\n")  # also when every cell was done before
    print(table(done))


if __name__ == "__main__":
    main()
