"""Fault injection for the three resumable jobs, `train`, `lm train` and `prompt-tune` (issue 21): Ctrl-C and
SIGTERM at random moments (checkpoints every step, so most moments fall inside a save), a second Ctrl-C during a
save, kill -9, each followed by a resume that must end bit-identical to an uninterrupted run; a corrupted newest
checkpoint (the run resumes from the one before); divergence (the checkpoint kept evaluates finite); a stalled step
(the watchdog ends the process with a stack dump and exit code 75).

The default suite injects every fault once into `train` (the loop, the run directory and the checkpoints are
shared by the three); `make test-faults` (marker
``faults``) runs every fault on every job and repeats the random-moment signals MESACLI_FAULT_ROUNDS times
(default 3) for each job and signal."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mesacli import rundir
from mesacli.cli import app
from tests.conftest import TINY, merge

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("MESACLI_FAULT_ROUNDS", "3"))
runner = CliRunner()
STEPS = 24
# the default suite injects the in-process faults into `train` (the loop is shared); make test-faults: all three
ALL_JOBS = ["train", pytest.param("lm", marks=pytest.mark.faults),
            pytest.param("prompt-tune", marks=pytest.mark.faults)]


# ----------------------------------------------------------------------------- the three jobs


class Job:
    """One resumable job: its CLI arguments (run to the end), where it checkpoints, and its trained values."""

    def __init__(self, name: str, argv: list[str], run: Path, checkpoint_parent: Path):
        self.name, self.argv, self.run, self.checkpoint_parent = name, argv, run, checkpoint_parent

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_parent / rundir.CHECKPOINT_DIR

    def values(self) -> list[np.ndarray]:
        """The trained values of the newest checkpoint (model parameters, or the tuned EOS)."""
        if self.name == "train":
            from mesacli.state import load_params

            return [np.asarray(x) for x in jax.tree_util.tree_leaves(load_params(self.run)[1])]
        if self.name == "lm":
            from mesacli.lm.state import load_lm

            return [np.asarray(x) for x in jax.tree_util.tree_leaves(load_lm(self.run)[1])]
        from mesacli.icl.tokens import load_tuned

        return [np.asarray(load_tuned(self.run, TINY["task"]["state_dim"])["eos"])]


def _corpus(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["mesa", "layer", "learns", "in", "context", "the", "model", "solves", "least", "squares", "a", "of"]
    path = directory / "words.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(400)))
    return path


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny synthetic-task run, the frozen model of the prompt-tune jobs."""
    from mesacli.train import train
    from tests.conftest import tiny_spec

    run = tmp_path_factory.mktemp("model") / "run"
    train(tiny_spec(model={"attention": "softmax"}, train={"steps": 4}), run, progress=False)
    return run


def make_job(name: str, directory: Path, trained_model: Path | None = None, **train_overrides) -> Job:
    """A fresh job in ``directory`` checkpointing every step (``train_overrides`` change its spec)."""
    directory.mkdir(parents=True, exist_ok=True)
    run = directory / "run"
    schedule = {"steps": STEPS, "checkpoint_every": 1, "log_every": 1, "eval_every": STEPS, **train_overrides}
    if name == "train":
        spec = directory / "spec.yaml"
        spec.write_text(yaml.safe_dump(merge(TINY, {"train": {"keep_checkpoints": 3, **schedule}})))
        return Job(name, ["train", str(spec), "--run-dir", str(run), "--no-progress"], run, run)
    if name == "lm":
        spec = directory / "lm.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "tiny-lm", "data": {"path": str(_corpus(directory)), "split_block": 256},
            "model": {"layers": ["softmax", "linear"], "context": 16, "embed_dim": 8, "num_heads": 2, "key_size": 4,
                      "dropout": 0.0},
            "train": {"batch_size": 4, "warmup_steps": 1, "keep_checkpoints": 3, **schedule},
            "eval": {"windows": 4, "batch_size": 4, "icl_early": 2, "icl_late": 14}}))
        return Job(name, ["lm", str(spec), "--run-dir", str(run), "--no-progress"], run, run)
    shutil.copytree(trained_model, run)
    lr = train_overrides.get("lr", 0.05)
    argv = ["prompt-tune", str(run), "--what", "eos", "--steps", str(train_overrides.get("steps", STEPS)),
            "--lr", str(lr), "--batch", "8", "--examples", "3", "--checkpoint-every", "1", "--no-progress"]
    return Job(name, argv, run, run / rundir.TUNE_DIR / "eos")


