"""Seeds in one program: replica i of a ``train.seeds = S`` run equals the plain run with seed + i."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mesacli.rundir import replicas
from mesacli.sharding import make_mesh
from mesacli.state import init_state, load_params
from mesacli.train import make_train_step, train
from tests.conftest import tiny_spec


def run_steps(spec, n):
    mesh = make_mesh(replicas=spec.train.seeds)
    state, step = init_state(spec, mesh), make_train_step(spec, mesh)
    losses = []
    for _ in range(n):
        state, metrics = step(state)
        losses.append(np.asarray(metrics["loss"]))
    return jax.device_get(state), np.array(losses)


def test_replica_i_equals_the_plain_run_with_seed_i():
    stacked_spec = tiny_spec(model={"attention": "softmax"}, train={"seeds": 3, "seed": 5})
    stacked, stacked_losses = run_steps(stacked_spec, 4)
    assert stacked_losses.shape == (4, 3)
    for i, (seed, params) in enumerate(replicas(stacked_spec, stacked["params"])):
        plain, plain_losses = run_steps(tiny_spec(model={"attention": "softmax"}, train={"seed": seed}), 4)
        np.testing.assert_allclose(stacked_losses[:, i], plain_losses, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain["params"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the replicas really are different runs
    leaves = jax.tree_util.tree_leaves(stacked["params"])
    assert not np.allclose(leaves[0][0], leaves[0][1])


@pytest.mark.slow
def test_seeds_run_writes_per_seed_metrics_and_resumes(tmp_path):
    spec = tiny_spec(train={"seeds": 2})
    interrupted = train(spec, tmp_path / "run", stop_at_step=3, progress=False)
    assert interrupted.step == 3
    resumed = train(spec, tmp_path / "run", progress=False)
    uninterrupted = train(spec, tmp_path / "straight", progress=False)
    assert resumed.resumed_from == 3 and resumed.eval_curves.shape == (2, spec.task.seq_len)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(uninterrupted.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))  # no duplicates after the resume
    for line in lines:
        assert len(line["loss_per_seed"]) == 2
        assert line["loss"] == pytest.approx(np.mean(line["loss_per_seed"]))
        assert line["loss_std"] == pytest.approx(np.std(line["loss_per_seed"]))
    record = json.loads((tmp_path / "run" / "eval_curve.json").read_text())
    assert record["seeds"] == [0, 1]
    per_seed = [record["per_seed"][str(s)]["seq_avg_loss"] for s in (0, 1)]
    assert record["seq_avg_loss"] == pytest.approx(np.mean(per_seed), rel=1e-6)
    # load_params gives the stacked parameters; replicas() splits them
    spec_back, params, step = load_params(tmp_path / "run")
    assert step == 6 and [s for s, _ in replicas(spec_back, params)] == [0, 1]
    assert (tmp_path / "run" / "loss_per_position.png").stat().st_size > 0


def test_replica_mesh_shape():
    devices = jax.devices()
    mesh = make_mesh(devices, replicas=3)
    assert mesh.axis_names == ("replica", "data") and mesh.devices.size == len(devices)
    assert make_mesh(devices).axis_names == ("data",)


def test_seeds_bench_reports_throughput(tmp_path):
    from mesacli.seeds_bench import run_seeds_bench

    result = run_seeds_bench(tiny_spec(), seeds=2, steps=2, repeats=1)
    assert result["one_program"]["replica_steps_per_s"] == pytest.approx(2 * result["one_program"]["steps_per_s"])
    assert result["speedup_vs_sequential"] > 0 and result["one_seed"]["compile_s"] > 0


@pytest.mark.parametrize(("seeds", "batch", "micro", "seq_len", "platform", "replica_devices", "expected"), [
    (8, 256, 32, 50, "cpu", 1, 1),  # the T=50 paper specs: one replica's micro-batch of 32 fills the 1,600 tokens
    (8, 256, 16, 50, "cpu", 1, 2),
    (8, 16, None, 50, "cpu", 1, 2),  # one pass of 16 sequences: 2 replicas together
    (3, 8, None, 8, "cpu", 1, 3),  # small replicas: all vmapped
    (6, 8, None, 50, "cpu", 1, 3),  # the largest divisor of the seeds that fits
    (8, 256, None, 50, "cpu", 1, 1),  # one pass larger than the budget: one replica at a time
    (8, 256, 32, 50, "gpu", 1, 8),  # accelerators: every replica at once
    (8, 256, 32, 50, "cpu", 2, 8),  # replicas spread over devices: vmapped as before
    (1, 256, 32, 50, "cpu", 1, 1),
])
def test_auto_replica_group(seeds, batch, micro, seq_len, platform, replica_devices, expected):
    from mesacli.train import auto_replica_group

    assert auto_replica_group(seeds, batch, micro, seq_len, platform, replica_devices) == expected


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the replica groups are a CPU setting")
@pytest.mark.parametrize(("seeds", "batch", "group"), [(3, 64, 1), pytest.param(4, 16, 2, marks=pytest.mark.slow)])
def test_replicas_in_groups_equal_the_plain_runs(seeds, batch, group):
    """On a CPU the replicas of the T=50 specs take turns (groups of step_replica_group, scanned); replica i still
    equals the plain run with seed + i, and the program equals the one that vmaps every replica."""
    from mesacli.train import step_replica_group

    sections = dict(task={"seq_len": 50}, model={"attention": "softmax"}, train={"batch_size": batch, "seed": 2})
    spec = tiny_spec(**{**sections, "train": {**sections["train"], "seeds": seeds}})
    mesh = make_mesh(replicas=seeds)
    assert step_replica_group(spec, mesh) == group
    grouped, grouped_losses = run_steps(spec, 3)
    state, vmapped_step = init_state(spec, mesh), make_train_step(spec, mesh, replica_group=seeds)
    for _ in range(3):
        state, _ = vmapped_step(state)
    for a, b in zip(jax.tree_util.tree_leaves(grouped), jax.tree_util.tree_leaves(jax.device_get(state)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for i, (seed, params) in enumerate(replicas(spec, grouped["params"])):
        plain, plain_losses = run_steps(tiny_spec(**{**sections, "train": {**sections["train"], "seed": seed}}), 3)
        np.testing.assert_allclose(grouped_losses[:, i], plain_losses, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain["params"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
