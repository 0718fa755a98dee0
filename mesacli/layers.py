"""Causal attention kernels on per-head projections (paper Eq. 2 and Eqs. 4-8).

Shapes: B batch, T time, H heads, D key/value size.  Every kernel maps (q, k, v) of shape
[B, T, H, D] to an output [B, T, H, D] and the attention weights [B, H, T, T] (query x key) that
produced it; the causal mask includes the diagonal (t' <= t).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def causal_mask(t: int) -> jax.Array:
    return jnp.tril(jnp.ones((t, t), dtype=bool))


def linear_attention(q_BTHD, k_BTHD, v_BTHD):
    """Delta_t = sum_{t'<=t} v_{t'} (k_{t'}^T q_t): no normalisation, no 1/sqrt(d) scaling."""
    scores_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD)
    weights_BHTS = jnp.where(causal_mask(q_BTHD.shape[1]), scores_BHTS, 0.0)
    return jnp.einsum("bhts,bshd->bthd", weights_BHTS, v_BTHD), weights_BHTS


def softmax_attention(q_BTHD, k_BTHD, v_BTHD):
    """Delta_t = sum_{t'<=t} v_{t'} softmax_{t'}(k_{t'}^T q_t / sqrt(d)); masked logits set to -1e30."""
    d = q_BTHD.shape[-1]
    logits_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BTHD) / jnp.sqrt(d).astype(q_BTHD.dtype)
    logits_BHTS = jnp.where(causal_mask(q_BTHD.shape[1]), logits_BHTS, NEG_INF)
    weights_BHTS = jax.nn.softmax(logits_BHTS, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights_BHTS, v_BTHD), weights_BHTS


def mesa_preconditioned_queries_sequential(q_BTHD, k_BTHD, lam_H):
    """q~_t = R_t q_t with R_t = (sum_{t'<=t} k k^T + lambda^{-1} I)^{-1}, by recursive least squares.

    Sherman-Morrison (paper-spec section 3): R_0 = lambda I,
    R_t = R_{t-1} - R_{t-1} k_t k_t^T R_{t-1} / (1 + k_t^T R_{t-1} k_t).  The current token is included.
    """
    b, _, h, d = q_BTHD.shape
    eye = jnp.eye(d, dtype=q_BTHD.dtype)
    r0_BHDD = jnp.broadcast_to(lam_H[None, :, None, None] * eye, (b, h, d, d))

    def step(r_BHDD, qk):
        q_BHD, k_BHD = qk
        rk_BHD = jnp.einsum("bhij,bhj->bhi", r_BHDD, k_BHD)  # R symmetric: R k = (k^T R)^T
        denom_BH = 1.0 + jnp.einsum("bhi,bhi->bh", k_BHD, rk_BHD)
        r_BHDD = r_BHDD - jnp.einsum("bhi,bhj->bhij", rk_BHD, rk_BHD) / denom_BH[..., None, None]
        r_BHDD = 0.5 * (r_BHDD + jnp.swapaxes(r_BHDD, -1, -2))  # keep R symmetric in float32
        return r_BHDD, jnp.einsum("bhij,bhj->bhi", r_BHDD, q_BHD)

    xs = (jnp.moveaxis(q_BTHD, 1, 0), jnp.moveaxis(k_BTHD, 1, 0))
    _, q_tilde_TBHD = jax.lax.scan(step, r0_BHDD, xs)
    return jnp.moveaxis(q_tilde_TBHD, 0, 1)


def mesa_attention(q_BTHD, k_BTHD, v_BTHD, lam_H, impl: str = "sequential"):
    """Mesa-layer (paper Eqs. 4-8): Delta_t = Phi^_t q_t with Phi^_t the ridge solution of
    argmin_Phi 1/2 sum_{t'<=t} ||v_t' - Phi k_t'||^2 + 1/(2 lambda) ||Phi||_F^2,
    i.e. causal linear attention with the preconditioned query q~_t = R_t q_t.

    ``impl`` selects the algorithm; every implementation computes the same function.
    """
    if impl != "sequential":
        raise ValueError(f"unknown mesa implementation {impl!r}")
    q_tilde_BTHD = mesa_preconditioned_queries_sequential(q_BTHD, k_BTHD, lam_H)
    return linear_attention(q_tilde_BTHD, k_BTHD, v_BTHD)


def sinusoidal_encoding(t: int, dim: int) -> jax.Array:
    """PE[t, 2i] = sin(t / 10000^(2i/dim)), PE[t, 2i+1] = cos(...), positions t = 0..T-1."""
    pos = jnp.arange(t, dtype=jnp.float32)[:, None]
    freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    pe = jnp.zeros((t, dim), dtype=jnp.float32)
    pe = pe.at[:, 0::2].set(jnp.sin(pos * freq))
    return pe.at[:, 1::2].set(jnp.cos(pos * freq))
