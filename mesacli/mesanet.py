"""The MesaNet op (von Oswald et al. 2025, arXiv 2506.05233): exact chunked solve, conjugate gradient,
recurrent decoding and a sequential reference.

For every batch element and head (D key size, V value size)

    H_t = gamma_t H_{t-1} + beta_t k_t k_t^T,   G_t = gamma_t G_{t-1} + beta_t v_t k_t^T,   H_0, G_0 = 0 or given,
    o_t = G_t (H_t + diag(Lambda))^{-1} q_t,

with Lambda in R^D per head (lam [H, D], > 0, not decayed), beta_t in [0, 1] the input gate and
gamma_t = exp(log_gamma_t) in [0, 1] the forget gate (log_gamma <= 0; log_gamma = -inf, i.e. gamma_t = 0,
and a change of ``segment_ids`` reset the state at token t).  q and k are used as given (a MesaNet layer
L2-normalises them; this op does not).

Shapes: B batch, T time, H heads, D key size, V value size; q, k [B, T, H, D], v [B, T, H, V],
log_gamma, beta [B, T, H], lam [H, D], states H [B, H, D, D], G [B, H, V, D].  Inside, chunks of C
tokens: [n, B, H, C, ...].  Everything is computed in float32 (or float64 for float64 inputs); the output
has the inputs' dtype, the state the compute dtype.

Within a chunk with start states H_c, G_c, token t sees (zeta_t: decay since the chunk start,
zeta_{t,i} = prod_{s=i+1}^{t} gamma_s)

    M_t = zeta_t H_c + sum_{i<=t in chunk} zeta_{t,i} beta_i k_i k_i^T + diag(Lambda),   x_t = M_t^{-1} q_t,
    o_t = zeta_t G_c x_t + sum_{i<=t} zeta_{t,i} beta_i v_i (k_i . x_t)         (G_t is never formed),

and the chunk states follow the additive recursion H_{c+1} = zeta_C H_c + sum_i zeta_{C,i} beta_i k_i k_i^T.

Solvers (``mesanet(..., solver=...)``):
- "exact": M_t formed per token inside one chunk at a time (lax.map over chunks, O(C D^2) memory per head)
  by the rank-one recursion from the chunk's start state, and solved by a Cholesky factorisation written in
  plain XLA ops (``spd_solve`` on ``mesa.cholesky_with_inverse``; jaxlib's CPU LAPACK kernels can deadlock
  inside scans).  Cost per token and head: D^2 to form M_t + about D^3 / 2 for the factor and the
  substitutions (formerly C D^2 by one matmul + 2 D^3 / 3 with the whole inverse: about 1.5x slower on CPU).
- "cg": Jacobi-preconditioned conjugate gradient, all queries of all chunks in parallel in one
  lax.while_loop, x_0 = 0, stopping per query at ||r|| <= cg_tol ||q|| (at most cg_max_steps, default
  10 D, steps).  The matvec M_t p = zeta_t H_c p + sum_i zeta_{t,i} beta_i k_i (k_i . p) + Lambda p never
  forms M_t.  Converged queries are frozen by masks (no epsilon in any denominator).
  ``mesanet_cg_stats`` reports steps and final residuals.
- "cg_fixed": the approximate baseline: exactly cg_max_steps (default 30) Jacobi-preconditioned CG steps
  from x_0 = 0 with 1e-5 added to both CG denominators, no tolerance.

Gradients (all solvers) by the implicit-function theorem, in one custom VJP: with o_t = G_t x_t,
M_t x_t = q_t and the output cotangent o^_t,

    x^_t = G_t^T o^_t,   y_t = M_t^{-1} x^_t  (a second solve by the same solver; M_t is symmetric),
    q^_t = y_t,   and the cotangents of G_t and M_t are o^_t x_t^T and -y_t x_t^T,

which reach k, v, beta, log_gamma, Lambda and the initial state through the (differentiable, linear
attention-like) map (H_t, G_t) -> (H_t x_t, G_t x_t) with x, y held fixed: the backward pass
differentiates sum_t [o^_t . G_t x_t - y_t . (H_t + diag Lambda) x_t] (``_surrogate``).  Nothing is
differentiated through the Cholesky factor or the CG iterations.  Stored from the forward pass: the
inputs and x (O(T D) per head); the backward pass recomputes the decays and chunk-start states
((T / C) D^2) and, for "exact", refactors M_t chunk by chunk: never a D x D matrix per token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mesacli.layers import from_chunks, to_chunks
from mesacli.mesa import LEAF, cholesky_with_inverse

SOLVERS = ("exact", "cg", "cg_fixed")
CG_FIXED_STEPS = 30  # default steps of solver "cg_fixed"
CG_FIXED_EPS = 1e-5  # added to both CG denominators by solver "cg_fixed"
CG_STEPS_PER_KEY_DIM = 10  # default cap of solver "cg": 10 D steps


class MesaNetState(NamedTuple):
    """Recurrent state of one MesaNet op: H = sum of decayed beta k k^T [B, H, D, D] and G [B, H, V, D]
    (Lambda is not part of the state)."""

    h_BHDD: jax.Array
    g_BHVD: jax.Array


class MesaNetCGStats(NamedTuple):
    """Per query (token) of a CG forward solve: steps taken, the final relative residual
    ||q_t - M_t x_t|| / ||q_t|| recomputed from x (0 where q_t = 0), and whether the CG residual reached
    the tolerance within the cap (always True for "cg_fixed", which has no tolerance)."""

    steps_BTH: jax.Array
    residual_BTH: jax.Array
    converged_BTH: jax.Array


class _Config(NamedTuple):  # static solver settings (hashable, passed as a non-differentiable argument)
    solver: str
    tol: float
    max_steps: int


# ----------------------------------------------------------------------------- arguments


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _values(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def check_mesanet_args(
    q_BTHD,
    k_BTHD,
    v_BTHV,
    log_gamma_BTH,
    beta_BTH,
    lam_HD,
    solver: str = "exact",
    chunk_size: Optional[int] = None,
    cg_tol: Optional[float] = None,
    cg_max_steps: Optional[int] = None,
    initial_state: Optional[MesaNetState] = None,
    segment_ids=None,
) -> None:
    """Clear ValueErrors for bad arguments; values are checked only where known outside of a trace."""
    if solver not in SOLVERS:
        raise ValueError(f"mesanet solver must be one of {SOLVERS}, got {solver!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
    ):
        raise ValueError(f"mesanet chunk size must be a positive integer, got {chunk_size!r}")
    if cg_tol is not None and not (isinstance(cg_tol, (int, float, np.floating)) and cg_tol > 0):
        raise ValueError(f"mesanet cg_tol must be a positive number, got {cg_tol!r}")
    if cg_max_steps is not None and (
        isinstance(cg_max_steps, bool) or not isinstance(cg_max_steps, (int, np.integer)) or cg_max_steps < 1
    ):
        raise ValueError(f"mesanet cg_max_steps must be a positive integer, got {cg_max_steps!r}")
    if len(q_BTHD.shape) != 4:
        raise ValueError(f"mesanet q must have shape [B, T, H, D], got {tuple(q_BTHD.shape)}")
    b, t, h, d = q_BTHD.shape
    expected = {
        "k": (k_BTHD, (b, t, h, d)),
        "log_gamma": (log_gamma_BTH, (b, t, h)),
        "beta": (beta_BTH, (b, t, h)),
        "lam": (lam_HD, (h, d)),
    }
    if len(v_BTHV.shape) != 4 or tuple(v_BTHV.shape[:3]) != (b, t, h):
        raise ValueError(f"mesanet v must have shape [B, T, H, V] = [{b}, {t}, {h}, V], got {tuple(v_BTHV.shape)}")
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"mesanet {name} must have shape {list(shape)} (from q {list(q_BTHD.shape)}), "
                             f"got {list(x.shape)}")
    if initial_state is not None:
        hs, gs = (tuple(x.shape) for x in initial_state)
        if hs != (b, h, d, d) or gs != (b, h, v_BTHV.shape[-1], d):
            raise ValueError(f"mesanet initial_state must have shapes H {[b, h, d, d]} and G "
                             f"{[b, h, v_BTHV.shape[-1], d]}, got {list(hs)} and {list(gs)}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"mesanet segment_ids must have shape [B, T] = {[b, t]}, got {list(segment_ids.shape)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"mesanet segment_ids must be integers, got dtype {segment_ids.dtype}")
    _check_values(log_gamma_BTH, beta_BTH, lam_HD)


def _check_values(log_gamma, beta, lam_HD) -> None:
    if _is_concrete(lam_HD):
        lam = _values(lam_HD)
        if not bool(np.all(lam > 0)):  # also catches NaN
            raise ValueError(f"mesanet lam (Lambda) must be positive, got {_value_range(lam)}")
    if _is_concrete(log_gamma):
        g = _values(log_gamma)
        if not bool(np.all(g <= 0)):
            raise ValueError("mesanet log_gamma must be <= 0 (forget gate gamma = exp(log_gamma) in [0, 1]; -inf "
                             f"resets the state), got {_value_range(g)}")
    if _is_concrete(beta):
        be = _values(beta)
        if not bool(np.all((be >= 0) & (be <= 1))):
            raise ValueError(f"mesanet beta (input gate) must lie in [0, 1], got {_value_range(be)}")


def _value_range(x: np.ndarray) -> str:
    finite = x[~np.isnan(x)]
    text = f"values in [{finite.min()}, {finite.max()}]" if finite.size else "no numbers"
    return text + (" and NaN" if finite.size < x.size else "")


def _compute_dtype(*xs):
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# ----------------------------------------------------------------------------- chunk primitives


def _chunk_decays(logg_nBHC, reset_nBHC):
    """rel[t, i] = zeta_{t,i} = prod_{s=i+1}^{t} gamma_s for i <= t inside a chunk (0 above the diagonal or
    across a reset) and b[t] = zeta_t = prod_{s=start}^{t} gamma_s (0 after a reset in the chunk).

    Resets (gamma = 0) are a separate 0/1 mask, never a log of 0: segment numbers inside the chunk
    (cumulative reset counts) decide which pairs are connected; log_gamma is finite everywhere."""
    c = logg_nBHC.shape[-1]
    cum = jnp.cumsum(logg_nBHC, axis=-1)
    seg = jnp.cumsum(reset_nBHC, axis=-1)
    connected = jnp.tril(jnp.ones((c, c), dtype=bool)) & (seg[..., :, None] == seg[..., None, :])
    rel = jnp.where(connected, jnp.exp(jnp.where(connected, cum[..., :, None] - cum[..., None, :], 0.0)), 0.0)
    b = jnp.where(seg == 0, jnp.exp(cum), 0.0)
    return rel, b


def _chunk_states(dot_nBHCY, out_nBHCX, beta_nBHC, rel_nBHCC, b_nBHC, s0_BHXY):
    """States at the start of every chunk [n, B, H, X, Y] and after the last one [B, H, X, Y] of
    S_{c+1} = zeta_C S_c + sum_i zeta_{C,i} beta_i out_i dot_i^T, S_0 = s0 (H: dot = out = k; G: out = v)."""
    w_nBHC = rel_nBHCC[..., -1, :] * beta_nBHC
    contrib = jnp.einsum("nbhl,nbhlx,nbhly->nbhxy", w_nBHC, out_nBHCX, dot_nBHCY)

    def step(s, xs):
        contrib, b_end = xs
        return b_end[..., None, None] * s + contrib, s

    s_end, s_start = jax.lax.scan(step, s0_BHXY, (contrib, b_nBHC[..., -1]))
    return s_start, s_end


def _apply_states(s_start_nBHXY, dot_nBHCY, out_nBHCX, beta_nBHC, rel_nBHCC, b_nBHC, p_nBHCY):
    """S_t p_t = zeta_t S_c p_t + sum_{i<=t} zeta_{t,i} beta_i out_i (dot_i . p_t) for every token."""
    scores = rel_nBHCC * beta_nBHC[..., None, :] * (p_nBHCY @ jnp.swapaxes(dot_nBHCY, -1, -2))
    return b_nBHC[..., None] * jnp.einsum("nbhxy,nbhty->nbhtx", s_start_nBHXY, p_nBHCY) + scores @ out_nBHCX


def _lam(lam_HD):
    return lam_HD[:, None, :]  # broadcasts against [n, B, H, C, D]


def _matvec(h_start, k, beta, rel, b, lam_HD, p):
    """M_t p_t without forming M_t."""
    return _apply_states(h_start, k, k, beta, rel, b, p) + _lam(lam_HD) * p


# ----------------------------------------------------------------------------- solvers


def spd_solve(m_XNN, rhs_XN):
    """x = m^{-1} rhs for a batch of SPD matrices: one 2 x 2 block step of ``mesa.cholesky_with_inverse`` (whose
    L_a^{-1}, L_d^{-1} of the halves it uses) and block substitutions, never the whole L^{-1} (about a third of the
    factor-and-invert work saved).  With L = [[L_a, 0], [X, L_d]], X = m_da L_a^{-T}:

        y_a = L_a^{-1} rhs_a,  y_d = L_d^{-1} (rhs_d - X y_a),  x_d = L_d^{-T} y_d,  x_a = L_a^{-T} (y_a - X^T x_d)."""
    n = m_XNN.shape[-1]
    mv = lambda a, v: jnp.einsum("...ij,...j->...i", a, v)  # noqa: E731
    mtv = lambda a, v: jnp.einsum("...ji,...j->...i", a, v)  # noqa: E731
    if n <= LEAF:
        _, l_inv = cholesky_with_inverse(m_XNN)
        return mtv(l_inv, mv(l_inv, rhs_XN))
    h = n // 2
    _, la_inv = cholesky_with_inverse(m_XNN[..., :h, :h])
    x = m_XNN[..., h:, :h] @ jnp.swapaxes(la_inv, -1, -2)
    _, ld_inv = cholesky_with_inverse(m_XNN[..., h:, h:] - x @ jnp.swapaxes(x, -1, -2))
    y_a = mv(la_inv, rhs_XN[..., :h])
    x_d = mtv(ld_inv, mv(ld_inv, rhs_XN[..., h:] - mv(x, y_a)))
    return jnp.concatenate([mtv(la_inv, y_a - mtv(x, x_d)), x_d], axis=-1)


def _exact_solve(h_start, k, beta, rel, b, lam_HD, rhs):
    """x_t = M_t^{-1} rhs_t: per chunk (lax.map), M_t formed for its C tokens by the recursion
    M_t - Lambda = gamma_t (M_{t-1} - Lambda) + beta_t k_t k_t^T from H_c (D^2 per token, not C D^2; gamma_t =
    zeta_{t,t-1}, and zeta_0 for the first token, so 0 at a reset) and solved by ``spd_solve``."""
    lam_diag = lam_HD[:, :, None] * jnp.eye(k.shape[-1], dtype=k.dtype)  # [H, D, D]

    def one_chunk(xs):
        h_BHDD, k_BHCD, beta_BHC, rel_BHCC, b_BHC, rhs_BHCD = xs
        gamma_BHC = jnp.concatenate([b_BHC[..., :1], jnp.diagonal(rel_BHCC, offset=-1, axis1=-2, axis2=-1)], -1)

        def step(s_BHDD, x):
            k_BHD, beta_BH, gamma_BH = x
            s_BHDD = gamma_BH[..., None, None] * s_BHDD + beta_BH[..., None, None] * (k_BHD[..., :, None]
                                                                                     * k_BHD[..., None, :])
            return s_BHDD, s_BHDD

        xs = tuple(jnp.moveaxis(x, 2, 0) for x in (k_BHCD, beta_BHC, gamma_BHC))
        _, s_CBHDD = jax.lax.scan(step, 0.5 * (h_BHDD + jnp.swapaxes(h_BHDD, -1, -2)), xs)  # symmetric throughout
        return jnp.moveaxis(spd_solve(s_CBHDD + lam_diag, jnp.moveaxis(rhs_BHCD, 2, 0)), 0, 2)

    return jax.lax.map(one_chunk, (h_start, k, beta, rel, b, rhs))


def _jacobi_diagonal(h_start, k, beta, rel, b, lam_HD):
    """diag(M_t) = zeta_t diag(H_c) + sum_i zeta_{t,i} beta_i k_i^2 + Lambda  (>= Lambda > 0)."""
    h_diag = jnp.diagonal(h_start, axis1=-2, axis2=-1)  # [n, B, H, D]
    return b[..., None] * h_diag[..., None, :] + (rel * beta[..., None, :]) @ (k * k) + _lam(lam_HD)


def _cg_solve(h_start, k, beta, rel, b, lam_HD, rhs, config: _Config):
    """Jacobi-preconditioned CG for every token's M_t x_t = rhs_t at once.  Returns (x, steps, cg_converged).

    "cg": queries stop (are frozen by masks) once ||r|| <= tol ||rhs||, at most max_steps steps, no epsilon.
    "cg_fixed": exactly max_steps steps, 1e-5 added to the denominators p.Mp and r.z."""
    matvec = functools.partial(_matvec, h_start, k, beta, rel, b, lam_HD)
    inv_diag = 1.0 / _jacobi_diagonal(h_start, k, beta, rel, b, lam_HD)
    dot = lambda a, c: jnp.sum(a * c, axis=-1)  # noqa: E731
    x = jnp.zeros_like(rhs)
    z = inv_diag * rhs
    init = (x, rhs, z, dot(rhs, z))
    if config.solver == "cg_fixed":

        def fixed_step(_, carry):
            x, r, p, rz = carry
            ap = matvec(p)
            alpha = rz / (dot(p, ap) + CG_FIXED_EPS)
            x = x + alpha[..., None] * p
            r = r - alpha[..., None] * ap
            z = inv_diag * r
            rz_new = dot(r, z)
            p = z + (rz_new / (rz + CG_FIXED_EPS))[..., None] * p
            return x, r, p, rz_new

        x = jax.lax.fori_loop(0, config.max_steps, fixed_step, init)[0]
        steps = jnp.full(rhs.shape[:-1], config.max_steps, jnp.int32)
        return x, steps, jnp.ones(rhs.shape[:-1], bool)

    threshold = config.tol * jnp.linalg.norm(rhs, axis=-1)
    active = jnp.linalg.norm(rhs, axis=-1) > threshold  # False for rhs = 0: x = 0 is exact
    steps = jnp.zeros(rhs.shape[:-1], jnp.int32)

    def cond(carry):
        i, *_, active = carry
        return (i < config.max_steps) & jnp.any(active)

    def body(carry):
        i, x, r, p, rz, steps, active = carry
        ap = matvec(p)
        p_ap = dot(p, ap)  # > 0 for an active query (p != 0, M SPD)
        alpha = jnp.where(active, rz / jnp.where(active, p_ap, 1.0), 0.0)
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * ap
        z = inv_diag * r
        rz_new = dot(r, z)
        beta_cg = jnp.where(active, rz_new / jnp.where(active, rz, 1.0), 0.0)
        p = jnp.where(active[..., None], z + beta_cg[..., None] * p, p)
        rz = jnp.where(active, rz_new, rz)
        steps = steps + active.astype(jnp.int32)
        active = active & (jnp.linalg.norm(r, axis=-1) > threshold)
        return i + 1, x, r, p, rz, steps, active

    _, x, _, _, _, steps, active = jax.lax.while_loop(cond, body, (0, *init, steps, active))
    return x, steps, ~active


def _solve(config: _Config, h_start, k, beta, rel, b, lam_HD, rhs):
    if config.solver == "exact":
        x = _exact_solve(h_start, k, beta, rel, b, lam_HD, rhs)
        return x, jnp.zeros(rhs.shape[:-1], jnp.int32), jnp.ones(rhs.shape[:-1], bool)
    return _cg_solve(h_start, k, beta, rel, b, lam_HD, rhs, config)


# ----------------------------------------------------------------------------- core with implicit gradients


def _decays_and_states(reset, k, v, logg, beta, h0, g0):
    """Within-chunk decays (rel, b), the chunk-start states H_c, G_c and the final states H_end, G_end."""
    rel, b = _chunk_decays(logg, reset)
    h_start, h_end = _chunk_states(k, k, beta, rel, b, h0)
    g_start, g_end = _chunk_states(k, v, beta, rel, b, g0)
    return rel, b, h_start, g_start, h_end, g_end


def _forward(config: _Config, q, k, v, logg, reset, beta, lam_HD, h0, g0):
    """Chunked forward on [n, B, H, C, ...] inputs: (o, H_end, G_end), x and the CG statistics."""
    rel, b, h_start, g_start, h_end, g_end = _decays_and_states(reset, k, v, logg, beta, h0, g0)
    x, steps, converged = _solve(config, h_start, k, beta, rel, b, lam_HD, q)
    o = _apply_states(g_start, k, v, beta, rel, b, x)
    return (o, h_end, g_end), (x, h_start, rel, b, steps, converged)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mesanet_core(config: _Config, q, k, v, logg, reset, beta, lam_HD, h0, g0):
    return _forward(config, q, k, v, logg, reset, beta, lam_HD, h0, g0)[0]


def _mesanet_core_fwd(config: _Config, q, k, v, logg, reset, beta, lam_HD, h0, g0):
    outs, (x, *_) = _forward(config, q, k, v, logg, reset, beta, lam_HD, h0, g0)
    # residuals O(T D) per head: the inputs and x; decays and chunk states are recomputed backward
    return outs, (q, k, v, logg, reset, beta, lam_HD, h0, g0, x)


def _surrogate(x, y, o_bar, k, v, beta, lam_HD, rel, b, h_start, g_start):
    """sum_t [o^_t . G_t x_t - y_t . (H_t + diag Lambda) x_t] with x, y fixed, as a function of the chunk
    states and decays: its gradient, chained with that of the states, is the loss's (module docstring)."""
    mx = _matvec(h_start, k, beta, rel, b, lam_HD, x)
    gx = _apply_states(g_start, k, v, beta, rel, b, x)
    return jnp.sum(o_bar * gx) - jnp.sum(y * mx)


