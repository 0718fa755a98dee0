"""Sampling text from a trained language model with the recurrent (constant-memory) layer forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mesacli.errors import MesaError
from mesacli.layers import sinusoidal_encoding
from mesacli.lm import data as lm_data
from mesacli.lm import model
from mesacli.lm.spec import LMSpec


def generate(params, spec: LMSpec, tokenizer: lm_data.Tokenizer, prompt: str, *, max_new_tokens: int = 200,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> str:
    """Sample a continuation of ``prompt`` token by token with the recurrent forms (``model.decode_step``):
    constant memory per linear/dpfp/mesa/mesanet layer, a key/value cache per softmax layer.  temperature 0 =
    greedy."""
    if max_new_tokens < 1:
        raise MesaError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise MesaError(f"--temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise MesaError(f"--top-k must be >= 1, got {top_k}")
    prompt_ids = tokenizer.encode(prompt.encode("utf-8"))
    if len(prompt_ids) == 0:
        prompt_ids = np.array([tokenizer.eos_id])
    total = len(prompt_ids) + max_new_tokens
    pe_TE = sinusoidal_encoding(total, spec.model.embed_dim)
    step = jax.jit(lambda p, state, token, pos: model.decode_step(p, spec, state, token, pos, pe_TE))
    state = model.init_decode_state(params, spec, 1, total)
    logits = None
    for pos, token in enumerate(prompt_ids):
        state, logits = step(params, state, jnp.array([token]), jnp.int32(pos))
    key = jax.random.PRNGKey(seed)
    out = []
    for pos in range(len(prompt_ids), total):
        key, sub = jax.random.split(key)
        row = logits[0]
        if temperature == 0:
            token = int(jnp.argmax(row))
        else:
            row = row / temperature
            if top_k is not None and top_k < row.shape[0]:
                row = jnp.where(row < jnp.sort(row)[-top_k], -jnp.inf, row)
            token = int(jax.random.categorical(sub, row))
        out.append(token)
        if pos + 1 < total:
            state, logits = step(params, state, jnp.array([token]), jnp.int32(pos))
    return tokenizer.decode(np.array(out))
