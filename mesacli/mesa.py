"""The mesa-layer (paper Eqs. 4-8, appendix B): exact sequential, exact chunked and recurrent forms.

For every head and time t the layer outputs Phi^_t q_t with

    Phi^_t = argmin_Phi 1/2 sum_{t'<=t} w_{t,t'} ||v_t' - Phi k_t'||^2
             + (prod_{t''<=t} gamma_t'') / (2 lambda) ||Phi||_F^2,
    w_{t,t'} = prod_{t''=t'+1}^{t} gamma_t''                      (forgetting factor, appendix B; gamma = 1: none)

i.e. Phi^_t = G_t A_t^{-1} with A_t = gamma_t A_{t-1} + k_t k_t^T, A_0 = I / lambda and
G_t = gamma_t G_{t-1} + v_t k_t^T, G_0 = 0.  The current token is included.

Shapes: B batch, T time, H heads, D key size, V value size.  q, k: [B, T, H, D], v: [B, T, H, V],
lambda: [H], gamma (optional): [B, T, H] in (0, 1].

Forms (all compute the same function):
- ``mesa_sequential``: recursive least squares (Sherman-Morrison scan over tokens carrying R_t = A_t^{-1}).
- ``mesa_chunked``: chunks of C tokens.  The state A at every chunk boundary is an additive recursion;
  inside a chunk every token's solution comes from one Cholesky factor of the C x C matrix
  N = diag(b) + K R_0 K^T, whose leading blocks give the causal per-token Woodbury corrections; chunks
  are processed batched: in groups of ~256 matrices by a scan when only the output is needed, all at once
  under differentiation.  A hand-written backward pass (custom VJP) reuses the forward's factors:
  gradients store O(T (D + C) + (T/C) D^2) per head instead of a D x D matrix per token.  A sequence of one
  chunk (T <= C, e.g. the paper's T = 50 models) starts from A_0 = I / lambda: R_0 = lambda I is not factorised
  and the chunk-boundary state terms are left out, forward and backward.
- ``mesa_decode_step``: one token at a time with state (R, G), for generation.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mesacli.layers import from_chunks, to_chunks


class MesaState(NamedTuple):
    """Recurrent state of one mesa-layer: R = A^{-1} [B, H, D, D] and G [B, H, V, D]."""

    r_BHDD: jax.Array
    g_BHVD: jax.Array


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_mesa_args(lam_H, gamma_BTH=None, chunk_size: int | None = None) -> None:
    """Clear errors for bad arguments (only values known outside of a trace can be checked)."""
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"mesa chunk size must be a positive integer, got {chunk_size!r}")
    if _is_concrete(lam_H) and not bool(np.all(np.asarray(lam_H) > 0)):
        raise ValueError(f"mesa lambda must be positive, got {np.asarray(lam_H).tolist()}")
    if gamma_BTH is not None and _is_concrete(gamma_BTH):
        g = np.asarray(gamma_BTH)
        if not bool(np.all((g > 0) & (g <= 1))):
            raise ValueError(f"mesa forgetting factor gamma must lie in (0, 1], got values in [{g.min()}, {g.max()}]")


def _log_gamma(gamma_BTH, like_BTHD):
    if gamma_BTH is None:
        return jnp.zeros(like_BTHD.shape[:3], like_BTHD.dtype)
    return jnp.log(gamma_BTH.astype(like_BTHD.dtype))


def decay_mask(log_gamma_BTH):
    """W[b, h, t, t'] = prod_{t''=t'+1}^{t} gamma_t'' for t' <= t, else 0."""
    c_BHT = jnp.cumsum(jnp.moveaxis(log_gamma_BTH, 1, 2), axis=-1)
    diff = c_BHT[..., :, None] - c_BHT[..., None, :]
    t = log_gamma_BTH.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)


# ----------------------------------------------------------------------------- sequential


