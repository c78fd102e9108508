"""TDML against an exact oracle: a misspecified (linear) model of a damped pendulum.

    python benchmarks/tdml_oracle.py                    # all lines, 3 seeds -> results/tdml/oracle.{csv,md,png}
    python benchmarks/tdml_oracle.py --model-steps 300 --seeds 1   # a short look

The system (ours, as the TDML issue proposes): a damped pendulum, theta'' = -sin(theta) - 0.1
theta' + u, semi-implicit Euler with dt = 0.3, under the fixed linear policy u = K s; states start
uniform in [-2, 2] x [-1, 1]. The model class is linear, s' = W [s, a] + b (tdml.py's model with no
hidden layer), so no model is exact and the one-step optimum (least squares, Eq. 1's minimiser)
need not be the model with the lowest true TDML (Eq. 3). Everything below is measured by the exact
true TDML: the real pendulum and the model rolled 100 steps in closed loop from 512 held-out
states (of other trajectories than the buffer's), gamma 0.9 (0.9^100 < 3e-5).

Lines, each starting from the least-squares model unless it says "scratch":
* `identity` (s_n = s_0: "nothing changes"), `least squares`: references.
* `best in class`: Adam on the exact true TDML of the buffer's states (its gradient through all
  100 model steps): the oracle of what a TDML objective can reach in this class.
* `exact critic, Eq. 9`: Adam on Eq. 9 with the critic replaced by the exact TDML of the current
  model (D(s, s_hat) = sum_n gamma^n ||f_bar^n(s) - f_bar_theta^n(s_hat)||^2, theta held fixed
  inside D): Algorithm 1's model update with a perfect critic. Its gradient reaches theta only
  through s_hat_2 (a semi-gradient), which is what separates it from `best in class`.
* `Algorithm 1` (tdml.py's own chunk: a learned critic, kappa, d, targets) and `one-step`
  (tdml.py, Eq. 1), from the least-squares model and from scratch, several seeds.

Along every Algorithm 1 run, the learned critic against the exact tail it stands for
(results/tdml/oracle_critic.{csv,md}): D_psi(s, s) on the held-out starts against the exact true
TDML of the current model theta and of the target model theta' (what its TD targets are built
from), and D_psi(s_2, s_hat_2) on the buffer's states, where Eq. 9 reads it, against the exact
sum_n gamma^n ||f^n(s_2) - f_theta^n(s_hat_2)||^2: ratio of means and correlation.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from algorithms import tdml  # noqa: E402

OUT = Path(__file__).parent / "results" / "tdml"
DT, DAMPING = 0.3, 0.1
GAIN = jnp.array([[-0.5, -0.5]], jnp.float32)  # the fixed policy u = K s
EVAL_STARTS, HORIZON, GAMMA = 512, 100, 0.9


def pendulum_step(s, a):
    omega = s[1] + DT * (-jnp.sin(s[0]) - DAMPING * s[1] + a[0])
    return jnp.stack([s[0] + DT * omega, omega])


PENDULUM = tdml.System(
    obs_size=2, action_size=1,
    reset=lambda key: jax.random.uniform(key, (2,), minval=-1.0, maxval=1.0) * jnp.array([2.0, 1.0]),
    step=pendulum_step, observe=lambda s: s, snapshot=lambda s: s, restore=lambda v: v,
    policy=lambda gain, s: gain @ s)


def config(**overrides):
    """tdml.py's arguments for this system: a linear model (no hidden layer, no L2), the issue's
    first try (256 trajectories x 30 steps, kappa 10, d 10, critic 64 x 64 at lr 1e-3)."""
    base = dict(env_id="pendulum", random_policy=True, model_layers=(), model_l2=0.0, weight_norm=False,
                model_batch_size=256, num_trajectories=256, trajectory_length=30, kappa=10, update_delay=10,
                critic_layers=(64, 64), critic_lr=1e-3, critic_batch_size=256, gamma=GAMMA, eval_starts=16,
                eval_horizon=HORIZON, grad_horizon=HORIZON, n_step_batch=32, progress=False)
    return tdml.resolve(tdml.Args(**{**base, **overrides}))


# --- the exact quantities ------------------------------------------------------------------------
def closed_loop_linear(theta, s, steps):
    """Model states s_hat_0..steps from s under the policy: s_hat' = W [s_hat, K s_hat] + b."""
    w, b = theta

    def step(x, _):
        x = x @ w[:, :2].T + (x @ GAIN.T) @ w[:, 2:].T + b
        return x, x

    return jnp.concatenate([s[None], jax.lax.scan(step, s, None, length=steps)[1]])


