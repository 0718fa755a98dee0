"""Hybrid language model (paper appendix G): ``init(key, spec, vocab) -> params``,
``apply(params, tokens, spec) -> (logits, aux)`` and the recurrent ``decode_step`` for generation.

x_0 = E[token_t] + PE_t (then embedding dropout); block l: x <- x + attn_l(LN(x)), and with ``mlp``
x <- x + W_2 ReLU(W_1 LN(x)); logits = LN(x) W_out + b_out.  attn_l is one of
- softmax: softmax(q k^T / sqrt(d)) v, causal;
- linear: sum_{t'<=t} v_t' (k_t'^T q_t) with L2-normalised q, k;
- dpfp: the same with q, k mapped to DPFP-nu features (Schlag et al. 2021), then L2-normalised;
- mesa: the mesa-layer (Eqs. 4-8, chunked form) on DPFP-nu (or, with nu = 0, plain) L2-normalised q, k;
- mesanet: the MesaNet block (``mesacli.lm.mesanet_block``: short convolutions, input and forget gates, per-key
  Lambda, gated RMSNorm around o_t = G_t (H_t + diag Lambda)^{-1} q_t), W_o inside the block.
DPFP-nu: phi(x) = concat_{i=1..nu} r(x) * roll(r(x), i), r(x) = ReLU([x, -x]); size 2 d nu.
``key_shift``: block 1 computes its keys from the previous token's input (zeros at t = 0), the
hard-coded one-step key-shift that stands in for a first softmax layer.

Shapes: B batch, T time, E embedding, H heads, D key size, F feature size (D or 2 D nu), V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mesacli.layers import linear_attention_chunked, sinusoidal_encoding, softmax_attention
from mesacli.lm import mesanet_block
from mesacli.lm.spec import LMSpec
from mesacli.mesa import MesaState, mesa_chunked, mesa_decode_step, mesa_initial_state
from mesacli.model import count_params, l2_normalise, normal_init  # noqa: F401 (count_params: part of this API)
from mesacli.model import layer_norm as _layer_norm

Params = dict[str, Any]


def _layer_norm_params(e: int) -> Params:
    return {"scale": jnp.ones((e,)), "bias": jnp.zeros((e,))}


layer_norm = functools.partial(_layer_norm, eps=1e-5)  # GPT-2's LayerNorm epsilon


def feature_size(spec: LMSpec, kind: str) -> int:
    m = spec.model
    return 2 * m.key_size * m.dpfp_nu if kind in ("dpfp", "mesa") and m.dpfp_nu > 0 else m.key_size


def init(key: jax.Array, spec: LMSpec, vocab_size: int) -> Params:
    """N(0, init_std^2) weights; W_o and W_2 (they feed the residual stream) scaled by 1 / sqrt(2 L);
    LayerNorm scale 1, biases 0; mesa lambda = mesa_lambda_init (stored as log lambda, so it stays > 0);
    mesanet blocks: ``mesanet_block.init`` (the same q, k, v, o projections plus its own parameters)."""
    m = spec.model
    e, h, d, n = m.embed_dim, m.num_heads, m.key_size, len(m.layers)
    std, res_std = m.init_std, m.init_std / (2 * n) ** 0.5
    key_embed, key_out, key_blocks = jax.random.split(key, 3)
    blocks = []
    for kind, k in zip(m.layers, jax.random.split(key_blocks, n), strict=True):
        ks = jax.random.split(k, 6)
        block: Params = {"ln_attn": _layer_norm_params(e)}
        if kind == "mesanet":
            block.update(mesanet_block.init(ks[0], e, h, d, std=std, res_std=res_std,
                                            output_gate=m.mesanet_output_gate))
        else:
            block.update(w_q=normal_init(ks[0], (e, h, d), std), w_k=normal_init(ks[1], (e, h, d), std),
                         w_v=normal_init(ks[2], (e, h, d), std), w_o=normal_init(ks[3], (h, d, e), res_std))
        if kind == "mesa":
            block["log_lam"] = jnp.full((h,), jnp.log(m.mesa_lambda_init), jnp.float32)
        if m.mlp:
            hidden = m.mlp_ratio * e
            block.update(ln_mlp=_layer_norm_params(e), w_1=normal_init(ks[4], (e, hidden), std),
                         b_1=jnp.zeros((hidden,)), w_2=normal_init(ks[5], (hidden, e), res_std), b_2=jnp.zeros((e,)))
        blocks.append(block)
    return {"embed": normal_init(key_embed, (vocab_size, e), std), "blocks": blocks, "ln_f": _layer_norm_params(e),
            "w_out": normal_init(key_out, (e, vocab_size), std), "b_out": jnp.zeros((vocab_size,))}


def dpfp(x_XD, nu: int):
    """DPFP-nu features: concat_{i=1..nu} r(x) * roll(r(x), i) with r(x) = ReLU([x, -x]): [..., 2 D nu]."""
    r = jax.nn.relu(jnp.concatenate([x_XD, -x_XD], axis=-1))
    return jnp.concatenate([r * jnp.roll(r, i, axis=-1) for i in range(1, nu + 1)], axis=-1)


def _features(x_XD, spec: LMSpec, kind: str):
    """Keys/queries of the non-softmax kinds: DPFP features (dpfp, mesa with nu > 0), then L2 norm."""
    if kind in ("dpfp", "mesa") and spec.model.dpfp_nu > 0:
        x_XD = dpfp(x_XD, spec.model.dpfp_nu)
    return l2_normalise(x_XD)


def _shift_right(x_BTE):
    return jnp.concatenate([jnp.zeros_like(x_BTE[:, :1]), x_BTE[:, :-1]], axis=1)


def _qkv(block: Params, h_BTE, h_key_BTE, spec: LMSpec, kind: str):
    q = jnp.einsum("bte,ehd->bthd", h_BTE, block["w_q"])
    k = jnp.einsum("bte,ehd->bthd", h_key_BTE, block["w_k"])
    v = jnp.einsum("bte,ehd->bthd", h_BTE, block["w_v"])
    if kind != "softmax":
        q, k = _features(q, spec, kind), _features(k, spec, kind)
    return q, k, v


def attention(block: Params, h_BTE, spec: LMSpec, kind: str, shift_keys: bool):
    """The block's attention output [B, T, E] (before the residual add)."""
    h_key_BTE = _shift_right(h_BTE) if shift_keys else h_BTE
    if kind == "mesanet":
        m = spec.model
        return mesanet_block.apply(block, h_BTE, x_key_BTE=h_key_BTE, solver=m.mesanet_solver,
                                   chunk_size=m.mesanet_chunk_size, cg_tol=m.mesanet_cg_tol)[0]
    q, k, v = _qkv(block, h_BTE, h_key_BTE, spec, kind)
    if kind == "softmax":
        out = softmax_attention(q, k, v)[0]
    elif kind == "mesa":
        out = mesa_chunked(q, k, v, jnp.exp(block["log_lam"]), chunk_size=spec.model.mesa_chunk_size)
    else:
        out = linear_attention_chunked(q, k, v, spec.model.mesa_chunk_size)
    return jnp.einsum("bthd,hde->bte", out, block["w_o"])