def finish_in_process(job: Job) -> None:
    result = runner.invoke(app, job.argv)
    assert result.exit_code == 0, result.output


_REFERENCES: dict[str, list[np.ndarray]] = {}


def reference_values(name: str, tmp_path: Path, trained_model: Path) -> list[np.ndarray]:
    """The values of the job run without a fault (computed once per job and module)."""
    if name not in _REFERENCES:
        job = make_job(name, tmp_path / "reference", trained_model)
        finish_in_process(job)
        _REFERENCES[name] = job.values()
    return _REFERENCES[name]


def assert_same_values(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical: data and init come from fold_in(seed, step)


# ----------------------------------------------------------------------------- signals in a child process


def start(job: Job) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mesacli.cli", *job.argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def newest_step(job: Job) -> int:
    return max(rundir.saved_steps(job.checkpoint_parent), default=0)


def wait_for_step(job: Job, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    """Until the job has saved the checkpoint of ``step`` (it is inside its loop)."""
    deadline = time.time() + timeout
    while newest_step(job) < step and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{job.name} ended before the fault: {proc.communicate()[0]}")
        time.sleep(0.05)
    assert newest_step(job) >= step, f"{job.name}: no checkpoint of step {step} in {timeout} s"


def inject(job: Job, fault: str, rng: random.Random) -> str:
    """Start the job, let it save a few checkpoints, wait a random moment, deliver ``fault``; returns its output
    after checking the exit: 130 and a resume hint for SIGINT / SIGTERM, -9 for SIGKILL; never a traceback."""
    resumed_from = newest_step(job)
    proc = start(job)
    wait_for_step(job, proc, resumed_from + 1 + rng.randrange(3))
    time.sleep(rng.uniform(0.0, 0.4))
    if proc.poll() is not None:  # it finished first: nothing was interrupted (fine, rare)
        return proc.communicate()[0]
    proc.send_signal({"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}[fault])
    output = proc.communicate(timeout=240)[0]
    assert "Traceback" not in output, output
    if fault == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    elif proc.returncode != 0:  # 0: it had finished its last step when the signal came
        assert proc.returncode == 130, output
        assert "run the same command again" in output, output
        assert rundir.saved_steps(job.checkpoint_parent), output  # the interrupt's checkpoint is there
    return output


def check_faults_then_resume(name: str, faults: list[str], tmp_path: Path, trained_model: Path, seed: int) -> None:
    rng = random.Random(seed)
    job = make_job(name, tmp_path / "faulty", trained_model)
    for fault in faults:
        inject(job, fault, rng)
    finish_in_process(job)
    assert_same_values(job.values(), reference_values(name, tmp_path, trained_model))


@pytest.mark.faults  # 27 s; make test-faults repeats every signal on train (test_repeated_faults_at_random_moments)
def test_train_survives_ctrl_c_kill_9_and_sigterm_at_random_moments(tmp_path, trained_model):
    check_faults_then_resume("train", ["SIGINT", "SIGKILL", "SIGTERM"], tmp_path, trained_model, seed=0)


@pytest.mark.faults
@pytest.mark.parametrize("name", ["lm", "prompt-tune"])
def test_lm_and_prompt_tune_survive_ctrl_c_at_a_random_moment(name, tmp_path, trained_model):
    check_faults_then_resume(name, ["SIGINT"], tmp_path, trained_model, seed=1)


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["SIGINT", "SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("name", ["train", "lm", "prompt-tune"])
def test_repeated_faults_at_random_moments(name, fault, tmp_path, trained_model):
    for seed in range(ROUNDS):
        check_faults_then_resume(name, [fault] * 2, tmp_path / f"round{seed}", trained_model, seed=100 + seed)


# ----------------------------------------------------------------------------- in-process faults


@pytest.mark.parametrize("name", ALL_JOBS)
def test_a_second_ctrl_c_during_a_save_waits_for_the_save(name, tmp_path, trained_model, monkeypatch):
    """Ctrl-C twice while the checkpoint of step 3 is being written: the save completes (a readable checkpoint),
    the command exits 130 with the resume hint, and the resumed run ends bit-identical to an uninterrupted one."""
    from mesacli.checkpoint import Checkpoints

    real_save, calls = Checkpoints.save, []

    def save_with_two_interrupts(self, step, state, meta):
        calls.append(step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # both handlers have run: the second interrupt is held back until the save ends
        real_save(self, step, state, meta)

    job = make_job(name, tmp_path / "faulty", trained_model)
    monkeypatch.setattr(Checkpoints, "save", save_with_two_interrupts)
    result = runner.invoke(app, job.argv)
    monkeypatch.setattr(Checkpoints, "save", real_save)
    assert result.exit_code == 130, result.output
    assert "run the same command again" in result.output and "Traceback" not in result.output
    assert rundir.saved_steps(job.checkpoint_parent)[-1] == 3 and calls[-1] == 3
    finish_in_process(job)
    assert_same_values(job.values(), reference_values(name, tmp_path, trained_model))


def _corrupt_newest(job: Job) -> int:
    newest = rundir.saved_steps(job.checkpoint_parent)[-1]
    data = [p for p in (job.checkpoints / str(newest)).rglob("*") if p.is_file() and "/d/" in str(p)]
    assert data, f"no data files in {job.checkpoints / str(newest)}"
    for path in data:
        path.write_bytes(os.urandom(64))
    return newest


@pytest.mark.parametrize("name", ALL_JOBS)
def test_a_corrupted_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(name, tmp_path,
                                                                                            trained_model):
    job = make_job(name, tmp_path / "faulty", trained_model)
    stop = runner.invoke(app, [*job.argv, "--stop-at", "6"])
    assert stop.exit_code == 0, stop.output
    broken = _corrupt_newest(job)
    result = runner.invoke(app, job.argv)
    assert result.exit_code == 0, result.output
    assert f"checkpoint step {broken}" in result.output and f"resuming from step {broken - 1}" in result.output
    assert (job.checkpoints / f"{broken}.unreadable").is_dir()  # kept for inspection, no longer a step
    assert_same_values(job.values(), reference_values(name, tmp_path, trained_model))


@pytest.mark.parametrize("command", ["eval", pytest.param("probe", marks=pytest.mark.faults),
                                     pytest.param("icl-eval", marks=pytest.mark.faults)])
def test_a_corrupted_checkpoint_is_one_line_naming_the_readable_one(command, tmp_path, trained_model):
    run = tmp_path / "run"
    shutil.copytree(trained_model, run)
    job = Job("train", [], run, run)
    steps = rundir.saved_steps(run)
    assert len(steps) >= 2, steps
    broken = _corrupt_newest(job)
    extra = {"eval": ["--no-baselines"], "probe": ["-a", "probes", "--seeds", "1"], "icl-eval": ["--seeds", "1"]}
    proc = subprocess.run([sys.executable, "-m", "mesacli.cli", command, str(run), *extra[command]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output  # no Orbax tracebacks, no TensorStore dump
    assert f"checkpoint step {broken}" in lines[0] and f"pass --step {steps[-2]}" in lines[0]


@pytest.mark.parametrize("name", ALL_JOBS)
def test_divergence_keeps_a_checkpoint_that_evaluates_finite(name, tmp_path, trained_model):
    """A learning rate far too large: the step whose loss is not finite also condemns the checkpoint saved just
    before it (its parameters are finite but their loss is not); what is kept evaluates finite, and no JSON
    written holds a bare NaN."""
    lr = {"train": 1.0, "lm": 1e3, "prompt-tune": 1e20}[name]
    job = make_job(name, tmp_path / "diverging", trained_model, lr=lr)
    result = runner.invoke(app, job.argv)
    assert result.exit_code == 1, result.output
    assert "non-finite loss" in result.output and "Traceback" not in result.output
    kept = rundir.saved_steps(job.checkpoint_parent)
    assert kept, result.output  # the rate is chosen so that a few steps are good
    assert f"last good checkpoint: step {kept[-1]}" in result.output
    assert all(np.isfinite(v).all() for v in job.values())
    # the session's line counts the steps of the checkpoint kept, not those deleted
    sessions = rundir.read_sessions(job.checkpoint_parent)
    assert [(s["from_step"], s["to_step"], s["ended"]) for s in sessions] == [(0, kept[-1], "error")]
    if name == "train":
        evaluated = runner.invoke(app, ["eval", str(job.run), "--no-baselines"])
        assert evaluated.exit_code == 0, evaluated.output
        record = json.loads((job.run / f"eval_step{kept[-1]}.json").read_text())
        assert record["seq_avg_loss"] is not None and np.isfinite(record["seq_avg_loss"])
    for path in job.run.rglob("*.json*"):
        assert "NaN" not in path.read_text() and "Infinity" not in path.read_text(), path


# ----------------------------------------------------------------------------- a stalled step


def test_a_stalled_step_ends_the_process_with_every_stack_and_exit_75(tmp_path):
    """A step that never returns (the signature of an XLA:CPU thread-pool deadlock): the watchdog prints where
    the run stands and every thread's stack, and exits 75 so that a supervisor restarts it."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mesacli import loop
        from mesacli.checkpoint import Checkpoints

        def step_fn(state, step):
            if step == 3:
                time.sleep(3600)  # stalled
            return {{"step": state["step"] + 1}}, {{"loss": 1.0}}

        run = Path({str(tmp_path)!r})
        loop.run({{"step": 0}}, ckpts=Checkpoints(run / "checkpoints"), run_dir=run, log_path=run / "m.jsonl",
                 end=10, total=10, step_fn=step_fn, every=loop.Every(1, None, 2), meta={{}}, seeds=[0],
                 description="stall", progress=False)
    """)
    env = dict(os.environ, MESACLI_STALL_SECONDS="1", MESACLI_STALL_FIRST_SECONDS="60")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 75, proc.stderr
    assert "no step finished in" in proc.stderr and "at step 4 of 10" in proc.stderr
    assert "the last checkpoint is step 2" in proc.stderr
    # killed outright, the session still says which steps it trained: up to its last checkpoint
    assert [(s["from_step"], s["to_step"], s["ended"], s["interrupted"]) for s in rundir.read_sessions(tmp_path)] \
        == [(0, 2, "checkpoint", True)]
    assert "in step_fn" in proc.stderr and "most recent call first" in proc.stderr  # every thread's stack
    assert time.time() - t0 < 120


@pytest.mark.filterwarnings("ignore:os.fork")  # the parent here has JAX threads; `reproduce run` has none
def test_reproduce_run_restarts_a_stalled_child(tmp_path):
    """`mesacli reproduce run` runs a spec's work in a child and starts it again after a stall (exit 75)."""
    from mesacli.reproduce.run import run_jobs

    marker = tmp_path / "attempts"
    child = ("import sys, pathlib; p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) if p.exists() else 0; "
             "p.write_text(str(n + 1)); sys.exit(75 if n < 2 else 0)")
    said, budgets = [], []

    def command(name, left):
        budgets.append(left)
        return [sys.executable, "-c", child, str(marker)]

    assert run_jobs(["spec"], command, 1, 3600.0, restarts=3, say=said.append, poll_s=0.05) == 0
    assert marker.read_text() == "3" and len(said) == 2 and "spec: the run stalled" in said[0]
    assert budgets[0] > budgets[1] > budgets[2] > 3500  # each attempt gets what is left of the budget
    marker.unlink()
    assert run_jobs(["spec"], command, 1, None, restarts=1, say=said.append, poll_s=0.05) == 75  # the stall stands


# ----------------------------------------------------------------------------- run directories and signals


@pytest.mark.parametrize("command", ["train", "eval", "probe", "icl-eval", "prompt-tune"])  # each fails fast
def test_an_unwritable_run_directory_is_one_line_before_any_work(command, tmp_path, trained_model, monkeypatch):
    """(Checked with os.access: as root, chmod alone does not make a folder unwritable.)"""
    run = tmp_path / "run"
    shutil.copytree(trained_model, run)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode & os.W_OK and str(path).startswith(str(run))
                        else real_access(path, mode))
    spec = tmp_path / "spec.yaml"
    spec.write_text((run / "spec.yaml").read_text())
    argv = {"train": ["train", str(spec), "--run-dir", str(run), "--no-progress"],
            "eval": ["eval", str(run)], "probe": ["probe", str(run), "-a", "probes"],
            "icl-eval": ["icl-eval", str(run)], "prompt-tune": ["prompt-tune", str(run), "--no-progress"]}[command]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to") and "permission denied" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_directory_is_refused_by_eval(tmp_path, trained_model):
    run = tmp_path / "run"
    shutil.copytree(trained_model, run)
    run.chmod(0o555)
    try:
        result = runner.invoke(app, ["eval", str(run)])
    finally:
        run.chmod(0o755)
    assert result.exit_code == 2 and "permission denied" in result.output, result.output


def test_a_run_directory_below_a_file_or_with_brackets_is_one_line(tmp_path, tiny_spec_file):
    spec = tiny_spec_file(train={"steps": 2})
    (tmp_path / "afile").write_text("not a folder")
    for run_dir, fragment in [(tmp_path / "afile" / "run", "is below the file"),
                              (tmp_path / "run[draft]", "'[' or ']'")]:
        result = runner.invoke(app, ["train", str(spec), "--run-dir", str(run_dir), "--no-progress"])
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "run[draft]").exists()  # nothing written


def test_a_failed_start_does_not_poison_the_run_directory(tmp_path):
    """`lm` with a missing corpus fails after the run directory was prepared; the same command with the path
    fixed then trains there (no checkpoint yet: the new spec replaces the old one).  Once a checkpoint exists a
    different spec is refused as before."""
    corpus = _corpus(tmp_path)
    spec = tmp_path / "lm.yaml"
    data = {"name": "tiny-lm", "data": {"path": str(tmp_path / "missing.txt"), "split_block": 256},
            "model": {"layers": ["linear"], "context": 16, "embed_dim": 8, "num_heads": 2, "key_size": 4},
            "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2},
            "eval": {"windows": 4, "batch_size": 4, "icl_early": 2, "icl_late": 14}}
    spec.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    failed = runner.invoke(app, ["lm", str(spec), "--run-dir", str(run), "--no-progress"])
    assert failed.exit_code == 2 and "missing.txt" in failed.output, failed.output
    data["data"]["path"] = str(corpus)
    spec.write_text(yaml.safe_dump(data))
    fixed = runner.invoke(app, ["lm", str(spec), "--run-dir", str(run), "--no-progress"])
    assert fixed.exit_code == 0, fixed.output
    data["train"]["steps"] = 3
    spec.write_text(yaml.safe_dump(data))
    refused = runner.invoke(app, ["lm", str(spec), "--run-dir", str(run), "--no-progress"])
    assert refused.exit_code == 2 and "different spec" in refused.output, refused.output


def test_a_torn_metric_log_with_binary_bytes_resumes(tmp_path, tiny_spec_file):
    spec, run = tiny_spec_file(train={"steps": 6, "checkpoint_every": 2, "log_every": 1}), tmp_path / "run"
    assert runner.invoke(app, ["train", str(spec), "--run-dir", str(run), "--no-progress",
                               "--stop-at", "4"]).exit_code == 0
    with (run / "metrics.jsonl").open("ab") as log:
        log.write(b'{"step": 5, "lo\xff\xfe\x00\x81 torn\n\x00\x00')
    result = runner.invoke(app, ["train", str(spec), "--run-dir", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_json_outputs_never_hold_a_bare_nan(tmp_path):
    from mesacli.checkpoint import dump_json, write_output_json

    record = {"loss": float("nan"), "curve": [1.0, float("inf"), -float("inf")], "nested": {"x": np.float64("nan")}}
    for write in (dump_json, write_output_json):
        path = tmp_path / f"{write.__name__}.json"
        write(path, record)
        assert json.loads(path.read_text()) == {"loss": None, "curve": [1.0, None, None], "nested": {"x": None}}


def test_ctrl_c_raises_a_flag_a_second_one_interrupts_and_an_ignored_one_stays_ignored():
    from mesacli import runtime

    with runtime.stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert runtime.stop_requested()  # the first Ctrl-C only asks the loop to stop after its step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with runtime.stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a background job keeps ignoring it
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- the XLA:CPU deadlock


def test_the_continual_prompt_sampler_draws_both_teachers_in_one_call():
    """The two teachers of a continual prompt come from one batched QR: the same W* as two separate draws."""
    import jax.numpy as jnp

    from mesacli import tasks
    from mesacli.icl.prompts import sample_regression
    from mesacli.spec import TaskSpec

    key, n, examples, batch, switch = jax.random.PRNGKey(3), 4, 12, 8, 5
    x, y = sample_regression(key, n, examples, batch, "uniform", switch)
    _, key_w1, key_w2, _ = jax.random.split(key, 4)
    task = TaskSpec(kind="linear", state_dim=n, obs_dim=n)
    w1, w2 = (jax.vmap(lambda k: tasks.sample_teacher(k, task).w_HH)(jax.random.split(k, batch))
              for k in (key_w1, key_w2))
    want = jnp.where((jnp.arange(examples) < switch)[None, :, None], jnp.einsum("bij,bnj->bni", w1, x),
                     jnp.einsum("bij,bnj->bni", w2, x))
    assert float(jnp.abs(y - want).max()) < 0.05  # the label noise is 0.01 N(0, 1): same teachers
    assert float(jnp.abs(y[:, switch:] - jnp.einsum("bij,bnj->bni", w1, x)[:, switch:]).max()) > 0.1


@pytest.mark.faults
def test_the_continual_prompt_sampler_does_not_deadlock():
    """Two LAPACK QR calls running at once deadlocked XLA:CPU's 2-worker intra-op pool (seen within ~100 calls of
    batch 1024 on a 2-core machine: both workers blocked in jax::ParallelBatchMap waiting for work queued on the
    pool they occupy).  Now one call: 200 calls must finish."""
    script = textwrap.dedent("""
        import jax
        from mesacli.icl.prompts import sample_regression
        f = jax.jit(sample_regression, static_argnums=(1, 2, 3, 4, 5))
        for n in range(200):
            f(jax.random.PRNGKey(n), 10, 112, 1024, "uniform", 56)[1].block_until_ready()
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr


def test_a_checkpoint_written_before_a_spec_key_existed_still_resumes(tmp_path):
    """A key the checkpoint's stored spec lacks counts as its default (a key added later orphans nothing); any
    other difference is a different spec."""
    from mesacli.spec_loader import spec_to_dict
    from tests.conftest import tiny_spec

    spec = tiny_spec()
    stored = spec_to_dict(spec)
    older = {**stored, "train": {k: v for k, v in stored["train"].items() if k != "micro_batch"}}
    assert rundir.same_spec(spec, stored) and rundir.same_spec(spec, older)
    assert not rundir.same_spec(tiny_spec(train={"micro_batch": 4}), older)  # not the default: it matters
    assert not rundir.same_spec(spec, {**stored, "train": {**stored["train"], "lr": 0.5}})
    assert not rundir.same_spec(spec, {**stored, "extra": {}}) and not rundir.same_spec(spec, None)


def test_a_torn_sessions_line_is_skipped_and_the_next_session_still_reads(tmp_path):
    """A crash mid-append (before lines were written atomically) left half a provenance line: reading skips it
    (status, report and --start-from go on) and the next session's line replaces the file whole."""
    rundir.record_session(tmp_path, {"from_step": 0, "to_step": 10})
    with (tmp_path / rundir.SESSIONS_FILE).open("ab") as f:
        f.write(b'{"from_step": 10, "to_st\xff')  # torn, with a stray non-UTF-8 byte
    assert rundir.read_sessions(tmp_path) == [{"from_step": 0, "to_step": 10}]
    rundir.record_session(tmp_path, {"session": "b", "from_step": 10, "to_step": 15})
    rundir.record_session(tmp_path, {"session": "b", "from_step": 10, "to_step": 20})  # the same session, later
    assert [s["to_step"] for s in rundir.read_sessions(tmp_path)] == [10, 20]
    assert b"to_st\xff" not in (tmp_path / rundir.SESSIONS_FILE).read_bytes()
