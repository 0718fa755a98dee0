"""The mesa-layer: sequential, chunked and recurrent forms against a float64 direct solve of every
per-token ridge problem, with and without forgetting; gradients; bad arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesacli import layers, mesa


def direct_mesa(q, k, v, lam, gamma=None):
    """float64: A_t = gamma_t A_{t-1} + k k^T (A_0 = I/lambda), G_t = gamma_t G_{t-1} + v k^T, out = G_t A_t^{-1} q_t.

    Equivalently Phi_t = argmin sum_t' w_tt' ||v - Phi k||^2 / 2 + (prod gamma) / (2 lambda) ||Phi||^2."""
    bsz, t_len, h, d = q.shape
    out = np.zeros(v.shape)
    for b in range(bsz):
        for hi in range(h):
            a_all, g_all = np.empty((t_len, d, d)), np.empty((t_len, v.shape[-1], d))
            a, g = np.eye(d) / lam[hi], np.zeros((v.shape[-1], d))
            for t in range(t_len):
                gam = 1.0 if gamma is None else gamma[b, t, hi]
                a = a_all[t] = gam * a + np.outer(k[b, t, hi], k[b, t, hi])
                g = g_all[t] = gam * g + np.outer(v[b, t, hi], k[b, t, hi])
            solved = np.linalg.solve(a_all, q[b, :, hi, :, None])[..., 0]  # A_t^{-1} q_t for every t at once
            out[b, :, hi] = np.einsum("tvd,td->tv", g_all, solved)
    return out


def inputs(shape, seed, key_scale=1.0):
    """float32-representable q, k, v (float64 arrays) with keys and queries scaled by key_scale."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=shape) for _ in range(3))
    return tuple(x.astype(np.float32).astype(np.float64) for x in (q * key_scale, k * key_scale, v))


def rel_err(out, ref):
    return float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))


f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731