def _mlp(block: Params, x_BTE):
    h = layer_norm(x_BTE, block["ln_mlp"])
    return jax.nn.relu(h @ block["w_1"] + block["b_1"]) @ block["w_2"] + block["b_2"]


def apply(params: Params, tokens_BT: jax.Array, spec: LMSpec, dropout_key: jax.Array | None = None):
    """Next-token logits [B, T, V] for every position; ``dropout_key`` turns on embedding dropout.

    aux = {"residual_LBTE": [L+1, B, T, E] the residual stream before block 1 and after every block}."""
    m = spec.model
    x = params["embed"][tokens_BT] + sinusoidal_encoding(tokens_BT.shape[1], m.embed_dim)
    if dropout_key is not None and m.dropout > 0:
        keep = jax.random.bernoulli(dropout_key, 1 - m.dropout, x.shape)
        x = jnp.where(keep, x / (1 - m.dropout), 0.0)
    residuals = [x]
    for index, (block, kind) in enumerate(zip(params["blocks"], m.layers, strict=True)):
        x = x + attention(block, layer_norm(x, block["ln_attn"]), spec, kind, m.key_shift and index == 0)
        if m.mlp:
            x = x + _mlp(block, x)
        residuals.append(x)
    logits = layer_norm(x, params["ln_f"]) @ params["w_out"] + params["b_out"]
    return logits, {"residual_LBTE": jnp.stack(residuals)}