def _mesanet_core_bwd(config: _Config, res, cotangents):
    q, k, v, logg, reset, beta, lam_HD, h0, g0, x = res
    o_bar, h_end_bar, g_end_bar = cotangents
    states, states_vjp = jax.vjp(functools.partial(_decays_and_states, reset), k, v, logg, beta, h0, g0)
    rel, b, h_start, g_start, _, _ = states
    # x^_t = G_t^T o^_t (linear attention with the roles of k and v swapped), then y_t = M_t^{-1} x^_t
    x_bar = _apply_states(jnp.swapaxes(g_start, -1, -2), v, k, beta, rel, b, o_bar)
    y, _, _ = _solve(config, h_start, k, beta, rel, b, lam_HD, x_bar)
    _, surrogate_vjp = jax.vjp(functools.partial(_surrogate, x, y, o_bar), k, v, beta, lam_HD, rel, b, h_start,
                               g_start)
    dk, dv, dbeta, dlam, drel, db, dh_start, dg_start = surrogate_vjp(jnp.ones((), x.dtype))
    dk2, dv2, dlogg, dbeta2, dh0, dg0 = states_vjp((drel, db, dh_start, dg_start, h_end_bar, g_end_bar))
    return y, dk + dk2, dv + dv2, dlogg, jnp.zeros_like(reset), dbeta + dbeta2, dlam, dh0, dg0