def real_rollouts(s, steps):
    def step(x, _):
        x = jax.vmap(pendulum_step)(x, x @ GAIN.T)
        return x, x

    return jnp.concatenate([s[None], jax.lax.scan(step, s, None, length=steps)[1]])


def tdml_from(theta, real):
    """Eq. 3 per start state: sum_n gamma^n ||s_n - s_hat_n||^2, the real rollouts given."""
    predicted = closed_loop_linear(theta, real[0], real.shape[0] - 1)
    discount = GAMMA ** jnp.arange(real.shape[0])[:, None]
    return jnp.sum(discount * jnp.sum((real - predicted) ** 2, -1), 0)


def least_squares(data):
    s, a = data.obs[:-1].reshape(-1, 2), data.action.reshape(-1, 1)
    x = np.hstack([np.asarray(s), np.asarray(a), np.ones((len(s), 1))]).astype(np.float64)
    y = np.asarray(data.obs[1:].reshape(-1, 2), np.float64)
    coef = np.linalg.lstsq(x, y, rcond=None)[0].T.astype(np.float32)
    return jnp.asarray(coef[:, :3]), jnp.asarray(coef[:, 3])


def descend(theta, loss, steps, lr, evaluate, every):
    """Adam on `loss(theta)`; the exact true TDML every `every` steps: [(step, tdml)]."""
    opt = optax.adam(lr)

    @jax.jit
    def run(theta, state):
        def one(carry, _):
            theta, state = carry
            grads = jax.grad(loss)(theta)
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(theta, updates), state), None

        return jax.lax.scan(one, (theta, state), None, length=every)[0]

    state, curve = opt.init(theta), [(0, evaluate(theta))]
    for i in range(steps // every):
        theta, state = run(theta, state)
        curve.append(((i + 1) * every, evaluate(theta)))
    return theta, curve


def model_of(runner_model, theta):
    return eqx.tree_at(lambda m: (m.net.layers[0].weight, m.net.layers[0].bias), runner_model, theta)


def theta_of(model):
    return model.net.layers[0].weight, model.net.layers[0].bias


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-steps", type=int, default=1000, help="model updates of every line")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the tdml.py lines")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's rate of the exact lines (tdml.py's model_lr)")
    cli = parser.parse_args()
    start = time.time()
    args = config(total_steps=cli.model_steps * 10, eval_every=500)
    data = jax.jit(tdml.make_train(args, PENDULUM).make_data)(GAIN, jax.random.PRNGKey(args.data_seed))
    other = tdml.make_train(dataclasses.replace(args, num_trajectories=EVAL_STARTS), PENDULUM)
    held_out = jax.jit(other.make_data)(GAIN, jax.random.PRNGKey(12345))  # other trajectories than the buffer's
    starts = held_out.obs[jax.random.randint(jax.random.PRNGKey(1), (EVAL_STARTS,), 0, args.trajectory_length),
                          jnp.arange(EVAL_STARTS)]
    real = real_rollouts(starts, HORIZON)
    evaluate = jax.jit(lambda theta: jnp.mean(tdml_from(theta, real)))
    rows = []

    def add(line, curve, seed=0, every=1):
        rows.extend(dict(line=line, seed=seed, model_steps=step * every, true_tdml=float(v)) for step, v in curve)

    ls = least_squares(data)
    identity = (jnp.hstack([jnp.eye(2), jnp.zeros((2, 1))]), jnp.zeros(2))
    add("identity", [(0, evaluate(identity)), (cli.model_steps, evaluate(identity))])
    add("least squares", [(0, evaluate(ls)), (cli.model_steps, evaluate(ls))])

    # The buffer's states and their real successors: the training distribution of every line.
    s0, s1, s2 = (data.obs[i:args.trajectory_length - 1 + i].reshape(-1, 2) for i in range(3))
    buffer_real = real_rollouts(s0, HORIZON)
    best_loss = lambda theta: jnp.mean(tdml_from(theta, buffer_real))  # exact TDML of the buffer's states
    best, curve = descend(ls, best_loss, cli.model_steps, cli.lr, evaluate, 50)
    add("best in class", curve)

    real_from_s2 = real_rollouts(s2, HORIZON - 2)

    def eq9_exact_critic(theta):
        """Eq. 9 with D = the exact TDML of the current model, held fixed inside D: the gradient
        reaches theta through s_hat_1 and s_hat_2 only. (Without the stop_gradient this is the
        exact TDML / gamma: the `best in class` objective.)"""
        hat = closed_loop_linear(theta, s0, 2)
        predicted = closed_loop_linear(jax.lax.stop_gradient(theta), hat[2], HORIZON - 2)
        discount = GAMMA ** jnp.arange(HORIZON - 1)[:, None]
        tail = jnp.sum(discount * jnp.sum((real_from_s2 - predicted) ** 2, -1), 0)
        return jnp.mean(jnp.sum((s1 - hat[1]) ** 2, -1) + GAMMA * tail)

    @jax.jit
    def critic_check(runner):
        """The learned critic against the exact quantities it stands for (see the docstring)."""
        theta, target = theta_of(runner.model), theta_of(runner.target_model)
        at_start = jax.vmap(runner.critic)(starts, starts)
        hat2 = closed_loop_linear(theta, s0, 2)[2]
        predicted = closed_loop_linear(theta, hat2, HORIZON - 2)
        discount = GAMMA ** jnp.arange(HORIZON - 1)[:, None]
        tail = jnp.sum(discount * jnp.sum((real_from_s2 - predicted) ** 2, -1), 0)
        return at_start, tdml_from(theta, real), tdml_from(target, real), jax.vmap(runner.critic)(s2, hat2), tail

    def critic_row(runner):
        at_start, exact, exact_target, at_eq9, tail = (np.asarray(x, np.float64) for x in critic_check(runner))
        return dict(critic_at_start=at_start.mean(), exact_tdml=exact.mean(), exact_tdml_target=exact_target.mean(),
                    corr_at_start=np.corrcoef(at_start, exact)[0, 1], critic_eq9=at_eq9.mean(), exact_eq9=tail.mean(),
                    corr_eq9=np.corrcoef(at_eq9, tail)[0, 1])

    critic_rows = []
    _, curve = descend(ls, eq9_exact_critic, cli.model_steps, cli.lr, evaluate, 50)
    add("exact critic, Eq. 9", curve)
    summary = {"least_squares": float(evaluate(ls)), "identity": float(evaluate(identity)),
               "best_in_class": float(evaluate(best))}
    print(json.dumps(summary), flush=True)

    # tdml.py itself: Algorithm 1 and the one-step loss, from least squares and from scratch.
    for loss in ("tdml", "one-step"):
        run_args = config(loss=loss, total_steps=cli.model_steps * (args.update_delay if loss == "tdml" else 1),
                          eval_every=500 if loss == "tdml" else 50)
        trainer = tdml.make_train(run_args, PENDULUM)
        chunk = jax.jit(trainer.chunk)
        per_chunk = run_args.eval_every // (run_args.update_delay if loss == "tdml" else 1)
        for init in ("least squares", "scratch"):
            for seed in range(cli.seeds):
                runner = trainer.init(jax.random.PRNGKey(seed))
                if init == "least squares":
                    model = model_of(runner.model, ls)
                    runner = runner._replace(model=model, target_model=model if loss == "tdml" else None)
                curve = [(0, evaluate(theta_of(runner.model)))]
                for c in range(trainer.num_chunks):
                    batch = trainer.eval_batch(data, GAIN, c)
                    runner, _ = chunk(runner, data, GAIN, batch, jnp.int32(c * run_args.eval_every))
                    curve.append(((c + 1) * per_chunk, evaluate(theta_of(runner.model))))
                    if loss == "tdml":
                        critic_rows.append(dict(init=init, seed=seed, model_steps=(c + 1) * per_chunk,
                                                **critic_row(runner)))
                name = "Algorithm 1" if loss == "tdml" else "one-step"
                add(f"{name}, from {init}", curve, seed)
                print(f"{name} from {init}, seed {seed}: {float(curve[-1][1]):.3f}", flush=True)

    df = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    critic = pd.DataFrame(critic_rows)
    critic.to_csv(OUT / "oracle_critic.csv", index=False)
    shown = critic[critic.model_steps.isin([50, 100, 200, 500, cli.model_steps])]
    table = shown.groupby(["init", "model_steps"]).mean(numeric_only=True).reset_index()
    critic_lines = ["Algorithm 1's learned critic against the exact tail it stands for (mean over "
                    f"{cli.seeds} seeds; `python benchmarks/tdml_oracle.py --model-steps {cli.model_steps} --seeds {cli.seeds}`)."
                    " At the held-out starts: D(s, s) against the exact true TDML of theta and of theta'; where Eq. 9 reads it: "
                    "D(s_2, s_hat_2) against the exact tail.", "",
                    "| from | model steps | D(s, s) | exact TDML theta | exact TDML theta' | corr | D(s_2, s_hat_2) | exact tail | corr |",
                    "|---|---|---|---|---|---|---|---|---|"]
    critic_lines += [f"| {r['init']} | {int(r['model_steps'])} | {r['critic_at_start']:.4f} | {r['exact_tdml']:.4f} | "
                     f"{r['exact_tdml_target']:.4f} | {r['corr_at_start']:.2f} | {r['critic_eq9']:.4f} | {r['exact_eq9']:.4f} | "
                     f"{r['corr_eq9']:.2f} |" for _, r in table.iterrows()]
    (OUT / "oracle_critic.md").write_text("\n".join(critic_lines) + "\n")
    print("\n".join(critic_lines))
    df.to_csv(OUT / "oracle.csv", index=False)
    final = df[df.model_steps == df.model_steps.max()].groupby("line")["true_tdml"].agg(["mean", "min", "max", "count"])
    lines = [f"True TDML (gamma {GAMMA}, {EVAL_STARTS} held-out starts, {HORIZON} steps) after {cli.model_steps} model "
             f"steps; `python benchmarks/tdml_oracle.py --model-steps {cli.model_steps} --seeds {cli.seeds}` "
             f"({time.time() - start:.0f} s).", "", "| line | mean | min | max | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['mean']:.4f} | {r['min']:.4f} | {r['max']:.4f} | {int(r['count'])} |" for name, r in final.iterrows()]
    (OUT / "oracle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, group in df.groupby("line"):
        curve = group.groupby("model_steps")["true_tdml"]
        ax.plot(curve.mean().index, curve.mean().values, label=name)
        ax.fill_between(curve.mean().index, curve.min().values, curve.max().values, alpha=0.2)
    ax.set(xlabel="model updates", ylabel="true TDML (held-out)", yscale="log", title="Damped pendulum, linear model")
    ax.legend(fontsize=8)
    fig.savefig(OUT / "oracle.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
