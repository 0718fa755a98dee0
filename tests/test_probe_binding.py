"""The token-binding probe against an independent numpy reference of the authors' tokenanalyser.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import TINY, merge

from mesacli import model
from mesacli.probe import binding, common
from mesacli.probe.common import RunContext, probe_batch
from mesacli.spec import spec_from_dict

# a tiny raw-token Softmax model with a PE first layer and input/output projections, as Softmax-7 (T = 12 < 50)
SPEC = spec_from_dict(merge(TINY, {"task": {"seq_len": 12},
                                   "model": {"attention": "softmax", "first_layer": "softmax_pe", "init_std": 0.4}}))


def numpy_layer1(params, tokens_BTI: np.ndarray) -> np.ndarray:
    """Block-1 output after the residual add ([C] activations[1]) in float64 numpy: x = e W_in,
    x + sum_h softmax_causal([x, PE] W_q^h ([x, PE] W_k^h)^T / sqrt(d)) x W_v^h W_o^h, with [C]'s sinusoidal PE."""
    f = np.float64
    x = tokens_BTI.astype(f) @ np.asarray(params["input_proj"], f)
    _, t, e = x.shape
    pos = np.arange(t, dtype=f)[:, None]
    div = np.exp(np.arange(0, e, 2) * (-np.log(10000.0) / e))
    pe = np.zeros((t, e))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    qk_in = np.concatenate([x, np.broadcast_to(pe, x.shape)], axis=-1)
    block = {k: np.asarray(v, f) for k, v in params["blocks"][0].items()}
    out = np.zeros_like(x)
    for h in range(block["w_q"].shape[1]):
        q, k, v = qk_in @ block["w_q"][:, h], qk_in @ block["w_k"][:, h], x @ block["w_v"][:, h]
        logits = q @ np.swapaxes(k, 1, 2) / np.sqrt(q.shape[-1])
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out += (a @ v) @ block["w_o"][h]
    return x + out


def pinv_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares through the SVD, singular values below float32 precision cut (as float32 jnp.linalg.lstsq)."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > np.finfo(np.float32).eps * max(x.shape) * s[0]
    return vt[keep].T @ ((u[:, keep].T @ y) / s[keep, None])


def test_token_probe_matches_a_numpy_reference_of_the_authors_tokenanalyser(tmp_path):
    params = model.init(jax.random.PRNGKey(3), SPEC)
    ctx = RunContext(run_dir=tmp_path, spec=SPEC, params=params, step=0, seeds=2, batch_size=64,
                     options={"attention_sequences": 64})
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    r = binding.run(ctx)

    probe_token, probe_range = SPEC.task.seq_len - 1, 7  # [C]: 0-based probe_token 49 for T = 50, range 7
    mse, r2 = [], []
    for seed in range(2):
        batch = probe_batch(SPEC, seed, 64)
        data = np.asarray(batch.tokens_BTI, np.float64)  # raw tokens: the model input is s_t itself
        last = numpy_layer1(params, data)[:, probe_token, :]
        row_mse, row_r2 = [], []
        for tok in range(probe_token - probe_range, probe_token + 1):
            y = data[:, tok, :]
            pred = last @ pinv_fit(last, y)
            row_mse.append(np.mean((pred - y) ** 2))
            row_r2.append(np.mean(1 - np.sum((y - pred) ** 2, 0) / np.sum((y - y.mean(0)) ** 2, 0)))
        mse.append(row_mse)
        r2.append(row_r2)

    assert r["position"] == 12 and r["t_prime"] == list(range(5, 13))
    np.testing.assert_allclose(r["token_probe_mse"], np.mean(mse, 0), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(r["token_probe_r2"], np.mean(r2, 0), rtol=2e-4, atol=1e-6)
    assert r["token_probe_mse"][-1] == min(r["token_probe_mse"])  # s_t itself is in x_t = W_in s_t + attention


def test_r_squared_is_the_mean_of_the_per_dimension_scores():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(100, 2)) * np.array([1.0, 10.0])
    pred = y + rng.normal(size=(100, 2)) * np.array([0.5, 0.5])
    per_dim = [1 - np.sum((y[:, i] - pred[:, i]) ** 2) / np.sum((y[:, i] - y[:, i].mean()) ** 2) for i in range(2)]
    assert common.r_squared(pred, y) == pytest.approx(np.mean(per_dim), rel=1e-12)
