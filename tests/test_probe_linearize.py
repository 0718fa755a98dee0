"""The linearize distillation follows the authors' linearizer.py: their loss and their optimizer chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY, merge

from mesacli import model, tasks
from mesacli.probe import linearize
from mesacli.spec import spec_from_dict

SPEC = spec_from_dict(merge(TINY, {"model": {"attention": "softmax", "init_std": 0.3}}))


def test_distillation_is_clipped_adamw_on_the_halved_squared_error_by_hand():
    """Three steps by hand: g = grad of sum((out - target)^2) / (2 B T) ([C] _compute_loss), clipped elementwise to
    [-1, 1] ([C] optax.clip(grad_clip=1)), then AdamW (b1 0.9, b2 0.999, eps 1e-8, bias-corrected moments) with
    decoupled weight decay 0.05 at a constant lr ([C] Optimizer(use_schedule=False))."""
    params = model.init(jax.random.PRNGKey(0), SPEC)
    params["input_proj"] = 10 * params["input_proj"]  # large activations: a quarter of the gradient entries exceed 1
    layer, steps, lr, bsz = 1, 3, 0.05, 4
    repl, history = linearize.distil_layer(params, SPEC, layer, steps=steps, lr=lr, batch_size=bsz, log_every=1)

    p = linearize.init_replacement(jax.random.PRNGKey(SPEC.train.seed + 31 * layer + 5), SPEC, "linear")
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    data_key = jax.random.PRNGKey(SPEC.train.seed + 9999)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    losses = []
    for step in range(steps):
        batch = tasks.sample_batch(jax.random.fold_in(data_key, step), SPEC, bsz)
        _, aux = model.apply(params, batch.tokens_BTI, SPEC)
        h = aux["residual_LBTE"][layer]
        target, _ = model.attention_block(params["blocks"][layer], h, SPEC, "softmax", qk_norm=False)

        def loss(r, h=h, target=target):
            out, _ = model.attention_block(r, h, SPEC, "linear", qk_norm=False)
            b, t, _ = out.shape
            return jnp.sum((target - out) ** 2) / (2 * b * t)

        value, grads = jax.value_and_grad(loss)({k: jnp.asarray(v, jnp.float32) for k, v in p.items()})
        losses.append(float(value))
        for k in p:
            g = np.clip(np.asarray(grads[k], np.float64), -1.0, 1.0)
            m[k] = 0.9 * m[k] + 0.1 * g
            v2[k] = 0.999 * v2[k] + 0.001 * g * g
            m_hat, v_hat = m[k] / (1 - 0.9 ** (step + 1)), v2[k] / (1 - 0.999 ** (step + 1))
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + 0.05 * p[k])

    np.testing.assert_allclose([v for _, v in history], losses, rtol=1e-4)
    for k in p:
        np.testing.assert_allclose(np.asarray(repl[k]), p[k], rtol=1e-4, atol=1e-5, err_msg=k)