_mesanet_core.defvjp(_mesanet_core_fwd, _mesanet_core_bwd)


# ----------------------------------------------------------------------------- public API


def mesanet_initial_state(batch: int, heads: int, key_size: int, value_size: int, dtype=jnp.float32) -> MesaNetState:
    """H_0 = 0 [B, H, D, D], G_0 = 0 [B, H, V, D]."""
    return MesaNetState(jnp.zeros((batch, heads, key_size, key_size), dtype),
                        jnp.zeros((batch, heads, value_size, key_size), dtype))


def _segment_starts(segment_ids_BT):
    """True where a new segment starts (the id differs from the previous token's; never at t = 0)."""
    change = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def _resets(log_gamma_BTH, segment_ids):
    """(finite log gamma, 0/1 reset mask) [B, T, H]: reset at log_gamma = -inf and where segment_ids change."""
    reset = jnp.isneginf(log_gamma_BTH)
    if segment_ids is not None:
        reset = reset | _segment_starts(segment_ids)[:, :, None]
    return jnp.where(reset, 0.0, log_gamma_BTH), reset.astype(log_gamma_BTH.dtype)


def _prepare(q, k, v, log_gamma, beta, lam_HD, chunk_size, initial_state, segment_ids):
    """Upcast, resets, chunking (zero padding: beta = 0, gamma = 1, no reset: no state changes)."""
    dt = _compute_dtype(q, k, v, log_gamma, beta, lam_HD)
    q, k, v, log_gamma, beta = (x.astype(dt) for x in (q, k, v, log_gamma, beta))
    logg, reset = _resets(log_gamma, segment_ids)
    bsz, t, h, d = q.shape
    c = min(chunk_size, t)
    if initial_state is None:
        initial_state = mesanet_initial_state(bsz, h, d, v.shape[-1], dt)
    h0, g0 = (s.astype(dt) for s in initial_state)
    chunked = tuple(to_chunks(x, c) for x in (q, k, v, logg, reset, beta))
    return (*chunked, lam_HD.astype(dt), h0, g0)


