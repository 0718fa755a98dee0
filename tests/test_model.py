"""The model stack: Proposition-1 weights reproduce the GD-1 baseline; aux intermediates; readout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesacli import baselines, model, tasks
from mesacli.spec import spec_from_dict
from tests.conftest import tiny_spec


def test_proposition1_weights_implement_one_gd_step():
    """LSA-1 with W_k^T W_q = I on (key s_{t-1}, query s_t) and P W_v = eta I (value s_t -> slot 0)
    computes eta * sum_{t'<=t} s_{t'} s_{t'-1}^T s_t, the GD-1 baseline of baselines.py."""
    spec = spec_from_dict({"task": {"token_format": "constructed", "mask_slots": [0, 1], "seq_len": 20},
                           "model": {"layers": 1, "attention": "linear", "num_heads": 1, "key_size": 10,
                                     "embed_dim": 40, "act_clip": 4.0}})
    eta, n = 0.032, 10
    eye = jnp.eye(n)
    zeros = jnp.zeros((40, 1, n))
    block = {
        "w_q": zeros.at[20:30, 0].set(eye),
        "w_k": zeros.at[30:40, 0].set(eye),
        "w_v": zeros.at[20:30, 0].set(eye),
        "w_o": jnp.zeros((1, n, 40)).at[0, :, 0:10].set(eta * eye),
    }
    batch = tasks.sample_batch(jax.random.PRNGKey(0), spec, 16)
    pred, aux = model.apply({"blocks": [block]}, batch.tokens_BTI, spec)
    expected = baselines.gd1_predictions(np.asarray(batch.obs_BTS), eta)
    np.testing.assert_allclose(np.asarray(pred), expected, rtol=1e-4, atol=1e-5)
    # the other slots of the residual stream are unchanged
    np.testing.assert_allclose(aux["residual_LBTE"][1, ..., 10:], batch.tokens_BTI[..., 10:], atol=1e-6)


def test_aux_holds_every_layer():
    spec = tiny_spec(model={"layers": 3, "attention": "mesa", "first_layer": "softmax_pe"})
    params = model.init(jax.random.PRNGKey(0), spec)
    assert params["blocks"][0]["w_q"].shape == (2 * 8, 2, 4)  # [e_t; PE_t] feeds q and k
    assert params["blocks"][0]["w_v"].shape == (8, 2, 4)
    assert "lam" in params["blocks"][1] and float(params["blocks"][1]["lam"][0]) == 1.0
    x = jnp.ones((2, spec.task.seq_len, spec.token_dim))
    pred, aux = model.apply(params, x, spec)
    assert pred.shape == (2, 8, 4)
    assert aux["residual_LBTE"].shape == (4, 2, 8, 8)
    assert len(aux["attention"]) == 3 and aux["attention"][0].shape == (2, 2, 8, 8)
    weights = np.asarray(aux["attention"][0])
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)  # softmax rows


def test_readout_from_slot_zero_and_clipping():
    spec = tiny_spec(model={"layers": 1, "input_proj": False, "output_proj": False, "embed_dim": 4,
                            "act_clip": 0.5, "init_std": 1.0})
    params = model.init(jax.random.PRNGKey(0), spec)
    x = 10 * jax.random.normal(jax.random.PRNGKey(1), (2, 8, 4))
    pred, aux = model.apply(params, x, spec)
    np.testing.assert_array_equal(pred, aux["residual_LBTE"][-1][..., :4])
    assert float(jnp.abs(pred).max()) <= 0.5


def test_param_count_of_lsa1():
    spec = spec_from_dict({"model": {"layers": 1, "num_heads": 2, "key_size": 20, "embed_dim": 40}})
    assert model.count_params(model.init(jax.random.PRNGKey(0), spec)) == 4 * 40 * 2 * 20


@pytest.mark.slow
def test_mesa_forms_and_forgetting_options_agree_inside_the_model():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 4))
    by_forget = {}
    for forget in ("none", "fixed", "gate"):
        outs = []
        for impl in ("sequential", "chunked"):
            spec = tiny_spec(model={"attention": "mesa", "mesa_impl": impl, "mesa_chunk_size": 3,
                                    "mesa_forget": forget, "mesa_gamma": 0.5, "init_std": 0.2})
            params = model.init(jax.random.PRNGKey(0), spec)
            if forget == "gate":
                assert params["blocks"][0]["gate_b"].shape == (2,)
            outs.append(np.asarray(model.apply(params, x, spec)[0]))
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        by_forget[forget] = outs[1]
    assert np.abs(by_forget["fixed"] - by_forget["none"]).max() > 1e-2  # forgetting changes the function


def test_mlp_uses_the_tanh_gelu_of_the_authors_code():
    """Block with an MLP: e + W_2 gelu_tanh(W_1 e) (flax nn.gelu's default form), checked against numpy."""
    common = {"layers": 1, "input_proj": False, "output_proj": False, "embed_dim": 4, "init_std": 0.4}
    spec = tiny_spec(model={**common, "mlp": True, "mlp_hidden": 6})
    attn_only = tiny_spec(model=common)
    params = model.init(jax.random.PRNGKey(0), spec)
    block = params["blocks"][0]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 4))
    _, aux = model.apply(params, x, spec)
    _, aux_attn = model.apply({"blocks": [{k: v for k, v in block.items() if not k.startswith("mlp")}]}, x,
                              attn_only)
    e = np.asarray(aux_attn["residual_LBTE"][1], dtype=np.float64)
    u = e @ np.asarray(block["mlp_in"], dtype=np.float64)
    gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
    expected = e + gelu @ np.asarray(block["mlp_out"], dtype=np.float64)
    np.testing.assert_allclose(np.asarray(aux["residual_LBTE"][1]), expected, rtol=1e-5, atol=2e-5)
    erf_gelu = 0.5 * u * (1 + np.vectorize(math.erf)(u / np.sqrt(2)))
    erf_form = e + erf_gelu @ np.asarray(block["mlp_out"], dtype=np.float64)
    assert np.abs(expected - erf_form).max() > 5e-4  # the erf form lies outside that tolerance
