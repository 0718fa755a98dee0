"""The MesaNet block of ``mesacli lm`` (layer kind ``mesanet``): the MesaNet op (``mesacli.mesanet``, von Oswald
et al. 2025, arXiv 2506.05233) with the projections, short convolutions, gates and output norm around it, with
the semantics of flash-linear-attention's MesaNet layer.

For the block input x_t [E] (the LayerNormed residual stream) and every head (sigma the logistic function,
K = ``CONV_SIZE`` taps, D the key = value size per head):

    q~_t = W_q x_t,   k~_t = W_k x'_t,   v_t = W_v x_t             [H, D]   (x' = x, or x_{t-1} with the key shift)
    q_t = L2(SiLU(sum_{i<K} c^q_i * q~_{t-K+1+i})),   k_t = L2(SiLU(sum_{i<K} c^k_i * k~_{t-K+1+i}))
                                             (causal depthwise convolutions, q~_t = k~_t = 0 for t < 0; none on v)
    beta_t = sigma(w_beta . x_t + b_beta),   log gamma_t = log sigma(w_gamma . x_t + b_gamma)     [H]
    Lambda = softplus(p) + LAMBDA_LOWER_BOUND                                                     [H, D]
    H_t = gamma_t H_{t-1} + beta_t k_t k_t^T,   G_t = gamma_t G_{t-1} + beta_t v_t k_t^T   (H_{-1} = G_{-1} = 0)
    o_t = G_t (H_t + diag Lambda)^{-1} q_t                                                (the ``mesanet`` op)
    y_t = W_o [RMSNorm(o_t) * s * SiLU(W_g x_t)]       (output_gate False: y_t = W_o [RMSNorm(o_t) * s])

RMSNorm over D per head (eps ``NORM_EPS``), its scale s [D] shared by the heads (fla's gated RMSNorm, activation
"swish" = SiLU, normalise then gate).  Initialisation as fla's: matrices and convolution taps N(0, std^2) (W_o:
res_std, it feeds the residual stream), biases 0, s = 1, p = softplus^{-1}(1 - 0.25) so that Lambda = 1.
p is stored flat [H D] (like fla's lambda_params), so that AdamW's decay-on-matrices mask leaves it alone.

Recurrent decoding (``decode_step``) keeps per block the pre-convolution q~, k~ of the last K - 1 tokens and the
op's (H, G) state: constant memory per token.

Shapes: B batch, T time, E embedding, H heads, D key/value size, K convolution taps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mesacli.mesanet import MesaNetState, mesanet, mesanet_decode_step, mesanet_initial_state
from mesacli.model import l2_normalise, normal_init

Params = dict[str, Any]

CONV_SIZE = 4  # taps of the short causal convolutions on q and k
LAMBDA_LOWER_BOUND = 0.25  # Lambda = softplus(p) + 0.25 > 0.25
LAMBDA_INIT = 1.0
NORM_EPS = 1e-5


def init(key: jax.Array, embed_dim: int, num_heads: int, key_size: int, *, std: float = 0.02,
         res_std: Optional[float] = None, output_gate: bool = True) -> Params:
    """The block's attention parameters (module docstring): w_q, w_k, w_v, w_g [E, H, D], w_o [H, D, E],
    conv_q, conv_k [K, H, D], w_beta, w_gamma [E, H], b_beta, b_gamma [H], lam_p [H D], norm_scale [D]."""
    e, h, d = embed_dim, num_heads, key_size
    ks = jax.random.split(key, 9)
    p0 = math.log(math.expm1(LAMBDA_INIT - LAMBDA_LOWER_BOUND))  # softplus(p0) + 0.25 = 1
    params: Params = {
        "w_q": normal_init(ks[0], (e, h, d), std), "w_k": normal_init(ks[1], (e, h, d), std),
        "w_v": normal_init(ks[2], (e, h, d), std),
        "w_o": normal_init(ks[3], (h, d, e), std if res_std is None else res_std),
        "conv_q": normal_init(ks[4], (CONV_SIZE, h, d), std), "conv_k": normal_init(ks[5], (CONV_SIZE, h, d), std),
        "w_beta": normal_init(ks[6], (e, h), std), "b_beta": jnp.zeros((h,)),
        "w_gamma": normal_init(ks[7], (e, h), std), "b_gamma": jnp.zeros((h,)),
        "lam_p": jnp.full((h * d,), p0, jnp.float32), "norm_scale": jnp.ones((d,)),
    }
    if output_gate:
        params["w_g"] = normal_init(ks[8], (e, h, d), std)
    return params


def lam(params: Params):
    """Lambda [H, D] = softplus(p) + 0.25."""
    h, d = params["w_q"].shape[1:]
    return (jax.nn.softplus(params["lam_p"]) + LAMBDA_LOWER_BOUND).reshape(h, d)


def short_conv(x_BTHD, w_KHD):
    """Causal depthwise convolution: out_t = sum_{i<K} w_i * x_{t-K+1+i} (x_t = 0 for t < 0); no activation."""
    k, t = w_KHD.shape[0], x_BTHD.shape[1]
    padded = jnp.pad(x_BTHD, ((0, 0), (k - 1, 0), (0, 0), (0, 0)))
    return sum(w_KHD[i] * padded[:, i:i + t] for i in range(k))


def gates(params: Params, x_XE):
    """(beta [..., H] = sigma(w_beta . x + b_beta), log gamma [..., H] = log sigma(w_gamma . x + b_gamma))."""
    beta = jax.nn.sigmoid(x_XE @ params["w_beta"] + params["b_beta"])
    log_gamma = jax.nn.log_sigmoid(x_XE @ params["w_gamma"] + params["b_gamma"])
    return beta, log_gamma


def _output(params: Params, o_XHD, x_XE):
    """W_o [RMSNorm(o) * s * SiLU(W_g x)] (no gate without w_g): [..., E]."""
    normed = o_XHD * jax.lax.rsqrt(jnp.mean(o_XHD * o_XHD, axis=-1, keepdims=True) + NORM_EPS) * params["norm_scale"]
    if "w_g" in params:
        normed = normed * jax.nn.silu(jnp.einsum("...e,ehd->...hd", x_XE, params["w_g"]))
    return jnp.einsum("...hd,hde->...e", normed, params["w_o"])


def apply(params: Params, x_BTE, *, x_key_BTE=None, solver: str = "exact", chunk_size: int = 64,
          cg_tol: float = 1e-4):
    """y [B, T, E] of the block (module docstring) for the whole sequence at once (``mesanet`` op, chunks of
    ``chunk_size``, ``solver`` exact | cg | cg_fixed); ``x_key_BTE``: the keys' input (default x).

    aux = {"beta_BTH", "log_gamma_BTH", "lam_HD"}: the gates and Lambda."""
    x_key_BTE = x_BTE if x_key_BTE is None else x_key_BTE
    q_BTHD = jnp.einsum("bte,ehd->bthd", x_BTE, params["w_q"])
    k_BTHD = jnp.einsum("bte,ehd->bthd", x_key_BTE, params["w_k"])
    v_BTHD = jnp.einsum("bte,ehd->bthd", x_BTE, params["w_v"])
    q_BTHD = l2_normalise(jax.nn.silu(short_conv(q_BTHD, params["conv_q"])))
    k_BTHD = l2_normalise(jax.nn.silu(short_conv(k_BTHD, params["conv_k"])))
    beta_BTH, log_gamma_BTH = gates(params, x_BTE)
    lam_HD = lam(params)
    o_BTHD = mesanet(q_BTHD, k_BTHD, v_BTHD, log_gamma_BTH, beta_BTH, lam_HD, solver=solver, chunk_size=chunk_size,
                     cg_tol=cg_tol)
    return _output(params, o_BTHD, x_BTE), {"beta_BTH": beta_BTH, "log_gamma_BTH": log_gamma_BTH, "lam_HD": lam_HD}


# ----------------------------------------------------------------------------- recurrent decoding


class MesaNetBlockState(NamedTuple):
    """Per block: the pre-convolution q~, k~ of the last K - 1 tokens [B, K-1, H, D] (oldest first, zeros before
    the first token) and the op's MesaNetState (H [B, H, D, D], G [B, H, D, D])."""

    q_conv_BKHD: jax.Array
    k_conv_BKHD: jax.Array
    op: MesaNetState


