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
- ``mesa_chunked``: chunks of C tokens; carries (A, G) between chunks, and inside a chunk gets every
  token's solution from one Cholesky factor of the C x C matrix N = diag(b) + K R_0 K^T, whose leading
  blocks give the causal per-token Woodbury corrections.  Each chunk is rematerialised in the backward
  pass, so gradients store O(T D + (T/C) D^2) per head instead of a D x D matrix per token.
- ``mesa_decode_step``: one token at a time with state (R, G), for generation.
"""

from __future__ import annotations

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


def _chunk(a_BHDD, g_BHVD, q_BHCD, k_BHCD, v_BHCV, logg_BHC, r0_BHDD=None):
    """One chunk of C tokens from the state (A_0, G_0) at its start.

    With c_i = sum_{l<=i} log gamma_l and b_i = exp(c_i) (within the chunk):
      A_i = b_i (A_0 + sum_{l<=i} k_l k_l^T / b_l), so q~_i = A_i^{-1} q_i = p_i / b_i, where by Woodbury
      p_i = R_0 q_i - R_0 K_{<=i}^T N_{<=i}^{-1} K_{<=i} R_0 q_i,  N = diag(b) + K R_0 K^T,  R_0 = A_0^{-1}.
    With N = L L^T (Cholesky), N_{<=i}^{-1} y_{<=i} = L^{-T} mask_i(L^{-1} y): one factor serves every i.
      out_i = b_i G_0 q~_i + sum_{l<=i} (b_i / b_l) v_l k_l^T q~_i
      A_C = b_C A_0 + sum_l (b_C / b_l) k_l k_l^T,   G_C = b_C G_0 + sum_l (b_C / b_l) v_l k_l^T.
    """
    c = q_BHCD.shape[2]
    dtype = q_BHCD.dtype
    cum_BHC = jnp.cumsum(logg_BHC, axis=-1)
    b_BHC = jnp.exp(cum_BHC)
    if r0_BHDD is None:  # R_0 = A_0^{-1}; given for the first chunk (lambda I)
        r0_BHDD = spd_inverse(a_BHDD)
    rq_BHDC = r0_BHDD @ jnp.swapaxes(q_BHCD, -1, -2)  # R_0 Q^T
    rk_BHDC = r0_BHDD @ jnp.swapaxes(k_BHCD, -1, -2)  # R_0 K^T
    n_BHCC = k_BHCD @ rk_BHDC + b_BHC[..., :, None] * jnp.eye(c, dtype=dtype)
    n_BHCC = 0.5 * (n_BHCC + jnp.swapaxes(n_BHCC, -1, -2))
    _, l_inv_BHCC = cholesky_with_inverse(n_BHCC)
    y_BHCC = k_BHCD @ rq_BHDC  # y[l, i] = k_l^T R_0 q_i
    z_BHCC = l_inv_BHCC @ y_BHCC
    z_BHCC = jnp.where(jnp.tril(jnp.ones((c, c), dtype=bool)).T, z_BHCC, 0.0)  # keep rows j <= column i
    w_BHCC = jnp.swapaxes(l_inv_BHCC, -1, -2) @ z_BHCC
    p_BHDC = rq_BHDC - jnp.einsum("bhdl,bhli->bhdi", rk_BHDC, w_BHCC)
    q_tilde_BHCD = jnp.swapaxes(p_BHDC, -1, -2) / b_BHC[..., None]
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    rel_BHCC = jnp.where(causal, jnp.exp(jnp.where(causal, cum_BHC[..., :, None] - cum_BHC[..., None, :], 0.0)), 0.0)
    scores_BHCC = jnp.einsum("bhid,bhld->bhil", q_tilde_BHCD, k_BHCD) * rel_BHCC
    out_BHCV = b_BHC[..., None] * jnp.einsum("bhvd,bhid->bhiv", g_BHVD, q_tilde_BHCD) + jnp.einsum(
        "bhil,bhlv->bhiv", scores_BHCC, v_BHCV
    )
    to_end_BHC = jnp.exp(cum_BHC[..., -1:] - cum_BHC)  # b_C / b_l
    b_end = b_BHC[..., -1, None, None]
    a_new = b_end * a_BHDD + jnp.einsum("bhl,bhld,bhle->bhde", to_end_BHC, k_BHCD, k_BHCD)
    a_new = 0.5 * (a_new + jnp.swapaxes(a_new, -1, -2))
    g_new = b_end * g_BHVD + jnp.einsum("bhl,bhlv,bhld->bhvd", to_end_BHC, v_BHCV, k_BHCD)
    return a_new, g_new, out_BHCV


def mesa_chunked(q_BTHD, k_BTHD, v_BTHD, lam_H, gamma_BTH=None, chunk_size: int = 64, return_state: bool = False):
    """Exact chunked parallel form (see ``_chunk``); T need not be a multiple of ``chunk_size``.

    Returns out [B, T, H, V], and with ``return_state`` also the MesaState after the last token."""
    check_mesa_args(lam_H, gamma_BTH, chunk_size)
    bsz, t, h, d = q_BTHD.shape
    dv = v_BTHD.shape[-1]
    dtype = q_BTHD.dtype
    c = min(chunk_size, t)
    # zero padding to whole chunks: zero keys/values/queries and log gamma = 0 leave the state unchanged
    xs = tuple(to_chunks(x, c) for x in (q_BTHD, k_BTHD, v_BTHD, _log_gamma(gamma_BTH, q_BTHD)))
    a0 = _head_identity(1.0 / lam_H.astype(dtype), bsz, d, dtype)
    g0 = jnp.zeros((bsz, h, dv, d), dtype)

    r0 = _head_identity(lam_H, bsz, d, dtype)
    # the first chunk starts from R_0 = lambda I: no d x d inverse (a sequence of T <= C is one chunk)
    first = jax.checkpoint(lambda a, g, *x: _chunk(a, g, *x, r0_BHDD=r0))
    a1, g1, out_first = first(a0, g0, *(x[0] for x in xs))

    @jax.checkpoint
    def body(carry, x):
        a, g, out = _chunk(*carry, *x)
        return (a, g), out

    if xs[0].shape[0] == 1:
        a_end, g_end, out_nBHCV = a1, g1, out_first[None]
    else:
        (a_end, g_end), out_rest = jax.lax.scan(body, (a1, g1), tuple(x[1:] for x in xs))
        out_nBHCV = jnp.concatenate([out_first[None], out_rest], axis=0)
    out_BTHV = from_chunks(out_nBHCV, t)
    if return_state:
        return out_BTHV, MesaState(spd_inverse(a_end), g_end)
    return out_BTHV


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
