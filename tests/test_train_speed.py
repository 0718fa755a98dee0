"""Issue 20: the automatic micro-batch of the training step on a CPU (an execution setting, not part of the spec)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mesacli.sharding import make_mesh
from mesacli.spec import load_spec
from mesacli.spec_loader import find_spec_file
from mesacli.state import init_state
from mesacli.train import auto_micro_batch, make_train_step, step_micro_batch
from mesacli.train_bench import prepare_train_step
from tests.conftest import tiny_spec


@pytest.mark.parametrize(("batch", "seq_len", "platform", "devices", "expected"), [
    (256, 50, "cpu", 1, 32),  # the T=50 paper specs: 32 sequences, 1,600 tokens
    (256, 50, "cpu", 2, 32),
    (256, 50, "cpu", 3, None),  # no multiple of 3 divides 256
    (128, 224, "cpu", 1, 8),  # at least 8 sequences (T=224 ships its own train.micro_batch: 16)
    (64, 100, "cpu", 1, 16),
    (8, 8, "cpu", 1, None),  # a small batch takes one pass
    (32, 50, "cpu", 1, None),
    (256, 50, "gpu", 1, None),  # accelerators: one pass
    (256, 50, "tpu", 1, None),
])
def test_auto_micro_batch(batch, seq_len, platform, devices, expected):
    assert auto_micro_batch(batch, seq_len, platform, devices) == expected


def test_the_spec_micro_batch_wins_and_the_spec_is_not_changed():
    mesh = make_mesh()
    spec = load_spec(find_spec_file("softmax7_full"))
    assert spec.train.micro_batch is None
    assert step_micro_batch(spec, mesh) == (32 if jax.default_backend() == "cpu" else None)
    one_pass = dataclasses.replace(spec, train=dataclasses.replace(spec.train, micro_batch=256))
    assert step_micro_batch(one_pass, mesh) == 256  # the batch size itself: one pass
    assert step_micro_batch(load_spec(find_spec_file("icl_softmax7_t224")), mesh) == 16
    assert prepare_train_step(spec).micro_batch == step_micro_batch(spec, mesh)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the automatic micro-batch is a CPU setting")
def test_auto_micro_batched_step_follows_the_one_pass_step():
    """batch 64 of T = 50 runs as 2 micro-batches of 32 on a CPU; its updates equal those of one pass (the batch
    size as train.micro_batch) up to float rounding."""
    results = {}
    for micro in (None, 64):
        spec = tiny_spec(task={"seq_len": 50}, model={"first_layer": "softmax_pe"},
                         train={"batch_size": 64, "micro_batch": micro})
        mesh = make_mesh()
        assert step_micro_batch(spec, mesh) == (32 if micro is None else 64)
        state, step = init_state(spec, mesh), make_train_step(spec, mesh)
        losses = []
        for _ in range(3):
            state, metrics = step(state)
            losses.append(float(metrics["loss"]))
        results[micro] = (jax.device_get(state["params"]), losses)
    for a, b in zip(jax.tree_util.tree_leaves(results[None][0]), jax.tree_util.tree_leaves(results[64][0]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(results[None][1], results[64][1], rtol=1e-5)
