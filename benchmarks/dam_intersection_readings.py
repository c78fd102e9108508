"""Intersection under each reading of Appendix C's open choices (envs/intersection.py), as
benchmarks/dam_icy_readings.py does for IcyRoad. The text fixes the reward r(s, a) = vy_agent - 10
delta[collision] (Eq. 21), the start speeds (5 and -5), the 25-step episode and the 1/2 chance of
each turn; it leaves open what a collision does to the episode and the cars, on which state Eq. 21
is read, the speed limit, dt and the geometry. Readings, each one change from our earlier default
or from the text's literal one (the default since this benchmark):
* `crash_ends` (the earlier default): a crash ends the episode (-10 once), Eq. 21 on s', vy in [0, 10];
* `every_step_frozen` / `every_step_drive_on`: Eq. 21 on every step, -10 on each step in
  collision; the crashed cars stand still, or drive on through each other;
* `crash_ends_on_s`: Eq. 21 read on s (the pre-action vy), as "r(s, a)" is written;
* `max_speed_5`: the agent cannot go faster than its start speed (the text gives no limit);
* `literal_frozen` (the default) / `literal_drive_on`: every step and on s together.
Per reading:
* exact expected returns (benchmarks/intersection_dp.py's dynamic programme over the env with
  this reading's parameters): the optimum (acting on the turn once it is visible), the best open-
  loop sequence, the uniform-random policy, and three fixed sequences: doing nothing (keep speed
  5), braking to a stop, and always accelerating;
* dam.py's planner with the true dynamics (`--model true`) and the baseline with each learned
  model (Gaussian, mixture), J = 10 rounds, dam.py's defaults otherwise (benchmarks/dam_table.py's
  cells, same keys), `--seeds` seeds, each seed's final model on `--eval-episodes` episodes.
The paper's Table 1 puts Intersection's cells at 29.6-97.7 (baselines: Gaussian 62.67, mixture 29.58).

    python benchmarks/dam_intersection_readings.py --exact-only      # the exact columns, ~2 min a reading
    python benchmarks/dam_intersection_readings.py [--seeds 10] [--readings crash_ends literal_frozen ...] [--models true gaussian]

Resumable: finished cells are appended to results/dam_intersection_readings.csv (the exact values
to dam_intersection_readings_exact.csv) and skipped on the next start; the .md is rebuilt after each.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import pandas as pd
from dam_table import by_model, readings_parser, run_cells, run_reading
from intersection_dp import exact_values

from algorithms import utils
from envs.intersection import Intersection

RESULTS = Path(__file__).parent / "results"
EARLIER = dict(crash_ends_episode=True, crash_stops_cars=True, reward_on_next_state=True)
LITERAL = dict(crash_ends_episode=False, crash_stops_cars=True, reward_on_next_state=False)  # the default
READINGS = {
    "crash_ends": EARLIER,
    "every_step_frozen": {**EARLIER, "crash_ends_episode": False},
    "every_step_drive_on": {**EARLIER, "crash_ends_episode": False, "crash_stops_cars": False},
    "crash_ends_on_s": {**EARLIER, "reward_on_next_state": False},
    "max_speed_5": {**EARLIER, "max_speed": 5.0},
    "literal_frozen": LITERAL,
    "literal_drive_on": {**LITERAL, "crash_stops_cars": False},
}
ACCEL, DECEL, CRUISE = 0, 1, 2
PAPER = {"gaussian": "62.67 ± 22.10", "mdn": "29.58 ± 0.105"}


def params_of(reading):
    return Intersection().default_params.replace(**READINGS[reading])


def fixed_returns(params):
    """Expected returns of fixed action sequences: the mean of the two turns (the only randomness)."""
    env, T = Intersection(), params.max_steps_in_episode

    def episode(action, turn_left):
        _, state = env.reset(jax.random.PRNGKey(0), params)
        state = state.replace(turn_left=turn_left)

        def step(state, _):
            _, state, reward, _, _ = env.step_env(jax.random.PRNGKey(0), state, action, params)
            return state, reward

        return jax.lax.scan(step, state, None, length=T)[1].sum()

    both = jnp.array([True, False])
    return {name: float(jax.vmap(episode, (None, 0))(action, both).mean())
            for name, action in [("do nothing (keep speed 5)", CRUISE), ("brake to a stop", DECEL),
                                 ("always accelerate", ACCEL)]}


def exact_row(reading):
    params = params_of(reading)
    return pd.DataFrame([{"reading": reading, **exact_values(params), **fixed_returns(params)}])


def table(exact, cells):
    columns = ["closed loop (acting on the turn once visible): the optimum", "open loop (one action sequence, turn unknown)",
               "uniform-random policy", "do nothing (keep speed 5)", "brake to a stop", "always accelerate"]
    lines = ["| reading | optimum (exact) | best open loop | random policy | do nothing | brake to a stop | always accelerate "
             "| true-model planner | Gaussian baseline | mixture baseline | seeds |", "|---|" * 1 + "---|" * 10]
    for reading in READINGS:
        row = exact[exact.reading == reading]
        if row.empty:
            continue
        mine = cells[cells.reading == reading] if len(cells) else cells
        shown = by_model(mine)
        seeds = mine.groupby("model").size().max() if len(mine) else 0
        values = " | ".join(f"{row[c].iloc[0]:.2f}" for c in columns)
        lines.append(f"| {reading} | {values} | {shown['true']} | {shown['gaussian']} | {shown['mdn']} | {seeds} |")
    lines.append(f"\nPaper, Table 1 (3 seeds): Gaussian baseline {PAPER['gaussian']}, mixture baseline {PAPER['mdn']}; "
                 "every cell 29.6-97.7. Ours: mean ± s.e. over seeds of each seed's final-model evaluation.")
    if len(cells):
        lines[-1] += (f" Wall-clock of the learned cells: {cells.groupby(['reading', 'model'])['seconds_cell'].first().sum():.0f} s "
                      f"on {jax.devices()[0].platform}.")
    return "\n".join(lines)


def main():
    parser = readings_parser(__doc__, READINGS)
    parser.add_argument("--exact-only", action="store_true", help="only the exact columns (no learning runs)")
    cli = parser.parse_args()
    utils.enable_compilation_cache()
    markdown = RESULTS / "dam_intersection_readings.md"
    csv, exact_csv = RESULTS / "dam_intersection_readings.csv", RESULTS / "dam_intersection_readings_exact.csv"
    cells = pd.read_csv(csv, dtype={"reading": str, "model": str}) if csv.exists() else pd.DataFrame()
    done = pd.read_csv(exact_csv) if exact_csv.exists() else pd.DataFrame(columns=["reading"])
    for reading in cli.readings:
        if reading not in set(done.reading):
            done = pd.concat([done, exact_row(reading)], ignore_index=True) if len(done) else exact_row(reading)
            done.to_csv(exact_csv, index=False)
            markdown.write_text(table(done, cells) + "\n")
            print(f"{reading}: exact", flush=True)
    if not cli.exact_only:
        cells = run_cells(csv, markdown, [dict(reading=r, model=m) for r in cli.readings for m in cli.models],
                          lambda reading, model: run_reading("Intersection", READINGS[reading], model, cli.seeds, cli.eval_episodes),
                          lambda df: table(done, df), ["reading", "model"])
    markdown.write_text(table(done, cells) + "\n")
    print(table(done, cells))


if __name__ == "__main__":
    main()
