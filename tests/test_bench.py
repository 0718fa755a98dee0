"""The kernel benchmark on tiny shapes: rows, ratios, the memory skip rule, the slow-call rule and the CLI."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from mesacli import render
from mesacli.bench import (
    KERNELS,
    BenchConfig,
    _time_interleaved,
    kernel_functions,
    make_inputs,
    make_mesanet_inputs,
    run_bench,
)
from mesacli.cli import app
from mesacli.mesa import mesa_sequential
from mesacli.mesanet import mesanet_reference

TINY = BenchConfig(batch=1, heads=1, seq_lens=(16, 40), d_head=8, chunk_size=8, repeats=1)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_result():
    messages = []
    result = run_bench(TINY, progress=messages.append)
    return result, messages


def test_rows_for_every_kernel_and_length(tiny_result):
    result, messages = tiny_result
    assert [(r["kernel"], r["T"]) for r in result["rows"]] == [(k, t) for t in (16, 40) for k in KERNELS]
    for row in result["rows"]:
        assert row["skipped"] is None and row["note"] is None
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_mem_mib", "fwd_bwd_mem_mib"):
            assert row[key] > 0, (row, key)
    assert result["config"]["device"] == str(jax.devices()[0]) and result["config"]["jax"] == jax.__version__
    assert messages and messages[0] == "T=16: compiling softmax fwd"
    assert messages[-1].startswith(f"T=40: timing {2 * len(KERNELS)} functions")  # fwd and fwd+bwd per kernel
    json.dumps(result)  # serialisable as is


def test_ratios_are_relative_to_chunked_linear_attention(tiny_result):
    result, _ = tiny_result
    by_key = {(r["kernel"], r["T"]): r for r in result["rows"]}
    for ratio in result["ratios"]:
        row, base = by_key[(ratio["kernel"], ratio["T"])], by_key[("linear_chunked", ratio["T"])]
        assert ratio["fwd_bwd_ms_vs_linear"] == pytest.approx(row["fwd_bwd_ms"] / base["fwd_bwd_ms"])
        assert ratio["fwd_mem_mib_vs_linear"] == pytest.approx(row["fwd_mem_mib"] / base["fwd_mem_mib"])
        assert ratio["fwd_gflop_vs_linear"] == pytest.approx(row["fwd_gflop"] / base["fwd_gflop"])
        if ratio["kernel"] == "mesa_chunked":
            seq = by_key[("mesa_sequential", ratio["T"])]
            assert ratio["seq_over_chunked_fwd"] == pytest.approx(seq["fwd_ms"] / row["fwd_ms"])
        else:
            assert ratio["seq_over_chunked_fwd"] is None


def test_matmul_flops_of_chunked_linear_attention_match_the_formula(tiny_result):
    """Chunked linear attention, per chunk and head: Q K^T and (masked scores) V, Q S and the state update K^T V,
    i.e. 2 (C^2 D + C^2 V + 2 C D V) FLOPs (D = V); the mesa-layer's counts exceed it."""
    result, _ = tiny_result
    c, d = TINY.chunk_size, TINY.d_head
    for row in result["rows"]:
        if row["kernel"] == "linear_chunked":
            chunks = -(-row["T"] // c)
            assert row["fwd_gflop"] * 1e9 == pytest.approx(chunks * TINY.batch * TINY.heads * 2 * (2 * c * c * d
                                                                                                     + 2 * c * d * d))
            assert row["fwd_bwd_gflop"] > 2 * row["fwd_gflop"]
    mesa = [r for r in result["ratios"] if r["kernel"] == "mesa_chunked"]
    assert mesa and all(r["fwd_gflop_vs_linear"] > 1.5 for r in mesa)


def test_benchmarked_mesa_forms_compute_the_mesa_layer():
    """'mesa (sequential scan)' and 'mesa (chunked)' both equal mesa_sequential(...)[0]."""
    args, _ = make_inputs(replace(TINY, heads=2), 20, jnp.float32)
    expected = jax.jit(lambda *a: mesa_sequential(*a)[0])(*args)
    for name in ("mesa_sequential", "mesa_chunked"):
        np.testing.assert_allclose(jax.jit(kernel_functions(name, 8)[0])(*args), expected, rtol=1e-4, atol=1e-4)


def test_mesanet_kernels_compute_mesanet_on_fla_inputs_and_report_cg_steps(tiny_result):
    result, _ = tiny_result
    rows = {(r["kernel"], r["T"]): r for r in result["rows"]}
    for t in (16, 40):
        cg, fixed = rows[("mesanet_cg", t)], rows[("mesanet_cg_fixed", t)]
        assert 1 <= cg["cg_steps_mean"] <= cg["cg_steps_max"] <= 10 * TINY.d_head and cg["cg_residual_max"] < 1e-3
        assert fixed["cg_steps_mean"] == fixed["cg_steps_max"] == 30
        assert rows[("mesanet_exact", t)]["cg_steps_max"] is None and rows[("softmax", t)]["cg_steps_mean"] is None
    assert [c.header for c in render.bench_table(result).columns][-3:] == ["CG steps\nmean / max", "CG max\nresidual",
                                                                           "note"]
    args, cot = make_mesanet_inputs(replace(TINY, heads=2), 20, jnp.float32)
    q, k, v, log_gamma, beta, lam = (np.asarray(x) for x in args)
    assert 0 <= q.min() and q.max() <= 0.1 and 0 <= v.min() and v.max() <= 0.1
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), 1, rtol=1e-5)
    assert 0.8 <= np.exp(log_gamma).min() and np.exp(log_gamma).max() <= 0.99 and 0 <= beta.min() <= beta.max() <= 1
    assert lam.shape == (2, 8) and 0.25 <= lam.min() and lam.max() <= 1
    expected = jax.jit(mesanet_reference)(*args)
    for name, tol in (("mesanet_exact", 1e-4), ("mesanet_cg", 1e-3), ("mesanet_cg_fixed", 1e-3)):
        forward, forward_backward = kernel_functions(name, 8)
        np.testing.assert_allclose(jax.jit(forward)(*args), expected, rtol=tol, atol=tol * 0.1, err_msg=name)
    grads = jax.jit(forward_backward)(*args, cot)  # with respect to every input
    assert [g.shape for g in grads] == [x.shape for x in args]