def _config(solver: str, cg_tol: float, cg_max_steps: Optional[int], d: int) -> _Config:
    if cg_max_steps is None:
        cg_max_steps = CG_FIXED_STEPS if solver == "cg_fixed" else CG_STEPS_PER_KEY_DIM * d
    return _Config(solver, float(cg_tol), int(cg_max_steps))


def mesanet(
    q_BTHD,
    k_BTHD,
    v_BTHV,
    log_gamma_BTH,
    beta_BTH,
    lam_HD,
    *,
    solver: str = "exact",
    chunk_size: int = 64,
    cg_tol: float = 1e-4,
    cg_max_steps: Optional[int] = None,
    initial_state: Optional[MesaNetState] = None,
    return_state: bool = False,
    segment_ids=None,
):
    """o_t = G_t (H_t + diag Lambda)^{-1} q_t for every token (module docstring), chunks of ``chunk_size``.

    solver: "exact" (chunked Cholesky), "cg" (preconditioned CG to ||r|| <= cg_tol ||q||, at most
    cg_max_steps, default 10 D, steps) or "cg_fixed" (cg_max_steps, default 30, steps; the approximate
    baseline).  initial_state: MesaNetState to continue from (chunked prefill); segment_ids [B, T] int:
    packed sequences, the state resets where the id changes.  T need not be a multiple of chunk_size.
    Gradients: implicit (a second solve), for every input including lam, beta, log_gamma and
    initial_state.  Returns o [B, T, H, V] in the inputs' dtype, and with ``return_state`` also the
    MesaNetState after the last token (compute dtype).  CG statistics: ``mesanet_cg_stats``."""
    check_mesanet_args(q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD, solver, chunk_size, cg_tol,
                       cg_max_steps, initial_state, segment_ids)
    out_dtype = jnp.result_type(q_BTHD, k_BTHD, v_BTHV)
    t = q_BTHD.shape[1]
    args = _prepare(q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD, chunk_size, initial_state, segment_ids)
    config = _config(solver, cg_tol, cg_max_steps, q_BTHD.shape[-1])
    o, h_end, g_end = _mesanet_core(config, *args)
    o_BTHV = from_chunks(o, t).astype(out_dtype)
    return (o_BTHV, MesaNetState(h_end, g_end)) if return_state else o_BTHV