def _head_identity(scale_H, batch: int, d: int, dtype):
    """scale_h * I_d for every head, broadcast to [batch, H, d, d]."""
    eye = jnp.eye(d, dtype=dtype)
    return jnp.broadcast_to(scale_H.astype(dtype)[None, :, None, None] * eye, (batch, scale_H.shape[0], d, d))


def _rls_update(r_BHDD, k_BHD, gamma_BH):
    """Sherman-Morrison with forgetting: R <- gamma^{-1} [R - R k k^T R / (gamma + k^T R k)] (R symmetric)."""
    rk_BHD = jnp.einsum("bhij,bhj->bhi", r_BHDD, k_BHD)
    denom_BH = gamma_BH + jnp.einsum("bhi,bhi->bh", k_BHD, rk_BHD)
    r_BHDD = (r_BHDD - jnp.einsum("bhi,bhj->bhij", rk_BHD, rk_BHD) / denom_BH[..., None, None]) / gamma_BH[
        ..., None, None
    ]
    return 0.5 * (r_BHDD + jnp.swapaxes(r_BHDD, -1, -2))  # keep R symmetric in float32


def mesa_preconditioned_queries(q_BTHD, k_BTHD, lam_H, gamma_BTH=None):
    """q~_t = R_t q_t = A_t^{-1} q_t by Sherman-Morrison (paper-spec section 3, appendix B):
    R_0 = lambda I,  R_t = gamma_t^{-1} [R_{t-1} - R_{t-1} k k^T R_{t-1} / (gamma_t + k^T R_{t-1} k)]."""
    b, _, h, d = q_BTHD.shape
    r0_BHDD = _head_identity(lam_H, b, d, q_BTHD.dtype)
    gamma_BTH = jnp.ones((b, q_BTHD.shape[1], h), q_BTHD.dtype) if gamma_BTH is None else gamma_BTH

    def step(r_BHDD, xs):
        q_BHD, k_BHD, g_BH = xs
        r_BHDD = _rls_update(r_BHDD, k_BHD, g_BH)
        return r_BHDD, jnp.einsum("bhij,bhj->bhi", r_BHDD, q_BHD)

    xs = (jnp.moveaxis(q_BTHD, 1, 0), jnp.moveaxis(k_BTHD, 1, 0), jnp.moveaxis(gamma_BTH, 1, 0))
    _, q_tilde_TBHD = jax.lax.scan(step, r0_BHDD, xs)
    return jnp.moveaxis(q_tilde_TBHD, 0, 1)


def mesa_sequential(q_BTHD, k_BTHD, v_BTHD, lam_H, gamma_BTH=None):
    """Exact sequential form: RLS scan for q~_t, then (decayed) causal linear attention with q~.

    Returns (out [B, T, H, V], attention weights [B, H, T, T] with w_{t,t'} k_t'^T q~_t)."""
    check_mesa_args(lam_H, gamma_BTH)
    q_tilde = mesa_preconditioned_queries(q_BTHD, k_BTHD, lam_H, gamma_BTH)
    weights_BHTS = jnp.einsum("bthd,bshd->bhts", q_tilde, k_BTHD) * decay_mask(_log_gamma(gamma_BTH, q_BTHD))
    return jnp.einsum("bhts,bshv->bthv", weights_BHTS, v_BTHD), weights_BHTS


# ----------------------------------------------------------------------------- chunked


LEAF = 8