def test_memory_limit_skips_before_running(tiny_result):
    result, _ = tiny_result
    small, large = (next(r for r in result["rows"] if r["kernel"] == "softmax" and r["T"] == t) for t in (16, 40))
    assert large["fwd_bwd_mem_mib"] > max(small["fwd_mem_mib"], small["fwd_bwd_mem_mib"])
    limit_mib = (max(small["fwd_mem_mib"], small["fwd_bwd_mem_mib"]) + large["fwd_bwd_mem_mib"]) / 2
    rows = run_bench(replace(TINY, kernels=("softmax",), max_memory_gb=limit_mib / 1024))["rows"]
    assert rows[0]["skipped"] is None and rows[0]["fwd_bwd_ms"] > 0
    assert rows[1]["skipped"].startswith("skipped: ") and "fwd+bwd needs" in rows[1]["skipped"]
    assert rows[1]["fwd_bwd_ms"] is None and rows[1]["fwd_bwd_mem_mib"] > 0  # the estimate is still reported

    rows = run_bench(replace(TINY, kernels=("softmax",), seq_lens=(16,), max_memory_gb=1e-9))["rows"]
    assert rows[0]["fwd_ms"] is None and rows[0]["fwd_bwd_ms"] is None
    assert "fwd needs" in rows[0]["skipped"] and "fwd+bwd needs" in rows[0]["skipped"]


def test_timing_rounds_interleave_the_kernels():
    calls = []

    def job(name, seconds=0.0):
        def run():
            calls.append(name)
            time.sleep(seconds)
            return name
        return run, ()

    # margins wide enough for a loaded machine: a no-op call must stay under 0.2 s, the slow one takes 0.4 s
    timings = _time_interleaved({"a": job("a"), "b": job("b"), "slow": job("slow", 0.4)}, repeats=3,
                                max_call_seconds=0.2)
    assert calls == ["a", "b", "slow"] + ["a", "b"] * 3  # warm-ups, then rounds; the slow job only once
    assert timings["slow"][0] >= 400 and "one call only" in timings["slow"][1]
    assert timings["a"][1] is None and timings["a"][0] >= 0


def test_a_slow_warm_up_call_is_the_only_timing():
    rows = run_bench(replace(TINY, kernels=("linear_chunked",), seq_lens=(16,), repeats=5, max_call_seconds=0))["rows"]
    assert rows[0]["fwd_ms"] > 0 and rows[0]["skipped"] is None
    assert "fwd: one call only" in rows[0]["note"] and "fwd+bwd: one call only" in rows[0]["note"]


def test_cli_bench_writes_json_and_prints_a_table(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    result = runner.invoke(app, ["bench", "--batch", "1", "--heads", "1", "--seq-lens", "16", "--d-head", "8",
                                 "--chunk-size", "8", "--repeats", "1", "--kernels", "linear_chunked,mesa_chunked",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mesa (chunked)" in result.output and "linear (chunked)" in result.output
    data = json.loads(out.read_text())
    assert data["config"]["seq_lens"] == [16] and data["config"]["jax"] == jax.__version__
    assert [r["kernel"] for r in data["rows"]] == ["linear_chunked", "mesa_chunked"]
    assert set(data["rows"][0]) >= {"kernel", "T", "fwd_ms", "fwd_bwd_ms", "fwd_mem_mib", "fwd_bwd_mem_mib", "skipped"}


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--kernels", "softmax,flash"], "unknown kernel 'flash'"),
        (["--kernels", " , "], "--kernels must name at least one kernel"),
        (["--seq-lens", "512,abc"], "--seq-lens must be a comma-separated list of positive integers"),
        (["--seq-lens", "512,0"], "--seq-lens must be positive integers"),
        (["--seq-lens", ""], "--seq-lens must be a comma-separated list"),
        (["--batch", "0"], "--batch must be a positive integer"),
        (["--heads", "-2"], "--heads must be a positive integer"),
        (["--d-head", "0"], "--d-head must be a positive integer"),
        (["--repeats", "0"], "--repeats must be a positive integer"),
        (["--chunk-size", "0"], "--chunk-size must be an integer >= 1"),
        (["--dtype", "float16"], "--dtype must be one of float32, float64"),
        (["--max-memory-gb", "0"], "--max-memory-gb must be a positive number"),
    ],
)
def test_cli_bench_bad_input(args, fragment, tmp_path):
    result = runner.invoke(app, ["bench", "--out", str(tmp_path / "b.json"), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "b.json").exists()


def test_cli_bench_out_is_a_directory(tmp_path):
    result = runner.invoke(app, ["bench", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error:") and "is a directory" in result.output
