"""The white-dwarf training step in diffrax (JAX): ``bench compiled``'s side-by-side rows.

The same problem as ``bench white_dwarf`` and ``bench compiled``: the width-10 MLP on
``[t, x, v]``, float64, explicit midpoint with ``h = 0.005`` over ``N`` steps, MSE against the
targets at every step, AdamW (lr 1e-2), one thread. Runs only where ``jax``, ``diffrax`` and
``optax`` are installed (``pip install 'nde-zoo[diffrax]'``; never in CI).

``python -m nde_zoo.bench._diffrax_white_dwarf STEPS REPEATS`` prints one JSON line:
``{adjoint: {"first_call_s": ..., "s_per_step": ...}}``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def main(steps: int, repeats: int) -> dict[str, dict[str, float]]:
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    from nde_zoo.bench.white_dwarf import white_dwarf_data

    jax.config.update("jax_enable_x64", True)
    ts_torch, target_torch = white_dwarf_data()
    ts = jnp.asarray(ts_torch[: steps + 1].numpy())
    target = jnp.asarray(target_torch[: steps + 1, 0].numpy())  # (N + 1, 2)

    class Field(eqx.Module):
        l1: eqx.nn.Linear
        l2: eqx.nn.Linear

        def __init__(self, key: jax.Array) -> None:
            k1, k2 = jax.random.split(key)
            self.l1 = eqx.nn.Linear(3, 10, key=k1, dtype=jnp.float64)
            self.l2 = eqx.nn.Linear(10, 2, key=k2, dtype=jnp.float64)

        def __call__(self, t, y, args):
            return self.l2(jnp.tanh(self.l1(jnp.concatenate([jnp.reshape(t, (1,)), y]))))

    adjoints = {
        "RecursiveCheckpointAdjoint": diffrax.RecursiveCheckpointAdjoint(),
        "RecursiveCheckpointAdjoint(every step)": diffrax.RecursiveCheckpointAdjoint(checkpoints=steps + 1),
        "BacksolveAdjoint": diffrax.BacksolveAdjoint(),
    }
    optimiser = optax.adamw(1e-2)
    results: dict[str, dict[str, float]] = {}
    for name, adjoint in adjoints.items():

        def loss(field: Field, adjoint=adjoint) -> jax.Array:
            solution = diffrax.diffeqsolve(
                diffrax.ODETerm(field), diffrax.Midpoint(), ts[0], ts[-1], dt0=ts[1] - ts[0], y0=target[0],
                saveat=diffrax.SaveAt(ts=ts), adjoint=adjoint, max_steps=steps + 1,
            )
            return jnp.mean((solution.ys - target) ** 2)

        @eqx.filter_jit
        def train_step(field: Field, state, loss=loss):
            value, grads = eqx.filter_value_and_grad(loss)(field)
            updates, state = optimiser.update(grads, state, eqx.filter(field, eqx.is_array))
            return eqx.apply_updates(field, updates), state, value

        field = Field(jax.random.PRNGKey(0))
        state = optimiser.init(eqx.filter(field, eqx.is_array))
        start = time.perf_counter()
        field, state, value = train_step(field, state)
        jax.block_until_ready(value)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            field, state, value = train_step(field, state)
            jax.block_until_ready(value)
            times.append(time.perf_counter() - start)
        results[name] = {"first_call_s": first, "s_per_step": statistics.median(times), "loss": float(value)}
    return results


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
