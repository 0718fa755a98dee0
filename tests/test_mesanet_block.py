"""The MesaNet block of mesacli lm (mesacli/lm/mesanet_block.py) on tiny shapes: its pieces against their
definitions, decoding against the parallel form, causality and gradients.  LM-level tests: tests/test_lm.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesacli import mesanet as mn
from mesacli.lm import mesanet_block as mb
from mesacli.lm.spec import MESANET_SOLVERS

E, H, D, B, T = 12, 2, 4, 2, 11


def block_params(seed=0, output_gate=True):
    """init, then every matrix and tap re-drawn larger (N(0, 0.3^2)) and the biases and Lambda moved off their
    initial values, so that every part matters."""
    params = mb.init(jax.random.PRNGKey(seed), E, H, D, output_gate=output_gate)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(params)))
    return {name: x + (0.3 if x.ndim >= 2 else 0.5) * jax.random.normal(next(keys), x.shape)
            for name, x in params.items()}


def inputs(seed=2, t=T):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, t, E))


def test_init_gives_lambda_one_and_the_documented_shapes():
    params = mb.init(jax.random.PRNGKey(0), E, H, D)
    np.testing.assert_allclose(mb.lam(params), np.ones((H, D)), rtol=1e-6)
    shapes = {name: x.shape for name, x in params.items()}
    assert shapes == {"w_q": (E, H, D), "w_k": (E, H, D), "w_v": (E, H, D), "w_g": (E, H, D), "w_o": (H, D, E),
                      "conv_q": (4, H, D), "conv_k": (4, H, D), "w_beta": (E, H), "b_beta": (H,), "w_gamma": (E, H),
                      "b_gamma": (H,), "lam_p": (H * D,), "norm_scale": (D,)}
    assert "w_g" not in mb.init(jax.random.PRNGKey(0), E, H, D, output_gate=False)
    assert MESANET_SOLVERS == mn.SOLVERS  # the spec's copy of the op's solver names


def test_short_conv_is_a_causal_depthwise_convolution():
    x = np.random.default_rng(0).normal(size=(B, T, H, D)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(4, H, D)).astype(np.float32)
    expected = np.zeros_like(x)
    for t in range(T):
        for i in range(4):
            if t - 3 + i >= 0:
                expected[:, t] += w[i] * x[:, t - 3 + i]  # the last tap multiplies the current token
    np.testing.assert_allclose(mb.short_conv(jnp.asarray(x), jnp.asarray(w)), expected, rtol=1e-5, atol=1e-6)


def test_apply_matches_its_definition_through_the_sequential_reference():
    """y from the module docstring's equations with mesanet_reference (a plain scan and solve) in float64."""
    params = block_params()
    x = inputs()
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        x64 = jnp.asarray(x, jnp.float64)
        q = mb.short_conv(jnp.einsum("bte,ehd->bthd", x64, p64["w_q"]), p64["conv_q"])
        k = mb.short_conv(jnp.einsum("bte,ehd->bthd", x64, p64["w_k"]), p64["conv_k"])
        unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
        q, k = unit(jax.nn.silu(q)), unit(jax.nn.silu(k))
        v = jnp.einsum("bte,ehd->bthd", x64, p64["w_v"])
        beta = jax.nn.sigmoid(x64 @ p64["w_beta"] + p64["b_beta"])
        log_gamma = jax.nn.log_sigmoid(x64 @ p64["w_gamma"] + p64["b_gamma"])
        lam = (jax.nn.softplus(p64["lam_p"]) + 0.25).reshape(H, D)
        o = mn.mesanet_reference(q, k, v, log_gamma, beta, lam)
        o = o / jnp.sqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-5) * p64["norm_scale"]
        o = o * jax.nn.silu(jnp.einsum("bte,ehd->bthd", x64, p64["w_g"]))
        expected = np.asarray(jnp.einsum("bthd,hde->bte", o, p64["w_o"]))
    for solver in MESANET_SOLVERS:
        y, aux = jax.jit(lambda p, x, s=solver: mb.apply(p, x, solver=s, chunk_size=4))(params, x)
        tol = 2e-4 if solver != "cg_fixed" else 2e-3  # 30 fixed CG steps are an approximation
        np.testing.assert_allclose(y, expected, rtol=tol, atol=tol * float(np.abs(expected).max()), err_msg=solver)
        assert aux["beta_BTH"].shape == aux["log_gamma_BTH"].shape == (B, T, H) and aux["lam_HD"].shape == (H, D)


@pytest.mark.parametrize("output_gate, key_shift", [(True, False), (False, True)])
def test_decoding_token_by_token_equals_the_parallel_form(output_gate, key_shift):
    """decode_step with its rolling convolution buffers (the last 3 inputs) and (H, G) gives apply's y_t."""
    params = block_params(output_gate=output_gate)
    x = inputs()
    x_key = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1) if key_shift else x
    parallel, _ = jax.jit(lambda p, x, xk: mb.apply(p, x, x_key_BTE=xk, chunk_size=4))(params, x, x_key)
    step = jax.jit(mb.decode_step)
    state = mb.init_state(B, H, D)
    for t in range(T):
        y, state = step(params, state, x[:, t], x_key[:, t])
        np.testing.assert_allclose(y, parallel[:, t], rtol=1e-4, atol=1e-4 * float(jnp.abs(parallel).max()))
    assert state.q_conv_BKHD.shape == (B, 3, H, D) and state.op.h_BHDD.shape == (B, H, D, D)
    np.testing.assert_allclose(state.k_conv_BKHD[:, -1], jnp.einsum("be,ehd->bhd", x_key[:, -1], params["w_k"]),
                               rtol=1e-6)


def test_the_block_is_causal():
    params = block_params()
    x = inputs()
    changed = x.at[:, 6].add(1.0)
    apply = jax.jit(lambda x: mb.apply(params, x, chunk_size=4)[0])
    a, b = apply(x), apply(changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert float(jnp.min(jnp.max(jnp.abs(a[:, 6:] - b[:, 6:]), axis=(0, 2)))) > 1e-5  # every later token moves


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_gradients_reach_every_parameter_and_are_finite(solver):
    params = block_params()
    x = inputs()
    cot = jax.random.normal(jax.random.PRNGKey(9), (B, T, E))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(mb.apply(p, x, solver=solver, chunk_size=4)[0] * cot)))(params)
    for name, g in grads.items():
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert float(jnp.max(jnp.abs(g))) > 0, name
    # Lambda's gradient against finite differences along a random direction (float32: loose)
    direction = jax.random.normal(jax.random.PRNGKey(4), params["lam_p"].shape)
    f = jax.jit(lambda s: jnp.sum(mb.apply({**params, "lam_p": params["lam_p"] + s * direction}, x,
                                           solver=solver, chunk_size=4)[0] * cot))
    fd = (f(1e-2) - f(-1e-2)) / 2e-2
    np.testing.assert_allclose(float(jnp.vdot(grads["lam_p"], direction)), float(fd), rtol=2e-2)
