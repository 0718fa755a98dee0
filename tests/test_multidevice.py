"""A train step on a ("data",) mesh of 4 CPU host devices equals the same step on 1 device; 4 seeds in one
program run one replica per device and equal the 1-device run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from mesacli.sharding import make_mesh
    from mesacli.state import init_state
    from mesacli.train import make_train_step
    from tests.conftest import tiny_spec

    assert jax.device_count() == 4, jax.devices()
    spec = tiny_spec(model={"attention": "mesa", "first_layer": "softmax_pe"})
    results = {}
    for n in (1, 4):
        mesh = make_mesh(jax.devices()[:n])
        state = init_state(spec, mesh)
        step = make_train_step(spec, mesh)
        for _ in range(3):
            state, metrics = step(state)
        assert len(state["step"].sharding.device_set) == n
        results[n] = (jax.device_get(state["params"]), float(metrics["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(results[1][0]), jax.tree_util.tree_leaves(results[4][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # reduction order differs across devices
    assert abs(results[1][1] - results[4][1]) < 1e-5 * abs(results[1][1])
    # micro-batches of 4 over 4 devices (one row per device each) equal the 1-device full-batch step
    micro_spec = tiny_spec(model={"attention": "mesa", "first_layer": "softmax_pe"}, train={"micro_batch": 4})
    mesh = make_mesh(jax.devices())
    state = init_state(micro_spec, mesh)
    step = make_train_step(micro_spec, mesh)
    for _ in range(3):
        state, metrics = step(state)
    for a, b in zip(jax.tree_util.tree_leaves(results[1][0]), jax.tree_util.tree_leaves(state["params"])):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5)
    # seeds in one program: 4 replicas on 4 devices, one replica per device, equal to 1 device
    seeds_spec = tiny_spec(train={"seeds": 4})
    stacked = {}
    for n in (1, 4):
        mesh = make_mesh(jax.devices()[:n], replicas=4)
        assert dict(mesh.shape) == {"replica": n, "data": 1}
        state = init_state(seeds_spec, mesh)
        step = make_train_step(seeds_spec, mesh)
        for _ in range(2):
            state, metrics = step(state)
        leaf = jax.tree_util.tree_leaves(state["params"])[0]
        assert len(leaf.sharding.device_set) == n
        if n == 4:  # each device holds one replica's slice
            assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}
        stacked[n] = jax.device_get(state["params"])
    for a, b in zip(jax.tree_util.tree_leaves(stacked[1]), jax.tree_util.tree_leaves(stacked[4])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a batch that does not divide over the devices is a clear error
    from mesacli.errors import MesaError
    from mesacli.sharding import check_batch_divides
    try:
        check_batch_divides(6, make_mesh())
    except MesaError as err:
        assert "multiple of the number of devices (4)" in str(err)
    else:
        raise AssertionError("expected an error")
    try:
        check_batch_divides(2, make_mesh(), "train.micro_batch")
    except MesaError as err:
        assert err.args[0].startswith("train.micro_batch (2) must be a multiple")
    else:
        raise AssertionError("expected an error")
    print("OK")
    """
)


def test_four_host_devices_match_one():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