def init_state(batch: int, num_heads: int, key_size: int, dtype=jnp.float32) -> MesaNetBlockState:
    buffer = jnp.zeros((batch, CONV_SIZE - 1, num_heads, key_size), dtype)
    return MesaNetBlockState(buffer, buffer, mesanet_initial_state(batch, num_heads, key_size, key_size, dtype))


def _conv_step(buffer_BKHD, x_BHD, w_KHD):
    """One token of ``short_conv``: (SiLU(sum_i w_i * window_i) [B, H, D], the new buffer = the last K-1 inputs)."""
    window = jnp.concatenate([buffer_BKHD, x_BHD[:, None]], axis=1)  # [B, K, H, D]
    return jax.nn.silu(jnp.einsum("bkhd,khd->bhd", window, w_KHD)), window[:, 1:]


def decode_step(params: Params, state: MesaNetBlockState, x_BE, x_key_BE=None):
    """One token: (y [B, E], new state); equal to ``apply``'s y_t (the op solves exactly here whatever the
    training solver, ``mesanet_decode_step``)."""
    x_key_BE = x_BE if x_key_BE is None else x_key_BE
    q, q_buffer = _conv_step(state.q_conv_BKHD, jnp.einsum("be,ehd->bhd", x_BE, params["w_q"]), params["conv_q"])
    k, k_buffer = _conv_step(state.k_conv_BKHD, jnp.einsum("be,ehd->bhd", x_key_BE, params["w_k"]), params["conv_k"])
    v = jnp.einsum("be,ehd->bhd", x_BE, params["w_v"])
    beta_BH, log_gamma_BH = gates(params, x_BE)
    o_BHD, op_state = mesanet_decode_step(state.op, l2_normalise(q), l2_normalise(k), v, log_gamma_BH, beta_BH,
                                          lam(params))
    return _output(params, o_BHD, x_BE), MesaNetBlockState(q_buffer, k_buffer, op_state)