def cholesky_with_inverse(m_XNN):
    """(L, L^{-1}) with m = L L^T for a batch of SPD n x n matrices, by recursive 2 x 2 blocking

        L = [[L_a, 0], [X, L_d]],  X = B L_a^{-T},  L_d L_d^T = D - X X^T,
        L^{-1} = [[L_a^{-1}, 0], [-L_d^{-1} X L_a^{-1}, L_d^{-1}]],

    down to blocks of at most LEAF rows, which are factored column by column.  Written with plain XLA
    ops on purpose: jaxlib's batched CPU LAPACK kernels (cholesky, triangular_solve) deadlock XLA's
    thread pool when called inside a scan body (seen with jaxlib 0.10.2 on 2 cores).
    """
    n = m_XNN.shape[-1]
    if n <= LEAF:
        return _cholesky_with_inverse_small(m_XNN)
    h = n // 2
    l_a, l_a_inv = cholesky_with_inverse(m_XNN[..., :h, :h])
    x = m_XNN[..., h:, :h] @ jnp.swapaxes(l_a_inv, -1, -2)
    l_d, l_d_inv = cholesky_with_inverse(m_XNN[..., h:, h:] - x @ jnp.swapaxes(x, -1, -2))
    zeros = jnp.zeros(m_XNN.shape[:-2] + (h, n - h), m_XNN.dtype)
    low = jnp.concatenate([jnp.concatenate([l_a, zeros], -1), jnp.concatenate([x, l_d], -1)], -2)
    l_inv = jnp.concatenate(
        [jnp.concatenate([l_a_inv, zeros], -1), jnp.concatenate([-l_d_inv @ x @ l_a_inv, l_d_inv], -1)], -2
    )
    return low, l_inv


def _cholesky_with_inverse_small(m_XNN):
    """Column-by-column Cholesky (outer-product form) and forward substitution (n <= LEAF)."""
    n = m_XNN.shape[-1]
    idx = jnp.arange(n)
    zeros = jnp.zeros_like(m_XNN)

    def cholesky_column(j, carry):
        trailing, low = carry
        col = jnp.take(trailing, j, axis=-1)  # [..., n]
        pivot = jnp.sqrt(jnp.take(col, j, axis=-1))
        col = jnp.where(idx >= j, col / pivot[..., None], 0.0)
        low = jax.lax.dynamic_update_index_in_dim(low, col[..., :, None], j, axis=-1)
        return trailing - col[..., :, None] * col[..., None, :], low

    _, low = jax.lax.fori_loop(0, n, cholesky_column, (m_XNN, zeros))

    def substitution_row(j, inv):  # row j of L^{-1}: (e_j - L[j, :j] L^{-1}[:j]) / L[j, j]
        row = jnp.take(low, j, axis=-2)  # [..., n]
        below = jnp.where(idx < j, row, 0.0)
        new = ((idx == j).astype(m_XNN.dtype) - jnp.einsum("...k,...kn->...n", below, inv)) / jnp.take(
            row, j, axis=-1
        )[..., None]
        return jax.lax.dynamic_update_index_in_dim(inv, new[..., None, :], j, axis=-2)

    return low, jax.lax.fori_loop(0, n, substitution_row, zeros)


def spd_inverse(m_XNN):
    """m^{-1} = L^{-T} L^{-1} for SPD m (see cholesky_with_inverse)."""
    _, l_inv = cholesky_with_inverse(m_XNN)
    return jnp.swapaxes(l_inv, -1, -2) @ l_inv


def _scale(s_nBHC, x_nBHCX):
    """s_i x_i (rows scaled by a per-token factor); no factor (None, no forgetting) leaves x as it is."""
    return x_nBHCX if s_nBHC is None else s_nBHC[..., None] * x_nBHCX


def _causal(rel_nBHCC, x_nBHCC):
    """rel * x with the in-chunk decay weights, or x below and on the diagonal (0 above) without forgetting."""
    if rel_nBHCC is not None:
        return rel_nBHCC * x_nBHCC
    c = x_nBHCC.shape[-1]
    return jnp.where(jnp.tril(jnp.ones((c, c), dtype=bool)), x_nBHCC, 0.0)


def _times_r0(x_nBHXD, r0):
    """x R_0: a batched product, or for R_0 = lambda I (``r0`` = lambda [H]: a chunk that starts the sequence) a
    per-head scale."""
    return x_nBHXD * r0[:, None, None] if r0.ndim == 1 else x_nBHXD @ r0


