"""Attention kernels and layers: loops as references, causality of every layer type (mesa: test_mesa.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesacli import layers, model
from tests.conftest import tiny_spec


def test_chunked_linear_attention_matches_the_quadratic_form():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 3, 5)), jnp.float32) for _ in range(3))
    ref, _ = layers.linear_attention(q, k, v)
    for chunk in (1, 8, 64):
        np.testing.assert_allclose(layers.linear_attention_chunked(q, k, v, chunk), ref, rtol=1e-4, atol=1e-4)


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


def _softmax_reference(q, k, v):
    """float64 numpy: out_t = sum_{t'<=t} softmax_{t'}(k_{t'} . q_t / sqrt(d)) v_{t'}, weights [B, H, T, T]."""
    t, d = q.shape[1], q.shape[-1]
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", w, v), w


@pytest.mark.parametrize("block", [None, 7, 16, 36, 64])
def test_block_causal_softmax_matches_a_float64_reference(block):
    """The block-causal kernel (T = 37 not a multiple of the block) equals the dense softmax, weights
    included (zero above the diagonal), and so do its gradients (against the dense kernel's)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(2, 37, 3, 5)) for _ in range(3))
    ref_out, ref_w = _softmax_reference(q, k, v)
    q32, k32, v32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    out, weights = jax.jit(layers.softmax_attention, static_argnums=3)(q32, k32, v32, block)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weights, ref_w, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(weights)[..., np.triu_indices(37, 1)[0], np.triu_indices(37, 1)[1]] == 0)
    cot = jnp.asarray(rng.normal(size=out.shape), jnp.float32)

    def grads(block_size):
        return jax.jit(jax.grad(lambda *a: jnp.sum(layers.softmax_attention(*a, block_size)[0] * cot),
                                argnums=(0, 1, 2)))(q32, k32, v32)

    for got, want in zip(grads(block), grads(None), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, extra", [
    ("linear", {}), ("softmax", {}), ("softmax_pe", {}),
    ("mesa", {"mesa_impl": "sequential"}), ("mesa", {"mesa_chunk_size": 3, "mesa_forget": "gate"}),
])
def test_every_layer_type_is_causal(kind, extra):
    """d output_t / d input_t' is zero for t' > t and non-zero for some t' <= t (checked via gradients)."""
    attention = "softmax" if kind == "softmax_pe" else kind
    spec = tiny_spec(model={"layers": 1, "attention": attention, "first_layer": kind, "layer_norm": True,
                            "mlp": True, "mlp_hidden": 8, **extra})
    params = model.init(jax.random.PRNGKey(0), spec)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, spec.task.seq_len, spec.token_dim))
    # jac[t, t'] = sum over features of |d sum_j out_t,j / d x_t'|
    jac = jax.jit(jax.jacrev(lambda x_: jnp.sum(model.apply(params, x_, spec)[0][0], axis=-1)))(x)
    per_pos = np.abs(np.asarray(jac[:, 0])).sum(axis=-1)  # [T, T]
    t_len = spec.task.seq_len
    for t in range(t_len):
        assert np.all(per_pos[t, t + 1:] == 0), f"{kind}: output {t} depends on future inputs"
        assert per_pos[t, : t + 1].min() > 0, f"{kind}: output {t} ignores some past input"


def test_sinusoidal_encoding():
    pe = np.asarray(layers.sinusoidal_encoding(7, 6))
    assert pe.shape == (7, 6)
    np.testing.assert_allclose(pe[:, 0], np.sin(np.arange(7)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 1], np.cos(np.arange(7)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 4], np.sin(np.arange(7) / 10000 ** (4 / 6)), atol=1e-6)