def mesanet_cg_stats(
    q_BTHD,
    k_BTHD,
    v_BTHV,
    log_gamma_BTH,
    beta_BTH,
    lam_HD,
    *,
    solver: str = "cg",
    chunk_size: int = 64,
    cg_tol: float = 1e-4,
    cg_max_steps: Optional[int] = None,
    initial_state: Optional[MesaNetState] = None,
    segment_ids=None,
) -> MesaNetCGStats:
    """The CG statistics of ``mesanet(..., solver=solver)``'s forward solve with the same arguments (it runs
    the forward again; not differentiable): steps per query, the final relative residual
    ||q_t - M_t x_t|| / ||q_t|| and whether the CG residual reached cg_tol within cg_max_steps."""
    if solver not in ("cg", "cg_fixed"):
        raise ValueError(f"mesanet_cg_stats needs solver 'cg' or 'cg_fixed', got {solver!r}")
    check_mesanet_args(q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD, solver, chunk_size, cg_tol,
                       cg_max_steps, initial_state, segment_ids)
    t = q_BTHD.shape[1]
    args = _prepare(q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD, chunk_size, initial_state, segment_ids)
    q, k, _, _, _, beta, lam, *_ = args
    _, (x, h_start, rel, b, steps, converged) = _forward(_config(solver, cg_tol, cg_max_steps, q.shape[-1]), *args)
    r = q - _matvec(h_start, k, beta, rel, b, lam, x)
    q_norm = jnp.linalg.norm(q, axis=-1)
    residual = jnp.where(q_norm > 0, jnp.linalg.norm(r, axis=-1) / jnp.where(q_norm > 0, q_norm, 1.0), 0.0)
    return MesaNetCGStats(*(from_chunks(s, t) for s in (steps, residual, converged)))