def _causal_solve(r0_nBHDD, m_nBHCD, rhs_nBHCD, b_nBHC):
    """x_i = A_i^{-1} rhs_i for every token i of a chunk (Woodbury, one Cholesky factor for all i):

        A_i^{-1} = b_i^{-1} [R_0 - R_0 K_{<=i}^T N_{<=i}^{-1} K_{<=i} R_0],  N = diag(b) + K R_0 K^T = L L^T.
    The leading block of L is the factor of N_{<=i}, so with M = L^{-1} K R_0 [C, D]
        x_i = b_i^{-1} [R_0 rhs_i - sum_{j<=i} (M_j . rhs_i) M_j],   i.e.  X = (rhs R_0 - tril(rhs M^T) M) / b.
    b = None: no forgetting (b = 1).  R_0 as in ``_times_r0``.
    """
    z_CC = _causal(None, rhs_nBHCD @ jnp.swapaxes(m_nBHCD, -1, -2))
    x = _times_r0(rhs_nBHCD, r0_nBHDD) - z_CC @ m_nBHCD
    return x if b_nBHC is None else x / b_nBHC[..., None]


def _precondition_chunks(q_nBHCD, k_nBHCD, b_nBHC, a0s, lam_H=None):
    """q~_i = A_i^{-1} q_i for every token of a batch of chunks, given A_0, the state A at each chunk's start.

    Batched over chunks: R_0 = A_0^{-1} (``spd_inverse``), N = diag(b) + K R_0 K^T = L L^T and the causal
    solves of ``_causal_solve``.  Inverting the accumulated A is more accurate in float32 than carrying R by
    Woodbury downdates (1e-4 against 2e-4 relative error for N(0, 1) keys with d=64, lambda=10).
    ``a0s`` None: one chunk that starts the sequence, A_0 = I / lambda, so R_0 = lambda I (``lam_H``) needs no
    factorisation and its products are scalings.
    Returns q~ [n, B, H, C, D], M = L^{-1} K R_0 [n, B, H, C, D] and R_0 ([n, B, H, D, D], or lambda [H]).
    """
    c = q_nBHCD.shape[-2]
    r0s = lam_H if a0s is None else spd_inverse(0.5 * (a0s + jnp.swapaxes(a0s, -1, -2)))
    k_r0 = _times_r0(k_nBHCD, r0s)  # K R_0 [C, D]
    eye_C = jnp.eye(c, dtype=q_nBHCD.dtype)
    n_CC = k_r0 @ jnp.swapaxes(k_nBHCD, -1, -2) + (eye_C if b_nBHC is None else b_nBHC[..., :, None] * eye_C)
    _, l_inv = cholesky_with_inverse(0.5 * (n_CC + jnp.swapaxes(n_CC, -1, -2)))
    m = l_inv @ k_r0  # M = L^{-1} K R_0
    return _causal_solve(r0s, m, q_nBHCD, b_nBHC), m, r0s


def _decay_within(cum_nBHC):
    """(b, rel, to_end) inside a chunk: b_i, rel[i, l] = b_i / b_l for l <= i (0 above the diagonal) and
    to_end[l] = b_C / b_l; all None without forgetting (cum None)."""
    if cum_nBHC is None:
        return None, None, None
    c = cum_nBHC.shape[-1]
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    diff = cum_nBHC[..., :, None] - cum_nBHC[..., None, :]
    rel = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    return jnp.exp(cum_nBHC), rel, jnp.exp(cum_nBHC[..., -1:] - cum_nBHC)


def _decay_before_chunk(cum_nBHC):
    """log of the decay accumulated over all chunks before chunk n: [n, B, H]."""
    chunk_log = cum_nBHC[..., -1]
    return jnp.cumsum(chunk_log, axis=0) - chunk_log


def _chunk_states(contrib_nBHXD, b_end_nBH, reverse: bool = False, init=None):
    """(final, per-chunk) states of S_{n+1} = b_C(n) S_n + contrib_n, S_0 = init (default 0): per chunk, the
    state at its START.  With ``reverse``, the cotangent recursion S_{n-1} = b_C(n) S_n + contrib_n,
    S_{N-1} = init: per chunk, the cotangent of the state at its END.  b_end None: no forgetting."""

    def step(s, x):
        contrib, b_end = x
        return (s if b_end is None else b_end[..., None, None] * s) + contrib, s

    init = jnp.zeros_like(contrib_nBHXD[0]) if init is None else init
    return jax.lax.scan(step, init, (contrib_nBHXD, b_end_nBH), reverse=reverse)