@pytest.mark.parametrize(
    "t, d, lam, chunk, key_scale",
    [
        (4096, 16, 0.01, 64, 1.0),  # long sequence, strong regularisation
        pytest.param(1000, 64, 10.0, 48, 1.0, marks=pytest.mark.slow),  # weak regularisation, T % C != 0
        pytest.param(515, 128, 1.0, 64, 1.0, marks=pytest.mark.slow),  # wide heads
        pytest.param(300, 128, 10.0, 32, 128**-0.5, marks=pytest.mark.slow),  # wide heads, weak reg., unit keys
    ],
)
def test_chunked_matches_direct_solve(t, d, lam, chunk, key_scale):
    q, k, v = inputs((1, t, 2, d), seed=t + d, key_scale=key_scale)
    lam_h = np.array([lam, 2 * lam])
    ref = direct_mesa(q, k, v, lam_h)
    out = mesa.mesa_chunked(f32(q), f32(k), f32(v), f32(lam_h), chunk_size=chunk)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize(
    "chunk, gamma_low",
    [(1, None), (7, None), pytest.param(100, None, marks=pytest.mark.slow), (1, 0.8), (7, 0.8), (16, 0.8),
     (64, 0.95)],
)
def test_all_forms_agree_with_direct_solve(chunk, gamma_low):
    """With forgetting, the chunked form divides by the decay accumulated inside a chunk, so its float32
    accuracy needs that decay to stay above ~1e-2 (here 0.8^16 and 0.95^45)."""
    q, k, v = inputs((2, 45, 2, 8), seed=chunk)
    lam_h = np.array([0.3, 3.0])
    rng = np.random.default_rng(1)
    gamma = None if gamma_low is None else rng.uniform(gamma_low, 1.0, size=(2, 45, 2))
    ref = direct_mesa(q, k, v, lam_h, gamma)
    chunked = mesa.mesa_chunked(f32(q), f32(k), f32(v), f32(lam_h), f32(gamma), chunk_size=chunk)
    sequential, weights = mesa.mesa_sequential(f32(q), f32(k), f32(v), f32(lam_h), f32(gamma))
    assert rel_err(chunked, ref) < 1e-4
    assert rel_err(sequential, ref) < 1e-4
    # the sequential form's attention weights reproduce its output
    np.testing.assert_allclose(np.einsum("bhts,bshv->bthv", weights, v), sequential, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix_chunk", [8, 32])  # 32: the 20-token prefix is one chunk
def test_decoding_equals_the_parallel_form(prefix_chunk):
    q, k, v = inputs((2, 30, 3, 6), seed=3)
    lam_h = np.array([0.5, 1.0, 4.0])
    gamma = np.random.default_rng(2).uniform(0.9, 1.0, size=(2, 30, 3))
    parallel, state = mesa.mesa_chunked(f32(q[:, :20]), f32(k[:, :20]), f32(v[:, :20]), f32(lam_h),
                                        f32(gamma[:, :20]), chunk_size=prefix_chunk, return_state=True)
    full = mesa.mesa_chunked(f32(q), f32(k), f32(v), f32(lam_h), f32(gamma), chunk_size=8)
    tol = 1e-5 if prefix_chunk == 8 else 1e-4  # the same chunks up to float rounding, or other chunks
    np.testing.assert_allclose(parallel, full[:, :20], rtol=tol, atol=tol)
    outs = []
    for t in range(20, 30):  # continue token by token from the prefix state
        state, out = mesa.mesa_decode_step(state, f32(q[:, t]), f32(k[:, t]), f32(v[:, t]), f32(gamma[:, t]))
        outs.append(out)
    np.testing.assert_allclose(np.stack(outs, 1), full[:, 20:], rtol=1e-4, atol=1e-4)
    state = mesa.mesa_initial_state(2, f32(lam_h), 6, 6)
    for t in range(30):  # and from the empty state
        state, out = mesa.mesa_decode_step(state, f32(q[:, t]), f32(k[:, t]), f32(v[:, t]), f32(gamma[:, t]))
    np.testing.assert_allclose(out, full[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gamma_low", [None, 0.85])
def test_forward_only_path_equals_the_custom_vjp_path(monkeypatch, gamma_low):
    """Without differentiation mesa_chunked runs a scan over groups of chunks (``grouped=True``); under jax.vjp
    all chunks at once.  Both give the direct solution; here 3 chunks per group, 3 groups, the last padded."""
    monkeypatch.setattr(mesa, "GROUP_MATRICES", 12)  # B H = 4 matrices per chunk -> groups of 3 chunks
    q, k, v = inputs((2, 45, 2, 8), seed=11)
    lam_h = np.array([0.3, 3.0])
    gamma = None if gamma_low is None else np.random.default_rng(4).uniform(gamma_low, 1.0, size=(2, 45, 2))
    args = (f32(q), f32(k), f32(v), f32(lam_h), f32(gamma))
    assert mesa._group_size(7, 4) == 3
    forward_only = mesa.mesa_chunked(*args, chunk_size=7)
    with_vjp, _ = jax.vjp(lambda *a: mesa.mesa_chunked(*a, f32(gamma), chunk_size=7), *args[:4])
    np.testing.assert_allclose(forward_only, with_vjp, rtol=1e-5, atol=1e-5)
    assert rel_err(forward_only, direct_mesa(q, k, v, lam_h, gamma)) < 1e-4


def test_small_lambda_is_scaled_linear_attention():
    """As lambda -> 0, A^{-1} -> lambda I and the layer becomes lambda * linear attention."""
    q, k, v = (jnp.asarray(x, jnp.float32) for x in inputs((1, 12, 1, 4), seed=0))
    lam = 1e-5
    lin, _ = layers.linear_attention(q, k, v)
    for out in (mesa.mesa_chunked(q, k, v, jnp.array([lam]), chunk_size=5),
                mesa.mesa_sequential(q, k, v, jnp.array([lam]))[0]):
        np.testing.assert_allclose(np.asarray(out) / lam, np.asarray(lin), rtol=1e-3, atol=1e-3)


def test_long_sequence_weak_lambda_stays_finite_and_exact():
    """T = 16384 with lambda = 0.01 in float32: no NaN, still the direct solution (checked at the end)."""
    q, k, v = inputs((1, 16384, 1, 16), seed=5)
    out = np.asarray(mesa.mesa_chunked(f32(q), f32(k), f32(v), jnp.array([0.01]), chunk_size=64))
    assert np.all(np.isfinite(out))
    a = np.eye(16) / 0.01 + k[0, :, 0].T @ k[0, :, 0]
    g = v[0, :, 0].T @ k[0, :, 0]
    last = g @ np.linalg.solve(a, q[0, -1, 0])
    assert np.linalg.norm(out[0, -1, 0] - last) / np.linalg.norm(last) < 1e-4


@pytest.mark.parametrize("chunk, forgetting", [(6, True), (32, True), (32, False)])  # 32 >= T: one chunk
def test_gradients_match_the_sequential_form_and_finite_differences(chunk, forgetting):
    q, k, v = (jnp.asarray(x, jnp.float32) for x in inputs((1, 19, 2, 4), seed=7))
    lam = jnp.array([0.7, 2.0])
    gamma = jnp.asarray(np.random.default_rng(3).uniform(0.85, 1.0, size=(1, 19, 2)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(4).normal(size=(1, 19, 2, 4)), jnp.float32)
    n_args = 5 if forgetting else 4

    def loss_chunked(q, k, v, lam, gamma=None):
        return jnp.sum(mesa.mesa_chunked(q, k, v, lam, gamma, chunk_size=chunk) * cot)

    def loss_seq(q, k, v, lam, gamma=None):
        return jnp.sum(mesa.mesa_sequential(q, k, v, lam, gamma)[0] * cot)

    args = (q, k, v, lam, gamma)[:n_args]
    g_chunk = jax.grad(loss_chunked, argnums=tuple(range(n_args)))(*args)
    g_seq = jax.grad(loss_seq, argnums=tuple(range(n_args)))(*args)
    for a, b in zip(g_chunk, g_seq, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
    # central finite differences along random directions, in float64 numpy on the direct solve
    rng = np.random.default_rng(8)
    base = [np.asarray(x, np.float64) for x in args]
    for index in range(n_args):
        direction = rng.normal(size=base[index].shape)
        if index == 4:
            direction *= 0.01
        eps = 1e-5

        def at(sign, index=index, direction=direction, eps=eps):
            moved = [x.copy() for x in base]
            moved[index] = moved[index] + sign * eps * direction
            qq, kk, vv, ll, gg = moved + [None] * (5 - n_args)
            return np.sum(direct_mesa(qq, kk, vv, ll, gg) * np.asarray(cot, np.float64))

        numeric = (at(1) - at(-1)) / (2 * eps)
        analytic = float(np.sum(np.asarray(g_chunk[index], np.float64) * direction))
        assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-4)


def test_backward_memory_is_linear_in_t():
    """Compiled fwd+bwd memory (arguments + outputs + temporaries) grows linearly with T, stays far below
    what a D x D matrix per token would take, and within a small factor of chunked linear attention."""
    from mesacli.layers import linear_attention_chunked

    def total_bytes(kernel, t):
        q = jnp.ones((1, t, 2, 32), jnp.float32)
        fn = jax.jit(jax.grad(lambda q: jnp.sum(kernel(q))))
        stats = fn.lower(q).compile().memory_analysis()
        return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                - stats.alias_size_in_bytes)

    mesa_kernel = lambda q: mesa.mesa_chunked(q, q, q, jnp.ones(2), chunk_size=32)  # noqa: E731
    small, large = total_bytes(mesa_kernel, 512), total_bytes(mesa_kernel, 4096)
    linear = total_bytes(lambda q: linear_attention_chunked(q, q, q, 32), 4096)
    per_token_matrices = 4096 * 2 * 32 * 32 * 4  # what storing R_t for every token would take
    assert large < 9 * small  # 8x the tokens: ~8x the memory, not more
    assert large < 0.75 * per_token_matrices
    assert large < 3.5 * linear


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk_size": 0}, "chunk size must be a positive integer"),
        ({"lam": -1.0}, "lambda must be positive"),
        ({"gamma": 1.5}, "gamma must lie in (0, 1]"),
        ({"gamma": 0.0}, "gamma must lie in (0, 1]"),
    ],
)
def test_bad_arguments(kwargs, message):
    x = jnp.ones((1, 4, 1, 2))
    lam = jnp.full((1,), kwargs.get("lam", 1.0))
    gamma = jnp.full((1, 4, 1), kwargs["gamma"]) if "gamma" in kwargs else None
    with pytest.raises(ValueError) as err:
        mesa.mesa_chunked(x, x, x, lam, gamma, chunk_size=kwargs.get("chunk_size", 2))
    assert message in str(err.value)
    if "chunk_size" not in kwargs:
        with pytest.raises(ValueError):
            mesa.mesa_sequential(x, x, x, lam, gamma)


@pytest.mark.parametrize("n", [1, 5, 8, 13, 40])
def test_cholesky_with_inverse(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(3, n, n))
    m = x @ np.swapaxes(x, 1, 2) + n * np.eye(n)
    low, low_inv = mesa.cholesky_with_inverse(jnp.asarray(m, jnp.float32))
    np.testing.assert_allclose(low, np.linalg.cholesky(m), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(low_inv) @ np.asarray(low), np.broadcast_to(np.eye(n), m.shape), atol=1e-4)
    np.testing.assert_allclose(mesa.spd_inverse(jnp.asarray(m, jnp.float32)), np.linalg.inv(m), rtol=1e-3, atol=1e-5)
