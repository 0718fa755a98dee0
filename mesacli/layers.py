"""Causal attention kernels on per-head projections (paper Eq. 2); the mesa-layer is in mesa.py.

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


def to_chunks(x_BT, chunk: int):
    """[B, T, H, ...] -> [n, B, H, C, ...] with T zero-padded to a multiple of ``chunk``."""
    bsz, t = x_BT.shape[:2]
    n = -(-t // chunk)
    x_BT = jnp.pad(x_BT, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x_BT.ndim - 2))
    x = x_BT.reshape((bsz, n, chunk) + x_BT.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)


def from_chunks(x_nBHC, t: int):
    """[n, B, H, C, ...] -> [B, T, H, ...], dropping the padding."""
    n, bsz, h, c = x_nBHC.shape[:4]
    x = jnp.swapaxes(jnp.moveaxis(x_nBHC, 0, 1), 2, 3)  # [B, n, C, H, ...]
    return x.reshape((bsz, n * c, h) + x_nBHC.shape[4:])[:, :t]


def linear_attention_chunked(q_BTHD, k_BTHD, v_BTHD, chunk_size: int = 64):
    """Linear attention in chunks of C tokens: carry S = sum v k^T between chunks, quadratic inside.

    out_i = S_0 q_i + sum_{l<=i in chunk} v_l k_l^T q_i; O(T C D + T D^2) time, no T x T matrix."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be a positive integer, got {chunk_size}")
    bsz, t, h, d = q_BTHD.shape
    c = min(chunk_size, t)
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))

    @jax.checkpoint
    def body(s_BHVD, x):
        q, k, v = x  # [B, H, C, D], [B, H, C, D], [B, H, C, V]
        scores = jnp.where(causal, jnp.einsum("bhid,bhld->bhil", q, k), 0.0)
        out = jnp.einsum("bhvd,bhid->bhiv", s_BHVD, q) + jnp.einsum("bhil,bhlv->bhiv", scores, v)
        return s_BHVD + jnp.einsum("bhlv,bhld->bhvd", v, k), out

    s0 = jnp.zeros((bsz, h, v_BTHD.shape[-1], d), q_BTHD.dtype)
    _, out = jax.lax.scan(body, s0, tuple(to_chunks(x, c) for x in (q_BTHD, k_BTHD, v_BTHD)))
    return from_chunks(out, t)


SOFTMAX_BLOCK = 64  # query rows per block of the block-causal softmax (T=224 CPU step: 2.3 s dense, 1.45 s at 64)


def softmax_attention(q_BTHD, k_BTHD, v_BTHD, block_size: int | None = SOFTMAX_BLOCK):
    """Delta_t = sum_{t'<=t} v_{t'} softmax_{t'}(k_{t'}^T q_t / sqrt(d)); masked logits set to -1e30.

    Block-causal: the queries of block [s, e) only meet the keys [0, e), so the logits above the
    diagonal blocks (about half of the T x T matrix) are never formed; each row still holds every
    key t' <= t, so the softmax is exact, not an online rescaling.  ``block_size=None`` (or T no
    larger than it) forms the dense T x T logits.  The weights [B, H, T, T] are assembled with zeros
    above the blocks; under jit they cost nothing when the caller drops them (e.g. the training loss).
    """
    t, d = q_BTHD.shape[1], q_BTHD.shape[-1]
    scale = 1.0 / jnp.sqrt(d).astype(q_BTHD.dtype)
    block = t if block_size is None or block_size >= t else block_size
    # one transpose to [B, H, T, D]: slices along T are then contiguous per head and feed batched matmuls
    q_BHTD, k_BHTD, v_BHTD = (jnp.swapaxes(x, 1, 2) for x in (q_BTHD, k_BTHD, v_BTHD))
    outs_BHCD, weights_BHCS = [], []
    for start in range(0, t, block):
        end = min(start + block, t)
        logits_BHCS = jnp.einsum("bhtd,bhsd->bhts", q_BHTD[:, :, start:end], k_BHTD[:, :, :end]) * scale
        weights = jax.nn.softmax(jnp.where(causal_mask(end)[start:end], logits_BHCS, NEG_INF), axis=-1)
        outs_BHCD.append(jnp.einsum("bhts,bhsd->bhtd", weights, v_BHTD[:, :, :end]))
        weights_BHCS.append(jnp.pad(weights, ((0, 0), (0, 0), (0, 0), (0, t - end))))
    return jnp.swapaxes(jnp.concatenate(outs_BHCD, axis=2), 1, 2), jnp.concatenate(weights_BHCS, axis=2)


def sinusoidal_encoding(t: int, dim: int) -> jax.Array:
    """PE[t, 2i] = sin(t / 10000^(2i/dim)), PE[t, 2i+1] = cos(...), positions t = 0..T-1."""
    pos = jnp.arange(t, dtype=jnp.float32)[:, None]
    freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    pe = jnp.zeros((t, dim), dtype=jnp.float32)
    pe = pe.at[:, 0::2].set(jnp.sin(pos * freq))
    return pe.at[:, 1::2].set(jnp.cos(pos * freq))
