"""SIGTERM (a scheduler's pre-emption, `kill PID`) stops training like Ctrl-C: after the step under way, with a
checkpoint of it, and the run resumes from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mesacli import runtime
from mesacli.checkpoint import Checkpoints
from mesacli.train import train
from tests.conftest import TINY, merge, tiny_spec

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_inside_the_context_only_raises_the_flag_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with runtime.stop_on_signals():
        assert not runtime.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary: the process is still alive
        assert runtime.stop_requested()
    assert signal.getsignal(signal.SIGTERM) is before and not runtime.stop_requested()


def test_sigterm_stops_training_after_the_step_and_saves_it(tmp_path):
    spec = tiny_spec(train={"steps": 40, "log_every": 2, "eval_every": 40, "checkpoint_every": 40})

    def terminate_at_step_4(step, loss):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    result = train(spec, run, progress=False, on_log=terminate_at_step_4)
    assert result.interrupted and result.step == 4
    ckpts = Checkpoints(run / "checkpoints", read_only=True)
    assert ckpts.latest_step() == 4  # saved although checkpoint_every is 40
    ckpts.close()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    resumed = train(spec, run, progress=False, stop_at_step=6)
    assert resumed.resumed_from == 4 and resumed.step == 6 and not resumed.interrupted


def test_cli_train_in_the_background_stops_on_sigterm_with_a_checkpoint(tmp_path):
    """`nohup mesacli train ... &` ignores SIGINT; `kill PID` (SIGTERM) saves and exits 130 with a resume hint."""
    spec_path, run = tmp_path / "tiny.yaml", tmp_path / "run"
    spec_path.write_text(yaml.safe_dump(merge(TINY, {"train": {"steps": 200000, "log_every": 10, "eval_every": 200000,
                                                               "checkpoint_every": 200000}})))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child inherits the ignored SIGINT
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mesacli.cli", "train", str(spec_path), "--run-dir", str(run),
                                 "--no-progress"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    finally:
        signal.signal(signal.SIGINT, previous)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)  # ignored, as in a background job
    time.sleep(0.5)
    assert proc.poll() is None
    proc.terminate()
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    ckpts = Checkpoints(run / "checkpoints", read_only=True)
    saved = ckpts.latest_step()
    ckpts.close()
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert saved is not None and 10 <= saved < 200000 and saved == last_logged
    assert f"stopped at step {saved} of 200000" in output and "run the same command again" in output