def mesanet_decode_step(state: MesaNetState, q_BHD, k_BHD, v_BHV, log_gamma_BH, beta_BH, lam_HD):
    """One token: H <- gamma H + beta k k^T, G <- gamma G + beta v k^T, o = G (H + diag Lambda)^{-1} q.

    Returns (o [B, H, V] in the inputs' dtype, new MesaNetState in the compute dtype); the solve is a
    plain-XLA Cholesky (``spd_solve``, safe inside a generation scan)."""
    _check_values(log_gamma_BH, beta_BH, lam_HD)
    out_dtype = jnp.result_type(q_BHD, k_BHD, v_BHV)
    dt = _compute_dtype(q_BHD, k_BHD, v_BHV, log_gamma_BH, beta_BH, lam_HD, *state)
    q, k, v, logg, beta, lam = (x.astype(dt) for x in (q_BHD, k_BHD, v_BHV, log_gamma_BH, beta_BH, lam_HD))
    gamma = jnp.exp(logg)[..., None, None]  # exp(-inf) = 0: a reset
    h = gamma * state.h_BHDD.astype(dt) + beta[..., None, None] * jnp.einsum("bhd,bhe->bhde", k, k)
    g = gamma * state.g_BHVD.astype(dt) + beta[..., None, None] * jnp.einsum("bhv,bhd->bhvd", v, k)
    m = h + lam[..., None] * jnp.eye(q.shape[-1], dtype=dt)
    x = spd_solve(0.5 * (m + jnp.swapaxes(m, -1, -2)), q)
    return jnp.einsum("bhvd,bhd->bhv", g, x).astype(out_dtype), MesaNetState(h, g)


