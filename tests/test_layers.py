"""Attention kernels: causality of every layer type, the mesa-layer against a float64 direct solve."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesacli import layers, model
from tests.conftest import tiny_spec


def direct_mesa(q, k, v, lam):
    """float64 reference: Phi_t = argmin 1/2 sum_{t'<=t} ||v - Phi k||^2 + 1/(2 lam) ||Phi||^2, out = Phi_t q_t."""
    b, t, h, d = q.shape
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                kk, vv = k[bi, : ti + 1, hi], v[bi, : ti + 1, hi]
                phi = np.linalg.solve(kk.T @ kk + np.eye(d) / lam[hi], kk.T @ vv).T
                out[bi, ti, hi] = phi @ q[bi, ti, hi]
    return out


@pytest.mark.parametrize("lam, d, t", [(0.01, 8, 40), (1.0, 20, 64), (10.0, 16, 64)])
def test_sequential_mesa_matches_float64_direct_solve(lam, d, t):
    rng = np.random.default_rng(int(lam * 100) + d)
    q, k, v = (rng.normal(size=(2, t, 2, d)) for _ in range(3))
    lam_h = np.array([lam, lam * 0.5])
    out, weights = layers.mesa_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, lam_h)))
    ref = direct_mesa(q, k, v, lam_h)
    rel = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert rel < 1e-4
    assert np.asarray(weights).shape == (2, 2, t, t)


def test_mesa_small_lambda_is_scaled_linear_attention():
    """As lambda -> 0, R_t -> lambda I and the layer becomes lambda * linear attention (paper-spec section 3)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 12, 1, 4)), jnp.float32) for _ in range(3))
    lam = 1e-5
    mesa, _ = layers.mesa_attention(q, k, v, jnp.array([lam]))
    lin, _ = layers.linear_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(mesa) / lam, np.asarray(lin), rtol=1e-3, atol=1e-3)


def test_linear_and_softmax_attention_against_loops():
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, 5, 1, 3)) for _ in range(3))
    lin, _ = layers.linear_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    soft, _ = layers.softmax_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    for t in range(5):
        scores = k[0, : t + 1, 0] @ q[0, t, 0]
        np.testing.assert_allclose(lin[0, t, 0], scores @ v[0, : t + 1, 0], rtol=1e-5, atol=1e-5)
        w = np.exp(scores / np.sqrt(3))
        np.testing.assert_allclose(soft[0, t, 0], (w / w.sum()) @ v[0, : t + 1, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "softmax", "softmax_pe", "mesa"])
def test_every_layer_type_is_causal(kind):
    """d output_t / d input_t' is zero for t' > t and non-zero for some t' <= t (checked via gradients)."""
    attention = "softmax" if kind == "softmax_pe" else kind
    spec = tiny_spec(model={"layers": 1, "attention": attention, "first_layer": kind, "layer_norm": True,
                            "mlp": True, "mlp_hidden": 8})
    params = model.init(jax.random.PRNGKey(0), spec)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, spec.task.seq_len, spec.token_dim))
    t_len = spec.task.seq_len
    for t in (0, 3, t_len - 2):
        grad = jax.grad(lambda x_, t=t: jnp.sum(model.apply(params, x_, spec)[0][0, t]))(x)
        per_pos = np.abs(np.asarray(grad[0])).sum(axis=-1)
        assert np.all(per_pos[t + 1:] == 0), f"{kind}: output {t} depends on future inputs"
        assert per_pos[: t + 1].min() > 0, f"{kind}: output {t} ignores some past input"


def test_sinusoidal_encoding():
    pe = np.asarray(layers.sinusoidal_encoding(7, 6))
    assert pe.shape == (7, 6)
    np.testing.assert_allclose(pe[:, 0], np.sin(np.arange(7)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 1], np.cos(np.arange(7)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 4], np.sin(np.arange(7) / 10000 ** (4 / 6)), atol=1e-6)