# Chunks per step of the forward-only scan: enough that a group's batched 64 x 64 products and factors hold
# about this many matrices (B * H per chunk), few enough that its temporaries stay in cache.  On a 2-core CPU
# batched 64 x 64 matmuls and factors cost 1.5-1.8x less per matrix at 128-512 matrices than at 1024-2048.
GROUP_MATRICES = 256


def _group_size(n: int, batch_heads: int) -> int:
    """Chunks per group: about GROUP_MATRICES / (B H), at least 1, spread evenly over ceil(n / g) groups."""
    g = max(1, min(n, GROUP_MATRICES // max(1, batch_heads)))
    groups = -(-n // g)
    return -(-n // groups)


def _mesa_group_forward(lam_H, carry, xs, fresh: bool = False):
    """A batch of chunks: the chunk-start states from the carried state, then every chunk's solve and outputs.

    carry = (S = [sum w k k^T | sum w k v^T] [B, H, D, D + V], log of the decay) over all earlier tokens;
    xs = (q, k, v, log gamma or None) [g, B, H, C, ...].  ``fresh``: the batch is the sequence's only chunk
    (carry zero): A_0 = I / lambda and G_0 = 0, so R_0 = lambda I and the chunk-start terms are left out.
    Returns the carry after the batch and (out, residuals of the backward pass: q~, M, R_0 (lambda [H] when
    ``fresh``), G_0^T (None when ``fresh``), scores)."""
    s0, log_beta = carry
    q, k, v, logg = xs
    d = q.shape[-1]
    cum = None if logg is None else jnp.cumsum(logg, axis=-1)  # within-chunk log b_i
    b, rel, to_end = _decay_within(cum)
    # A and G^T at every chunk's start in one recursion: contributions K^T W [K | V] [D, D + V]
    contrib = jnp.einsum("nbhld,nbhle->nbhde", _scale(to_end, k), jnp.concatenate([k, v], axis=-1))
    s_end, s0s = _chunk_states(contrib, None if b is None else b[..., -1], init=s0)
    a0s, g0s_T = (None, None) if fresh else (s0s[..., :d], s0s[..., d:])
    # A_0 = beta I / lambda + the keys' sum, beta = the decay before the chunk
    if cum is None:
        beta = jnp.ones(q.shape[:3], q.dtype)
    else:
        beta = jnp.exp(log_beta + _decay_before_chunk(cum))
        log_beta = log_beta + jnp.sum(cum[..., -1], axis=0)
    if not fresh:
        a0s = a0s + (beta / lam_H)[..., None, None] * jnp.eye(d, dtype=q.dtype)
    q_tilde, m, r0s = _precondition_chunks(q, k, b, a0s, lam_H)
    # out_i = b_i G_0 q~_i + sum_{l <= i} w_il (q~_i . k_l) v_l
    scores = _causal(rel, q_tilde @ jnp.swapaxes(k, -1, -2))
    out = scores @ v if fresh else _scale(b, q_tilde @ g0s_T) + scores @ v
    return (s_end, log_beta), (out, (q_tilde, m, r0s, g0s_T, scores))


def _mesa_chunks_forward(q_nBHCD, k_nBHCD, v_nBHCV, logg_nBHC, lam_H, grouped: bool):
    """Forward pass on chunked inputs [n, B, H, C, ...] (log gamma None: no forgetting).

    ``grouped``: a scan over groups of ``_group_size`` chunks (n a multiple of it), each group batched, so the
    temporaries are a group's and stay in cache; the forward-only path.  Otherwise all chunks at once (the
    custom VJP's forward, whose residuals dominate its memory anyway).  Returns out [n, B, H, C, V], the
    residuals the backward pass reuses ([n, ...]) and the state (A, G) after the last token."""
    n, bsz, h, _, d = q_nBHCD.shape
    dtype = q_nBHCD.dtype
    init = (jnp.zeros((bsz, h, d, d + v_nBHCV.shape[-1]), dtype), jnp.zeros((bsz, h), dtype))
    body = functools.partial(_mesa_group_forward, lam_H, fresh=n == 1)  # T <= C: one chunk from A_0 = I / lambda
    xs = (q_nBHCD, k_nBHCD, v_nBHCV, logg_nBHC)
    if grouped and n > 1:
        g = _group_size(n, bsz * h)
        assert n % g == 0, (n, g)
        grouped_xs = jax.tree_util.tree_map(lambda x: x.reshape((n // g, g) + x.shape[1:]), xs)
        (s_end, log_beta), (out, res) = jax.lax.scan(body, init, grouped_xs)
        out, res = jax.tree_util.tree_map(lambda x: x.reshape((n,) + x.shape[2:]), (out, res))
    else:
        (s_end, log_beta), (out, res) = body(init, xs)
    a_end = s_end[..., :d] + (jnp.exp(log_beta) / lam_H)[..., None, None] * jnp.eye(d, dtype=dtype)
    return out, res, (a_end, jnp.swapaxes(s_end[..., d:], -1, -2))


def _chunked_inputs(q_BTHD, k_BTHD, v_BTHD, logg_BTH, chunk: int):
    """[B, T, H, ...] -> [n, B, H, C, ...], zero-padded to a whole number of the forward's groups of chunks
    (``_group_size``): zero q/k/v and log gamma = 0 change no state.  log gamma None stays None."""
    bsz, t, h = q_BTHD.shape[:3]
    n = -(-t // chunk)
    n = -(-n // _group_size(n, bsz * h)) * _group_size(n, bsz * h)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    return tuple(None if x is None else to_chunks(pad(x), chunk) for x in (q_BTHD, k_BTHD, v_BTHD, logg_BTH))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _mesa_chunked_core(q_BTHD, k_BTHD, v_BTHD, logg_BTH, lam_H, chunk: int, decay: bool):
    """The forward-only path: the grouped scan (no residuals kept).  Without ``decay`` log gamma is ignored."""
    logg = logg_BTH if decay else None
    out = _mesa_chunks_forward(*_chunked_inputs(q_BTHD, k_BTHD, v_BTHD, logg, chunk), lam_H, grouped=True)[0]
    return from_chunks(out, q_BTHD.shape[1])


def _mesa_chunked_core_fwd(q_BTHD, k_BTHD, v_BTHD, logg_BTH, lam_H, chunk: int, decay: bool):
    logg = logg_BTH if decay else None
    out, saved, _ = _mesa_chunks_forward(*_chunked_inputs(q_BTHD, k_BTHD, v_BTHD, logg, chunk), lam_H, grouped=False)
    # the unchunked inputs are kept (no copies); the backward pass re-chunks them
    return from_chunks(out, q_BTHD.shape[1]), (q_BTHD, k_BTHD, v_BTHD, logg_BTH, lam_H, *saved)


def _mesa_chunked_core_bwd(chunk: int, decay: bool, res, d_out_BTHV):
    q, k, v, logg, lam_H, *saved = res
    t = q.shape[1]
    chunked = _chunked_inputs(q, k, v, logg if decay else None, chunk)
    dq, dk, dv, dlogg, dlam = _mesa_chunks_bwd((*chunked, lam_H, *saved), to_chunks(d_out_BTHV, chunk))
    dlogg = jnp.zeros_like(logg) if dlogg is None else from_chunks(dlogg, t)
    return from_chunks(dq, t), from_chunks(dk, t), from_chunks(dv, t), dlogg, dlam


def _mesa_chunks_bwd(res, d_out_nBHCV):
    """Hand-written backward pass: matrix products only, batched over all chunks, reusing the forward's
    Cholesky inverses L^{-1} and chunk states R_0, G_0 (nothing is refactored or rematerialised).

    With out_t = G_t q~_t, q~_t = A_t^{-1} q_t, and u_t = G_t^T dout_t (the cotangent of q~_t):
      dq_t = A_t^{-1} u_t;  the cotangents of A_t and G_t are -dq_t q~_t^T and dout_t q~_t^T, which flow
      back to earlier tokens with the decay weights w:
      dv_l = sum_{t>=l} w_tl (q~_t.k_l) dout_t,
      dk_l = sum_{t>=l} w_tl [(dout_t.v_l) q~_t - (q~_t.k_l) dq_t - (dq_t.k_l) q~_t],
      d lambda = sum_t b_t / lambda^2 (dq_t.q~_t),
      d log gamma_s = sum_{t>=s} [q~_t.u_t - k_t.dk^G_t - dq_t.q_t - k_t.dk^A_t / 2]
    (dk^G, dk^A: the parts of dk from G and from A; the last line differentiates the pair weights
    w_tl = exp(c_t - c_l), c_t = sum_{s<=t} log gamma_s).  log gamma None (no forgetting): d log gamma None.
    """
    q, k, v, logg, lam_H, q_tilde, m, r0s, g0s_T, scores = res
    d_out = d_out_nBHCV
    d = q.shape[-1]
    cum = None if logg is None else jnp.cumsum(logg, axis=-1)
    b, rel, to_end = _decay_within(cum)
    k_T = jnp.swapaxes(k, -1, -2)
    single = g0s_T is None  # the sequence is one chunk: no state before it, none carried after it
    # u_t = G_t^T dout_t and dq_t = A_t^{-1} u_t, all chunks at once
    dout_v_raw = d_out @ jnp.swapaxes(v, -1, -2)  # [i, l] = dout_i.v_l
    dout_v = _causal(rel, dout_v_raw)
    u = dout_v @ k if single else _scale(b, d_out @ jnp.swapaxes(g0s_T, -1, -2)) + dout_v @ k
    dq = _causal_solve(r0s, m, u, b)
    # scores[i, l] = w_il q~_i.k_l (saved by the forward pass)
    dq_k_raw = dq @ k_T  # [i, l] = dq_i.k_l
    scores_T = jnp.swapaxes(scores, -1, -2)
    dv = scores_T @ d_out
    dk = jnp.swapaxes(_causal(rel, dout_v_raw - dq_k_raw), -1, -2) @ q_tilde - scores_T @ dq
    if not single:
        # cotangents of the states at every chunk's end, from the later chunks: [A | G^T] in one recursion
        contrib = jnp.einsum("nbhid,nbhie->nbhde", _scale(b, q_tilde), jnp.concatenate([-dq, d_out], axis=-1))
        _, s_bar = _chunk_states(contrib, None if b is None else b[..., -1], reverse=True)
        a_bar, g_bar_T = s_bar[..., :d], s_bar[..., d:]  # [D, D] and [D, V]
        state_g = v @ jnp.swapaxes(g_bar_T, -1, -2)  # from G after the chunk
        state_a = k @ (a_bar + jnp.swapaxes(a_bar, -1, -2))  # from A after the chunk
        dv = dv + _scale(to_end, k @ g_bar_T)
        dk = dk + _scale(to_end, state_g + state_a)
    if cum is None:
        dlam = jnp.einsum("nbhid,nbhid->h", dq, q_tilde) / lam_H**2
        return dq, dk, dv, None, dlam.astype(lam_H.dtype)
    # k_l.dk^G_l and k_l.dk^A_l without forming dk^G, dk^A: column sums over the pair matrices
    k_dk_g = jnp.sum(dout_v_raw * scores, axis=-2)
    k_dk_a = -2 * jnp.sum(dq_k_raw * scores, axis=-2)
    if not single:
        k_dk_g = k_dk_g + to_end * jnp.sum(k * state_g, axis=-1)
        k_dk_a = k_dk_a + to_end * jnp.sum(k * state_a, axis=-1)
    dc = jnp.sum(q_tilde * u - dq * q, axis=-1) - k_dk_g - 0.5 * k_dk_a  # [n, B, H, C]
    # c_t = sum_{s<=t} log gamma_s over the whole sequence: d log gamma = reverse cumulative sum of dc
    n, bsz, h, c = dc.shape
    dc_flat = jnp.moveaxis(dc, 0, 2).reshape(bsz, h, n * c)
    dlogg = jnp.flip(jnp.cumsum(jnp.flip(dc_flat, -1), -1), -1)
    dlogg = jnp.moveaxis(dlogg.reshape(bsz, h, n, c), 2, 0)
    # b_t over the whole sequence: chunk-local b times the decay of all earlier chunks
    b_global = jnp.exp(_decay_before_chunk(cum)[..., None] + cum)
    dlam = jnp.einsum("nbhi,nbhid,nbhid->h", b_global, dq, q_tilde) / lam_H**2
    return dq, dk, dv, dlogg, dlam.astype(lam_H.dtype)


_mesa_chunked_core.defvjp(_mesa_chunked_core_fwd, _mesa_chunked_core_bwd)


def mesa_chunked(q_BTHD, k_BTHD, v_BTHD, lam_H, gamma_BTH=None, chunk_size: int = 64, return_state: bool = False):
    """Exact chunked parallel form with a hand-written backward pass; T need not be a multiple of C.

    Forward (``_mesa_chunks_forward``): the chunk-boundary states (A, G) by an additive recursion, then
    every chunk's solve and outputs, batched over chunks: a scan over groups of chunks when only the output is
    needed, all chunks at once under differentiation.  Backward (``_mesa_chunks_bwd``): matrix products only,
    reusing the forward's factors.  Stored for the backward pass: q~, M = L^{-1} K R_0 and the in-chunk scores
    (O(T (D + C))) and the chunk states R_0, G_0 (O((T/C) D^2)) per head.  Without forgetting (gamma None) the
    decay factors are left out of the computation rather than multiplied in as ones.
    Returns out [B, T, H, V], and with ``return_state`` also the MesaState after the last token."""
    check_mesa_args(lam_H, gamma_BTH, chunk_size)
    t = q_BTHD.shape[1]
    c = min(chunk_size, t)
    logg_BTH = _log_gamma(gamma_BTH, q_BTHD)
    lam_H = lam_H.astype(q_BTHD.dtype)
    decay = gamma_BTH is not None
    if return_state:
        logg = logg_BTH if decay else None
        out, _, (a_end, g_end) = _mesa_chunks_forward(*_chunked_inputs(q_BTHD, k_BTHD, v_BTHD, logg, c), lam_H,
                                                      grouped=True)
        return from_chunks(out, t), MesaState(spd_inverse(a_end), g_end)
    return _mesa_chunked_core(q_BTHD, k_BTHD, v_BTHD, logg_BTH, lam_H, c, decay)


# ----------------------------------------------------------------------------- recurrent decoding


def mesa_initial_state(batch: int, lam_H, key_size: int, value_size: int, dtype=jnp.float32) -> MesaState:
    """State before the first token: R_0 = lambda I, G_0 = 0."""
    r = _head_identity(lam_H, batch, key_size, dtype)
    return MesaState(r, jnp.zeros((batch, lam_H.shape[0], value_size, key_size), dtype))


def mesa_decode_step(state: MesaState, q_BHD, k_BHD, v_BHV, gamma_BH=None):
    """One token: R <- gamma^{-1}[R - R k k^T R / (gamma + k^T R k)], G <- gamma G + v k^T, out = G R q."""
    r, g = state
    gamma_BH = jnp.ones(q_BHD.shape[:2], q_BHD.dtype) if gamma_BH is None else gamma_BH
    r = _rls_update(r, k_BHD, gamma_BH)
    g = gamma_BH[..., None, None] * g + jnp.einsum("bhv,bhd->bhvd", v_BHV, k_BHD)
    out = jnp.einsum("bhvd,bhd->bhv", g, jnp.einsum("bhij,bhj->bhi", r, q_BHD))
    return MesaState(r, g), out