def mesanet_reference(
    q_BTHD,
    k_BTHD,
    v_BTHV,
    log_gamma_BTH,
    beta_BTH,
    lam_HD,
    *,
    initial_state: Optional[MesaNetState] = None,
    segment_ids=None,
    return_state: bool = False,
):
    """The definition, plainly: a lax.scan over tokens for H_t, G_t, then o_t = G_t (H_t + diag Lambda)^{-1} q_t
    by jnp.linalg.solve for every token (outside the scan; O(T D^2) memory).  A slow reference, e.g. in
    float64; differentiable by ordinary autodiff."""
    check_mesanet_args(q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD,
                       initial_state=initial_state, segment_ids=segment_ids)
    out_dtype = jnp.result_type(q_BTHD, k_BTHD, v_BTHV)
    dt = _compute_dtype(q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD)
    q, k, v, logg, beta, lam = (x.astype(dt) for x in (q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD))
    gamma = jnp.exp(logg)
    if segment_ids is not None:
        gamma = jnp.where(_segment_starts(segment_ids)[:, :, None], 0.0, gamma)
    bsz, _, h, d = q.shape
    if initial_state is None:
        initial_state = mesanet_initial_state(bsz, h, d, v.shape[-1], dt)

    def step(state, xs):
        k_t, v_t, gamma_t, beta_t = xs
        g_t = gamma_t[..., None, None]
        w_t = beta_t[..., None, None]
        hs = g_t * state[0] + w_t * jnp.einsum("bhd,bhe->bhde", k_t, k_t)
        gs = g_t * state[1] + w_t * jnp.einsum("bhv,bhd->bhvd", v_t, k_t)
        return (hs, gs), (hs, gs)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (k, v, gamma, beta))
    (h_end, g_end), (h_T, g_T) = jax.lax.scan(step, tuple(s.astype(dt) for s in initial_state), xs)
    m_T = h_T + lam[..., None] * jnp.eye(d, dtype=dt)  # [T, B, H, D, D]
    x_T = jnp.linalg.solve(m_T, jnp.moveaxis(q, 1, 0)[..., None])[..., 0]
    o = jnp.moveaxis(jnp.einsum("tbhvd,tbhd->tbhv", g_T, x_T), 0, 1).astype(out_dtype)
    return (o, MesaNetState(h_end, g_end)) if return_state else o


