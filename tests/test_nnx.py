"""The Flax NNX module (mesacli/nnx.py) against the pure block (mesacli/lm/mesanet_block.py) on tiny shapes:
same initialisation, same output and gradients, split / merge, recurrent decoding, a few optimiser steps, and
flax imported only by mesacli.nnx.  Skipped without flax (``pip install -e '.[dev]'`` or ``'.[flax]'``)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

from mesacli.errors import MesaError  # noqa: E402
from mesacli.lm import mesanet_block as mb  # noqa: E402
from mesacli.nnx import MesaNet  # noqa: E402

E, H, D, B, T = 12, 2, 4, 2, 11


def layer(seed=0, **kwargs) -> MesaNet:
    """A MesaNet module with every parameter moved off its initial value (larger matrices, biases and Lambda
    changed), so that every part matters."""
    module = MesaNet(E, H, D, rngs=nnx.Rngs(seed), **kwargs)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(module.param_names)))
    for name in module.param_names:
        param = getattr(module, name)
        param[...] = param[...] + (0.3 if param.ndim >= 2 else 0.5) * jax.random.normal(next(keys), param.shape)
    return module


def inputs(seed=2, t=T):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, t, E))


def test_parameters_are_mesanet_block_init():
    for output_gate in (True, False):
        module = MesaNet(E, H, D, rngs=nnx.Rngs(params=3), output_gate=output_gate, std=0.05, res_std=0.01)
        expected = mb.init(nnx.Rngs(params=3).params(), E, H, D, std=0.05, res_std=0.01, output_gate=output_gate)
        params = module.block_params()
        assert params.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(params[name], expected[name])
        assert isinstance(module.w_q, nnx.Param)
        assert sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))) == sum(
            x.size for x in expected.values())


def test_call_equals_the_pure_block():
    """Both jitted (op-by-op dispatch of the block takes seconds); keys from the previous token as well."""
    solver = "cg_fixed"  # passed through: a different op than the default's
    module, x = layer(solver=solver, chunk_size=4), inputs()
    x_key = jnp.roll(x, 1, axis=1)
    y, y_shift = nnx.jit(lambda m, x, x_key: (m(x), m(x, x_key_BTE=x_key)))(module, x, x_key)
    pure = jax.jit(lambda p, x, x_key: (mb.apply(p, x, solver=solver, chunk_size=4)[0],
                                        mb.apply(p, x, x_key_BTE=x_key, solver=solver, chunk_size=4)[0]))
    expected, expected_shift = pure(module.block_params(), x, x_key)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y_shift, expected_shift, rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(y - y_shift))) > 1e-3  # the key input matters


def test_nnx_grad_equals_jax_grad_of_the_pure_block():
    module, x = layer(chunk_size=4), inputs()
    target = inputs(seed=5)

    @nnx.jit
    def nnx_value_and_grad(module):
        return nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(module)

    @jax.jit
    def pure_value_and_grad(params):
        return jax.value_and_grad(lambda p: jnp.mean((mb.apply(p, x, chunk_size=4)[0] - target) ** 2))(params)

    loss, grads = nnx_value_and_grad(module)
    expected_loss, expected = pure_value_and_grad(module.block_params())
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert set(grads) == set(expected)
    for name, g in expected.items():
        assert float(jnp.max(jnp.abs(g))) > 0, name  # every parameter gets a gradient
        np.testing.assert_allclose(grads[name][...], g, rtol=1e-5, atol=1e-7, err_msg=name)


def test_split_merge_round_trip():
    module, x = layer(), inputs()
    call = nnx.jit(lambda m, x: m(x))
    expected, w_o = call(module, x), np.asarray(module.w_o[...])
    graphdef, state = nnx.split(module)
    rebuilt = nnx.merge(graphdef, jax.tree.map(jnp.array, state))  # copies: no Variable shared with module
    np.testing.assert_array_equal(call(rebuilt, x), expected)
    assert (rebuilt.solver, rebuilt.param_names) == (module.solver, module.param_names)
    nnx.update(rebuilt, jax.tree.map(lambda a: 2 * a, nnx.state(rebuilt)))  # a changed state goes back in
    np.testing.assert_array_equal(rebuilt.w_o[...], 2 * w_o)
    np.testing.assert_array_equal(module.w_o[...], w_o)


def test_decode_step_equals_the_parallel_output():
    module, x = layer(solver="cg", cg_tol=1e-6, chunk_size=4), inputs()  # decoding solves exactly
    x_key = jnp.roll(x, 1, axis=1)
    step = nnx.jit(lambda m, state, x, x_key: m.decode_step(state, x, x_key))
    state, ys = module.init_state(B), []
    for t in range(T):
        y, state = step(module, state, x[:, t], x_key[:, t])
        ys.append(y)
    parallel = nnx.jit(lambda m, x, x_key: m(x, x_key_BTE=x_key))(module, x, x_key)
    np.testing.assert_allclose(jnp.stack(ys, axis=1), parallel, rtol=1e-4, atol=1e-5)


def test_unknown_solver_is_refused():
    with pytest.raises(MesaError, match="solver must be one of"):
        MesaNet(E, H, D, rngs=nnx.Rngs(0), solver="cholesky")


class TinyLM(nnx.Module):
    """embedding -> LayerNorm -> MesaNet (residual) -> linear head: MesaNet inside an ordinary NNX model."""

    def __init__(self, vocab: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, E, rngs=rngs)
        self.norm = nnx.LayerNorm(E, rngs=rngs)
        self.mesanet = MesaNet(E, H, D, rngs=rngs, chunk_size=8)
        self.head = nnx.Linear(E, vocab, rngs=rngs)

    def __call__(self, tokens_BT):
        x_BTE = self.embed(tokens_BT)
        return self.head(x_BTE + self.mesanet(self.norm(x_BTE)))


def test_a_tiny_nnx_model_learns():
    """A few AdamW steps (nnx.Optimizer) on next-token prediction of a repeated random pattern."""
    vocab = 8
    pattern = np.random.default_rng(0).integers(0, vocab, size=(B, 4))
    tokens = jnp.asarray(np.tile(pattern, (1, 5)))  # [B, 20]
    model = TinyLM(vocab, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, tokens)) for _ in range(15)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_flax_is_imported_only_by_mesacli_nnx():
    code = ("import sys, mesacli, mesacli.cli, mesacli.lm.model, mesacli.lm.train, mesacli.lm.mesanet_block\n"
            "assert not any(m == 'flax' or m.startswith('flax.') for m in sys.modules), 'flax imported'\n"
            "import mesacli.nnx\n"
            "assert 'flax.nnx' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_flax_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)  # import flax -> ImportError
    monkeypatch.delitem(sys.modules, "mesacli.nnx")
    with pytest.raises(ImportError, match=r"pip install 'mesacli\[flax\]'"):
        importlib.import_module("mesacli.nnx")
