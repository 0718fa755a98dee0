"""Several processes on one machine (127.0.0.1, gloo CPU collectives, 2 host devices each).

Each test starts real processes, so all four are marked ``distributed`` and run with ``make test-distributed``
(the default suite stays under 10 minutes on 2 cores; multi-device sharding in one process is tested there,
tests/test_multidevice.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mesacli.state import load_params
from mesacli.train import train

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec_file, run_dir, n, port, *extra, process_ids=None, devices=2, timeout=30):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    procs = []
    for i in process_ids if process_ids is not None else range(n):
        args = [sys.executable, "-m", "mesacli.cli", "train", str(spec_file), "--run-dir", str(run_dir),
                "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                "--process-id", str(i), "--init-timeout", str(timeout), "--heartbeat", "5", *extra]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def finish(procs, timeout=300):
    return [(p.wait(timeout=timeout), p.stdout.read(), p.stderr.read()) for p in procs]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.distributed
def test_two_processes_equal_one_process_and_resume_in_one(tiny_spec_file, tmp_path):
    spec_file = tiny_spec_file()
    multi, single = tmp_path / "multi", tmp_path / "single"
    results = finish(launch(spec_file, multi, 2, free_port(), "--stop-at", "4"))
    for code, _out, err in results:
        assert code == 0, err[-2000:]
    assert "stopped at step 4 of 6" in results[0][1]  # process 0 reports
    reference = train(load_params_spec(multi), single, progress=False)  # 1 process, 1 device, 6 steps
    spec, params_multi, step = load_params(multi, 4)
    _, params_single, _ = load_params(single, 4)
    assert step == 4
    assert_close(params_multi, params_single)
    # the 2-process checkpoint resumes in this single process and follows the same curve
    resumed = train(spec, multi, progress=False)
    assert resumed.resumed_from == 4 and resumed.step == 6
    assert_close(resumed.params, reference.params)
    losses = {r["step"]: r["loss"] for r in map(json.loads, (multi / "metrics.jsonl").read_text().splitlines())}
    ref = {r["step"]: r["loss"] for r in map(json.loads, (single / "metrics.jsonl").read_text().splitlines())}
    assert sorted(losses) == list(range(1, 7))
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=1e-4)


def load_params_spec(run_dir):
    from mesacli.spec import load_spec

    return load_spec(run_dir / "spec.yaml")


def assert_close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_a_dead_peer_stops_the_other_process_with_a_message(tiny_spec_file, tmp_path):
    spec_file = tiny_spec_file(train={"steps": 100000, "checkpoint_every": 5, "eval_every": 100000})
    run = tmp_path / "run"
    procs = launch(spec_file, run, 2, free_port())
    deadline = time.time() + 240
    while not (run / "checkpoints" / "5").exists():  # training is under way
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.5)
    os.killpg(procs[1].pid, signal.SIGKILL)  # process 1 and its worker die
    killed_at = time.time()
    code, _, err = finish(procs[:1], timeout=120)[0]
    assert time.time() - killed_at < 60
    assert code == 3, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "another process of this run stopped" in lines[0], err[-2000:]
    assert "Traceback" not in err
    _, _, step = load_params(run)  # the last checkpoint is good
    assert step >= 5


@pytest.mark.distributed
def test_unreachable_coordinator_is_a_bounded_wait(tiny_spec_file, tmp_path):
    started = time.time()
    code, _, err = finish(launch(tiny_spec_file(), tmp_path / "run", 2, free_port(), process_ids=[1], timeout=5))[0]
    assert time.time() - started < 90
    assert code == 3, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "could not reach the coordinator" in lines[0], err[-2000:]


@pytest.mark.distributed
def test_different_specs_and_batches_that_do_not_divide(tiny_spec_file, tmp_path):
    spec_file = tiny_spec_file()
    port = free_port()
    procs = launch(spec_file, tmp_path / "a", 2, port, process_ids=[0])
    procs += launch(spec_file, tmp_path / "a", 2, port, "--set", "train.lr=0.5", process_ids=[1])
    for code, _, err in finish(procs):
        assert code == 2, err[-2000:]
        assert "started with different specs" in error_lines(err)[0]
    # 2 processes x 2 devices = 4 devices; a batch of 6 cannot be split over them
    for code, _, err in finish(launch(spec_file, tmp_path / "b", 2, free_port(), "--set", "train.batch_size=6")):
        assert code == 2, err[-2000:]
        assert "multiple of the number of devices (4)" in error_lines(err)[0]


@pytest.mark.distributed
def test_seeds_spread_over_two_processes_equal_the_plain_runs(tiny_spec_file, tmp_path):
    # 4 replicas over 2 processes of 1 device each (2 replicas a process): replica i is the plain run with seed i;
    # before, the per-replica metrics were sharded over the processes and the loop could not read them
    spec_file = tiny_spec_file(train={"seeds": 4})
    results = finish(launch(spec_file, tmp_path / "multi", 2, free_port(), devices=1))
    for code, _out, err in results:
        assert code == 0, err[-2000:]
    spec, stacked, step = load_params(tmp_path / "multi")
    lines = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines[-1]["loss_per_seed"]) == 4
    for i in range(4):
        one = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seeds=1, seed=spec.train.seed + i))
        plain = train(one, tmp_path / f"plain{i}", progress=False)
        assert_close(jax.tree_util.tree_map(lambda x, i=i: x[i], stacked), plain.params)
