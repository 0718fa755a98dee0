"""`mesacli bench-train` on tiny specs: the FLOP count (loops, batch size, micro-batches, forward x 3), the rows and
the CLI (shipped spec names, --out, a one-line error for an unknown spec)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from mesacli.flops import count_flops
from mesacli.train_bench import prepare_train_step, step_flops
from tests.conftest import assert_one_line_error, invoke, tiny_spec


def test_count_flops_counts_matmuls_once_per_loop_iteration():
    x = jnp.ones((8, 8))
    matmul = 2 * 8**3
    assert count_flops(jax.make_jaxpr(lambda a: a @ a)(x)).matmul == matmul
    batched = count_flops(jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(
        jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))))
    assert batched.matmul == 2 * 3 * 4 * 6 * 5

    def scanned(a):
        return jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]

    assert count_flops(jax.make_jaxpr(scanned)(x)).matmul == 5 * matmul
    assert count_flops(jax.make_jaxpr(jax.jit(scanned))(x)).matmul == 5 * matmul  # inside a jit
    assert count_flops(jax.make_jaxpr(lambda a: jax.lax.fori_loop(0, 3, lambda i, c: c @ a, a))(x)).matmul \
        == 3 * matmul
    branches = count_flops(jax.make_jaxpr(lambda a: jax.lax.cond(a[0, 0] > 0, lambda b: b @ b @ b, lambda b: b, a))(x))
    assert branches.matmul == 2 * matmul  # the costlier branch
    loop = count_flops(jax.make_jaxpr(lambda a: jax.lax.while_loop(lambda c: c[0, 0] < 9, lambda c: c @ a, a))(x))
    assert loop.matmul == matmul and loop.unknown_trip_loops == 1  # trip count unknown: the body once, flagged


def _flops(**sections) -> dict:
    return step_flops(prepare_train_step(tiny_spec(**sections)))


def test_step_flops_grow_with_the_model_and_in_proportion_to_the_batch():
    base = _flops()
    assert base["gflops"] > 0 and base["data_gflops"] > 0 and base["elementwise_gflops"] > 0
    assert base["uncounted_ops"] == {"qr": 1}  # the random orthogonal teachers of the data (not in gflops)
    # forward + backward: about 3 forward passes (the first projection needs no input gradient, so a bit less)
    assert 2.5 * base["forward_gflops"] < base["gflops"] <= 3.0 * base["forward_gflops"] * 1.001
    assert _flops(train={"batch_size": 16})["gflops"] == pytest.approx(2 * base["gflops"], rel=0.01)
    assert _flops(model={"layers": 4})["gflops"] > 1.8 * base["gflops"]


def test_micro_batched_step_counts_the_flops_of_one_pass():
    """The gradient scan over micro-batches is counted per iteration (XLA's cost analysis counts its body once)."""
    for attention in ("linear", "softmax"):
        one = _flops(model={"attention": attention})
        micro = _flops(model={"attention": attention}, train={"micro_batch": 2})
        assert micro["gflops"] == pytest.approx(one["gflops"], rel=0.01)
        assert micro["forward_gflops"] == one["forward_gflops"]


def test_cli_writes_rows_for_a_spec_file_and_a_shipped_spec_name(tmp_path, tiny_spec_file):
    out = tmp_path / "sub" / "bench_train.json"
    result = invoke("bench-train", tiny_spec_file(), "lsa1_constructed", "--set", "train.batch_size=8",
                    "--set", "task.seq_len=8", "--steps", 2, "--repeats", 1, "--matmul-size", 64,
                    "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "mfu" in result.output and "lsa1_constructed" in result.output and f"results: {out}" in result.output
    data = json.loads(out.read_text())
    assert data["matmul_gflops"] > 0 and data["matmul"]["n"] == 64 and data["jax"] == jax.__version__
    assert "dot_general" in data["flops_method"] and data["devices"] == jax.device_count()
    assert [r["spec"] for r in data["rows"]] == ["tiny", "lsa1_constructed"]
    for row in data["rows"]:
        assert row["batch_size"] == 8 and row["seq_len"] == 8 and row["params"] > 0
        for key in ("s_per_step", "cpu_s_per_step", "steps_per_s", "compile_s", "gflops", "gflops_per_s", "mfu",
                    "data_s", "xla_gflops"):
            assert row[key] > 0, (key, row)
        assert row["mfu"] == pytest.approx(row["gflops"] / row["s_per_step"] / data["matmul_gflops"])
        assert len(row["block_s_per_step"]) == 1


def test_unknown_spec_name_is_a_one_line_error():
    assert_one_line_error(invoke("bench-train", "softmax7_ful"), "did you mean softmax7_full?")
    assert_one_line_error(invoke("bench-train", "no/such/spec.yaml"), "spec file not found")
