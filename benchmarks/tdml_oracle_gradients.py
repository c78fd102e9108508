"""Eq. 9 with the exact critic against the exact true-TDML gradient, on tdml_oracle.py's system.

    python benchmarks/tdml_oracle_gradients.py

From the least-squares model: the cosine between Eq. 9's semi-gradient (the critic = the exact TDML
of the current model, held fixed inside it) and the gradient of the exact true TDML of the buffer's
states, and the path of each under plain gradient descent at two rates and under Adam 1e-3, as
(step, true TDML of the buffer's states, cosine, |semi-gradient|)."""

import jax
import jax.numpy as jnp
import optax

from algorithms import tdml

import tdml_oracle as o


def main():
    args = o.config(total_steps=1000, eval_every=500)
    data = jax.jit(tdml.make_train(args, o.PENDULUM).make_data)(o.GAIN, jax.random.PRNGKey(args.data_seed))
    ls = o.least_squares(data)
    s0, s1, s2 = (data.obs[i:args.trajectory_length - 1 + i].reshape(-1, 2) for i in range(3))
    buffer_real, real_from_s2 = o.real_rollouts(s0, o.HORIZON), o.real_rollouts(s2, o.HORIZON - 2)
    discount = o.GAMMA ** jnp.arange(o.HORIZON - 1)[:, None]

    def full(theta):
        return jnp.mean(o.tdml_from(theta, buffer_real))

    def semi(theta):
        hat = o.closed_loop_linear(theta, s0, 2)
        predicted = o.closed_loop_linear(jax.lax.stop_gradient(theta), hat[2], o.HORIZON - 2)
        tail = jnp.sum(discount * jnp.sum((real_from_s2 - predicted) ** 2, -1), 0)
        return jnp.mean(jnp.sum((s1 - hat[1]) ** 2, -1) + o.GAMMA * tail)

    def flat(g):
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])

    @jax.jit
    def probe(theta):
        gf, gs = flat(jax.grad(full)(theta)), flat(jax.grad(semi)(theta))
        return full(theta), gs @ gf / jnp.linalg.norm(gs) / jnp.linalg.norm(gf), jnp.linalg.norm(gs)

    def path(loss, opt, steps, every):
        step = jax.jit(lambda th, st: (lambda u: (optax.apply_updates(th, u[0]), u[1]))(opt.update(jax.grad(loss)(th), st)))
        theta, state, out = ls, opt.init(ls), []
        for i in range(steps + 1):
            if i % every == 0:
                out.append((i, *(round(float(x), 5) for x in probe(theta))))
            theta, state = step(theta, state)
        return out

    print("at least squares: (true TDML, cos(semi, full), |semi|) =", [round(float(x), 4) for x in probe(ls)],
          "|full| =", float(jnp.linalg.norm(flat(jax.grad(full)(ls)))))
    print("Eq. 9 exact critic, Adam 1e-3:", path(semi, optax.adam(1e-3), 400, 50))
    for lr in (0.05, 0.01):
        print(f"Eq. 9 exact critic, gradient descent {lr}:", path(semi, optax.sgd(lr), 3000, 500))
        print(f"true TDML, gradient descent {lr}:", path(full, optax.sgd(lr), 3000, 500))


if __name__ == "__main__":
    main()