# ----------------------------------------------------------------------------- recurrent decoding


class DecodeState(NamedTuple):
    """Per block: softmax -> (keys [B, T_max, H, D], values [B, T_max, H, D]); linear/dpfp -> S = sum v phi(k)^T
    [B, H, D, F]; mesa -> MesaState; mesanet -> MesaNetBlockState (convolution buffers and (H, G)).
    ``prev_h_BE``: block 1's previous input (for key_shift)."""

    layers: tuple
    prev_h_BE: jax.Array


def init_decode_state(params: Params, spec: LMSpec, batch: int, max_len: int) -> DecodeState:
    m = spec.model
    h, d = m.num_heads, m.key_size
    states = []
    for block, kind in zip(params["blocks"], m.layers, strict=True):
        if kind == "softmax":
            states.append((jnp.zeros((batch, max_len, h, d)), jnp.zeros((batch, max_len, h, d))))
        elif kind == "mesa":
            states.append(mesa_initial_state(batch, jnp.exp(block["log_lam"]), feature_size(spec, kind), d))
        elif kind == "mesanet":
            states.append(mesanet_block.init_state(batch, h, d))
        else:
            states.append(jnp.zeros((batch, h, d, feature_size(spec, kind))))
    return DecodeState(tuple(states), jnp.zeros((batch, m.embed_dim)))


def _decode_attention(block: Params, spec: LMSpec, kind: str, layer_state, h_BE, h_key_BE, pos):
    """One token of a block's attention: (output [B, E] before the residual add, new layer state)."""
    if kind == "mesanet":
        return mesanet_block.decode_step(block, layer_state, h_BE, h_key_BE)
    q, k, v = (y[:, 0] for y in _qkv(block, h_BE[:, None], h_key_BE[:, None], spec, kind))  # [B, H, D or F]
    if kind == "softmax":
        keys, values = layer_state
        keys = jax.lax.dynamic_update_index_in_dim(keys, k, pos, axis=1)
        values = jax.lax.dynamic_update_index_in_dim(values, v, pos, axis=1)
        logits_BHT = jnp.einsum("bhd,bthd->bht", q, keys) / jnp.sqrt(jnp.float32(q.shape[-1]))
        logits_BHT = jnp.where(jnp.arange(keys.shape[1]) <= pos, logits_BHT, -1e30)
        out = jnp.einsum("bht,bthd->bhd", jax.nn.softmax(logits_BHT, axis=-1), values)
        layer_state = (keys, values)
    elif kind == "mesa":
        layer_state, out = mesa_decode_step(MesaState(*layer_state), q, k, v)
    else:
        layer_state = layer_state + jnp.einsum("bhv,bhf->bhvf", v, k)
        out = jnp.einsum("bhvf,bhf->bhv", layer_state, q)
    return jnp.einsum("bhd,hde->be", out, block["w_o"]), layer_state


def decode_step(params: Params, spec: LMSpec, state: DecodeState, token_B: jax.Array, pos: jax.Array,
                pe_TE: jax.Array):
    """One token at position ``pos`` (0-based; pe_TE the encodings of all positions < T_max): next-token
    logits [B, V] and the new state.  Softmax layers attend to their key/value cache; linear, dpfp, mesa and
    mesanet layers use their constant-size recurrent state (mesa: ``mesa_decode_step``, mesanet:
    ``mesanet_block.decode_step``)."""
    m = spec.model
    x = params["embed"][token_B] + pe_TE[pos]
    new_states, prev_h = [], state.prev_h_BE
    for index, (block, kind, layer_state) in enumerate(zip(params["blocks"], m.layers, state.layers, strict=True)):
        h = layer_norm(x, block["ln_attn"])
        h_key = prev_h if (m.key_shift and index == 0) else h
        if index == 0:
            prev_h = h
        out_BE, layer_state = _decode_attention(block, spec, kind, layer_state, h, h_key, pos)
        new_states.append(layer_state)
        x = x + out_BE
        if m.mlp:
            x = x + _mlp(block, x)
    logits = layer_norm(x, params["ln_f"]) @ params["w_out"] + params["b_out"]
    return DecodeState(tuple(new_states), prev_h), logits
