"""The Transformer stack: ``init(key, spec) -> params`` and ``apply(params, x, spec) -> (y, aux)``.

Block l: e <- clip(e + sum_h P_h attn_h(LN(e)) [+ MLP(LN(e))]) (paper Eq. 2; biases unused).
Block 1 may be the "softmax_pe" layer: sinusoidal encodings are concatenated to its input before
the query and key projections only (W_q, W_k act on [e_t; PE_t], W_v on e_t).
``aux`` holds the residual stream after every block (index 0 = input) and each block's attention
weights, for probing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mesacli.layers import linear_attention, sinusoidal_encoding, softmax_attention
from mesacli.mesa import mesa_chunked, mesa_sequential
from mesacli.spec import Spec

Params = dict[str, Any]


def normal_init(key, shape, std):
    """std * N(0, 1) weights of the given shape (float32)."""
    return std * jax.random.normal(key, shape, dtype=jnp.float32)


def _init_block(key, spec: Spec, kind: str) -> Params:
    m = spec.model
    e, h, d = m.embed_dim, m.num_heads, m.key_size
    e_qk = 2 * e if kind == "softmax_pe" else e
    keys = jax.random.split(key, 6)
    block: Params = {
        "w_q": normal_init(keys[0], (e_qk, h, d), m.init_std),
        "w_k": normal_init(keys[1], (e_qk, h, d), m.init_std),
        "w_v": normal_init(keys[2], (e, h, d), m.init_std),
        "w_o": normal_init(keys[3], (h, d, e), m.init_std),
    }
    if kind == "mesa":
        block["lam"] = jnp.full((h,), m.mesa_lambda_init, dtype=jnp.float32)
        if m.mesa_forget == "gate":
            block["gate_w"] = jnp.zeros((e, h), dtype=jnp.float32)
            block["gate_b"] = jnp.full((h,), m.mesa_gate_bias, dtype=jnp.float32)
    if m.layer_norm:
        block["ln_attn"] = {"scale": jnp.ones((e,)), "bias": jnp.zeros((e,))}
    if m.mlp:
        block["mlp_in"] = normal_init(keys[4], (e, m.mlp_hidden), m.init_std)
        block["mlp_out"] = normal_init(keys[5], (m.mlp_hidden, e), m.init_std)
        if m.layer_norm:
            block["ln_mlp"] = {"scale": jnp.ones((e,)), "bias": jnp.zeros((e,))}
    return block


def init(key: jax.Array, spec: Spec) -> Params:
    """Weights ~ N(0, init_std^2), mesa lambda = mesa_lambda_init, LayerNorm scale 1 / bias 0."""
    m = spec.model
    key_in, key_out, key_blocks = jax.random.split(key, 3)
    kinds = m.layer_kinds()
    block_keys = jax.random.split(key_blocks, len(kinds))
    params: Params = {"blocks": [_init_block(k, spec, kind) for k, kind in zip(block_keys, kinds, strict=False)]}
    if m.input_proj:
        params["input_proj"] = normal_init(key_in, (spec.token_dim, m.embed_dim), m.init_std)
    if m.output_proj:
        params["output_proj"] = normal_init(key_out, (m.embed_dim, spec.task.obs_dim), m.init_std)
    return params


def layer_norm(x, p, eps: float = 1e-6):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def l2_normalise(x, eps=1e-6):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def gelu_tanh(x):
    """GELU in its tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's and the authors' code's
    (flax ``nn.gelu``'s default); cheaper on a CPU than the erf form."""
    return jax.nn.gelu(x, approximate=True)


def mesa_forgetting(block: Params, x_BTE: jax.Array, spec: Spec):
    """gamma_BTH: None (no forgetting), the fixed mesa_gamma, or the gate sigmoid(x . w_h + b_h)."""
    m = spec.model
    if m.mesa_forget == "none":
        return None
    if m.mesa_forget == "fixed":
        return jnp.full(x_BTE.shape[:2] + (m.num_heads,), m.mesa_gamma, x_BTE.dtype)
    return jax.nn.sigmoid(x_BTE @ block["gate_w"] + block["gate_b"])


def mesa_block(block: Params, x_BTE, q_BTHD, k_BTHD, v_BTHD, spec: Spec):
    """The mesa-layer in the spec's form; the chunked form returns no T x T weights (None)."""
    gamma_BTH = mesa_forgetting(block, x_BTE, spec)
    if spec.model.mesa_impl == "sequential":
        return mesa_sequential(q_BTHD, k_BTHD, v_BTHD, block["lam"], gamma_BTH)
    return mesa_chunked(q_BTHD, k_BTHD, v_BTHD, block["lam"], gamma_BTH, chunk_size=spec.model.mesa_chunk_size), None


def attention_block(block: Params, x_BTE: jax.Array, spec: Spec, kind: str, qk_norm: bool):
    """sum_h P_h attn_h(x): returns the block's attention output [B, T, E] and weights [B, H, T, T]."""
    qk_in = x_BTE
    if kind in ("softmax_pe", "linear_pe"):  # linear_pe: linear attention on the same inputs (linearize probe)
        pe_TE = sinusoidal_encoding(x_BTE.shape[1], x_BTE.shape[2]).astype(x_BTE.dtype)
        qk_in = jnp.concatenate([x_BTE, jnp.broadcast_to(pe_TE, x_BTE.shape)], axis=-1)
    q = jnp.einsum("bte,ehd->bthd", qk_in, block["w_q"])
    k = jnp.einsum("bte,ehd->bthd", qk_in, block["w_k"])
    v = jnp.einsum("bte,ehd->bthd", x_BTE, block["w_v"])
    if qk_norm:
        q, k = l2_normalise(q), l2_normalise(k)
    if kind in ("softmax", "softmax_pe"):
        out, weights = softmax_attention(q, k, v)
    elif kind in ("linear", "linear_pe"):
        out, weights = linear_attention(q, k, v)
    elif kind == "mesa":
        out, weights = mesa_block(block, x_BTE, q, k, v, spec)
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    return jnp.einsum("bthd,hde->bte", out, block["w_o"]), weights


def apply(params: Params, tokens_BTI: jax.Array, spec: Spec, kinds: tuple[str, ...] | None = None):
    """Predict s_{t+1} for every position (``kinds``: the blocks' layer kinds, default the spec's; the probes
    use it to swap one block for another kind).

    Returns (pred [B, T, n_s], aux) with aux = {"residual_LBTE": [L+1, B, T, E] residual stream
    after each block (0 = embedded input), "attention": tuple of [B, H, T, T] per block (None for
    the chunked mesa-layer, which never forms them; mesa_impl: sequential records them)}.
    """
    m = spec.model
    x = tokens_BTI @ params["input_proj"] if m.input_proj else tokens_BTI
    residuals, attentions = [x], []
    kinds = m.layer_kinds() if kinds is None else kinds
    for index, (block, kind) in enumerate(zip(params["blocks"], kinds, strict=True)):
        h = layer_norm(x, block["ln_attn"]) if m.layer_norm else x
        delta, weights = attention_block(block, h, spec, kind, qk_norm=m.qk_norm and index > 0)
        x = x + delta
        if m.mlp:
            h = layer_norm(x, block["ln_mlp"]) if m.layer_norm else x
            x = x + gelu_tanh(h @ block["mlp_in"]) @ block["mlp_out"]
        if m.act_clip is not None:
            x = jnp.clip(x, -m.act_clip, m.act_clip)
        residuals.append(x)
        attentions.append(weights)
    pred = x @ params["output_proj"] if m.output_proj else x[..., : spec.task.obs_dim]
    return pred, {"residual_LBTE": jnp.stack(residuals), "attention": tuple(attentions)}


def count_params(params: Params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