# ----------------------------------------------------------------------------- benchmark helper


def error_vs_cg_steps(q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD, steps=(1, 2, 4, 8, 16, 30, 64),
                      chunk_size: int = 64) -> dict:
    """{steps: max_t ||o_t - o_t^exact|| / max_t ||o_t^exact||} for solver "cg_fixed", against "exact" (float32
    both): how many fixed CG steps an input needs.  E.g. the ill-conditioned case of tests/test_mesanet.py
    gives {10: 1.0, 30: 6e-2, 100: 1e-2, 300: 6e-3}."""
    check_mesanet_args(q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD, chunk_size=chunk_size)
    args = (q_BTHD, k_BTHD, v_BTHV, log_gamma_BTH, beta_BTH, lam_HD)
    run = jax.jit(mesanet, static_argnames=("solver", "cg_max_steps", "chunk_size"))
    exact = np.asarray(run(*args, chunk_size=chunk_size), np.float64)
    scale = np.max(np.linalg.norm(exact, axis=-1))
    out = {}
    for n in steps:
        approx = np.asarray(run(*args, solver="cg_fixed", cg_max_steps=int(n), chunk_size=chunk_size), np.float64)
        out[int(n)] = float(np.max(np.linalg.norm(approx - exact, axis=-1)) / scale)
    return out
