"""`mesacli reproduce run`: produce what the selected ledger entries need, a time budget at a time.

For every spec the entries read (results/<spec>/, priority order): first its model-free analyses
(``solver:<name>``, ``ledger.needs_model``) whose records are missing, then, if an entry reads its trained model,
train or resume it from the shipped spec at its full step count and run the spec's other analyses whose records
are missing or older than the final step (``eval``, ``probe:<name>``, ``tune:<stage>``, ``icl:<prompts>``,
``icl_continual:<prompts>``).  A spec whose entries read model-free records only is not trained.  The budget is a
deadline for the training and tuning loops (``runtime.deadline``): when it passes, the step under way finishes and
is saved, exactly as on SIGTERM, and no new stage starts; the next call resumes.  After each spec only the latest
checkpoint is kept (the committed record holds one).

``run_jobs`` works on several specs at once, each in its own child process (`reproduce run --jobs N`): on a
2-core CPU one training process gains only ~15 % from the second core (these models' ops are small), so two
processes train about 1.7-1.8x as many steps per hour as one (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Callable

from mesacli import runtime
from mesacli.errors import MesaError
from mesacli.reproduce.ledger import EVAL_TEST_SETS, Ledger, needs_model
from mesacli.reproduce.status import RESULTS_DIR, analysis_current, run_state, shipped_spec
from mesacli.spec_loader import EXPERIMENTS_DIR


def parse_budget(text: str) -> float:
    """'150m', '2h', '1h30m', '90s' or a bare number of minutes -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * 60.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or re.sub(r"\s*(\d+(?:\.\d+)?)\s*[hms]\s*", "", text):
        raise MesaError(f"--budget: '{text}' is not a duration such as 150m, 2h, 1h30m or 90s")
    return sum(float(n) * {"h": 3600.0, "m": 60.0, "s": 1.0}[unit] for n, unit in parts)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def start_point(plan, results_dir: Path) -> Path | None:
    """The run a spec with ``start_from`` continues (results/<start_from>), once that run has a checkpoint."""
    if plan.start_from is None:
        return None
    from mesacli import rundir

    source = Path(results_dir) / plan.start_from
    return source if rundir.saved_steps(source) else None


PROGRESS_LINE_SECONDS = 600.0  # without progress bars, a line per training run this often


def progress_lines(say: Callable[[str], None], name: str, total: int, left: Callable[[], str],
                   every_s: float = PROGRESS_LINE_SECONDS, clock: Callable[[], float] = time.monotonic
                   ) -> Callable[[int, float], None]:
    """An ``on_log(step, loss)`` for ``train`` that says, at most every ``every_s`` seconds, where a run without
    progress bars is: ``name: step s/total, loss, s/step since the last line, budget left``."""
    last = {"time": clock(), "step": None}

    def on_log(step: int, loss: float) -> None:
        now = clock()
        if last["step"] is None:  # the first flush: compilation is behind, time the steps from here
            last.update(time=now, step=step)
            return
        if now - last["time"] < every_s or step <= last["step"]:
            return
        pace = (now - last["time"]) / (step - last["step"])
        say(f"{name}: step {step:,}/{total:,}, loss {loss:.4g}, {pace:.2f} s/step{left()}")
        last.update(time=now, step=step)

    return on_log


@dataclasses.dataclass
class Stage:
    spec: str
    what: str  # "train" or an analysis of the ledger
    seconds: float
    detail: str = ""


@dataclasses.dataclass
class RunReport:
    stages: list[Stage]
    stopped: str | None  # "budget" or "SIGTERM" when stopped before all was produced
    seconds: float
    specs: list[str]


def _run_analysis(analysis: str, plan, run_dir: Path, progress: bool, say: Callable[[str], None],
                  experiments_dir: Path = EXPERIMENTS_DIR) -> tuple[str, bool]:
    """Run one analysis; returns (a short detail, interrupted)."""
    kind, _, arg = analysis.partition(":")
    if kind == "solver":
        from mesacli.probe import run_model_free

        started = time.time()
        run_model_free(run_dir, arg, shipped_spec(run_dir.name, experiments_dir), options=plan.probe_options(),
                       report=say if progress else None)
        return f"{time.time() - started:.0f}s", False
    if kind in EVAL_TEST_SETS:
        from mesacli.evaluate import evaluate_run

        report = evaluate_run(run_dir, test_set=EVAL_TEST_SETS[kind])
        return f"seq-avg {float(report.curves[next(iter(report.curves))].mean()):.4f}", False
    if kind == "probe":
        from mesacli.probe import run_probe

        result = run_probe(run_dir, [arg], options=plan.probe_options(), report=say if progress else None)
        return f"{result.seconds:.0f}s", False
    if kind == "tune":
        import jax

        from mesacli.icl.tune import TuneConfig, prompt_tune

        micro = 16 if jax.default_backend() == "cpu" and TuneConfig.batch % 16 == 0 else None  # same update, faster
        cfg = TuneConfig(steps=plan.tune_steps, prefix_len=plan.tune_prefix_len, micro_batch=micro)
        results = prompt_tune(run_dir, arg, cfg, progress=progress)
        last = results[-1]
        return f"{last.stage} step {last.step}", last.interrupted or last.step < cfg.steps
    from mesacli.icl.evaluate import icl_eval

    report = icl_eval(run_dir, arg, continual=kind == "icl_continual", seeds=plan.icl_seeds, batch=plan.icl_batch)
    return str(report.json_path.name if report.json_path else ""), False


def analysis_due(analysis: str, plan, state, with_model: bool) -> bool:
    """Whether ``analysis`` is one of ``plan``'s analyses that need the trained model (``with_model``) or one that
    does not, and its record is missing or not current in the run ``state``."""
    return needs_model(analysis) == with_model and not analysis_current(analysis, plan, state)


def analyses_due(plan, state, with_model: bool) -> bool:
    return any(analysis_due(a, plan, state, with_model) for a in plan.analyses)


def specs_with_work(ledger: Ledger, ids: list[str] | None = None, results_dir: Path = RESULTS_DIR,
                    experiments_dir: Path = EXPERIMENTS_DIR) -> list[str]:
    """The specs (priority order) for which ``reproduce_run`` has something to do for the entries ``ids``:
    training, tuning or an analysis whose record is missing or not current (or an outdated run, which it refuses)."""
    entries = [e for e in ledger.select(ids) if not e.blocked]
    work = []
    for name in ledger.spec_order(entries):
        plan = ledger.specs[name]
        state = run_state(name, plan, results_dir, experiments_dir)
        needs_training = any(name in e.trained_specs() for e in entries)
        if state.outdated or analyses_due(plan, state, with_model=False) or (
                needs_training and (not state.trained or analyses_due(plan, state, with_model=True))):
            work.append(name)
    return work


def reproduce_run(ledger: Ledger, ids: list[str] | None = None, *, budget_s: float | None = None,
                  results_dir: Path = RESULTS_DIR, experiments_dir: Path = EXPERIMENTS_DIR, progress: bool = True,
                  say: Callable[[str], None] = print, specs: list[str] | None = None) -> RunReport:
    """Train / resume and analyse what the entries ``ids`` (all by default) need, until done or out of budget;
    ``specs``: only the work of these specs (one job of ``run_jobs``)."""
    from mesacli import rundir
    from mesacli.train import train

    t0 = time.time()
    entries = [e for e in ledger.select(ids) if not e.blocked]
    names = [n for n in ledger.spec_order(entries) if specs is None or n in specs]
    stages: list[Stage] = []
    stopped = None

    def left() -> str:
        rest = runtime.seconds_left()
        return "" if rest is None else f", budget left {format_seconds(rest)}"

    def must_stop() -> str | None:
        if not runtime.stop_requested():
            return None
        rest = runtime.seconds_left()
        return "budget" if rest is not None and rest <= 0 else "SIGTERM"

    with runtime.stop_on_signals(), runtime.deadline(budget_s):
        for n, name in enumerate(names, 1):
            if (stopped := must_stop()) is not None:
                break
            plan = ledger.specs[name]
            state = run_state(name, plan, results_dir, experiments_dir)
            if state.outdated:
                raise MesaError(f"{state.run_dir} was trained with a spec other than the shipped {name}.yaml; "
                                f"move it away to retrain it from the shipped spec")
            wanting = [e.id for e in entries if name in e.specs()]
            count = f"[{n}/{len(names)}] " if specs is None else ""  # a job of run_jobs works on one spec
            head = f"{count}{name} ({len(wanting)} entries: {', '.join(wanting[:3])}" + \
                   (", ..." if len(wanting) > 3 else "") + ")"

            needs_training = any(name in e.trained_specs() for e in entries)
            for with_model in (False, True):  # the model-free analyses first: they need no training
                if with_model and (stopped or not needs_training):
                    break
                if with_model and not state.trained:
                    source = start_point(plan, results_dir)
                    begin = f"step {state.start_step} of {state.total_steps} (from {source})" \
                        if source and not state.trained_steps else f"step {state.trained_steps} of {state.total_steps}"
                    say(f"{head}: training from {begin}{left()}")
                    started = time.time()
                    result = train(shipped_spec(name, experiments_dir), state.run_dir, progress=progress,
                                   start_from=source, moments_dtype="bfloat16" if plan.compact_checkpoints else None,
                                   on_log=None if progress else progress_lines(say, name, state.total_steps, left))
                    trained = result.step - (result.resumed_from or 0)
                    pace = f", {result.seconds / trained:.2f} s/step" if trained > 0 else ""
                    stages.append(Stage(name, "train", time.time() - started,
                                        f"step {result.step}/{state.total_steps}{pace}"))
                    if result.interrupted or result.step < state.total_steps:
                        stopped = must_stop() or "SIGTERM"
                    else:
                        state = run_state(name, plan, results_dir, experiments_dir)
                for analysis in plan.analyses:
                    if stopped or (stopped := must_stop()) is not None:
                        break
                    if not analysis_due(analysis, plan, state, with_model):  # state: as the last stage left it
                        continue
                    say(f"{head}: {analysis}{left()}")
                    started = time.time()
                    detail, interrupted = _run_analysis(analysis, plan, state.run_dir, progress, say,
                                                        experiments_dir)
                    stages.append(Stage(name, analysis, time.time() - started, detail))
                    if interrupted:
                        stopped = must_stop() or "SIGTERM"
                        break
                    state = run_state(name, plan, results_dir, experiments_dir)
            rundir.prune_checkpoints(state.run_dir, keep=1)
            for stage_dir in (state.run_dir / rundir.TUNE_DIR).glob("*"):
                rundir.prune_checkpoints(stage_dir, keep=1)
            if stopped:
                break
    return RunReport(stages, stopped, time.time() - t0, names)


def run_jobs(names: list[str], command_for: Callable[[str, float | None], list[str]], jobs: int,
             budget_s: float | None, restarts: int, waits_for: Callable[[str], str | None] = lambda name: None,
             say: Callable[[str], None] = print, poll_s: float = 0.5) -> int:
    """Run ``command_for(name, seconds left of the budget)`` (an argv) for every name, in order, at most ``jobs``
    child processes at a time; a name whose ``waits_for(name)`` is still queued or running starts after it.  A
    child that stalled (``runtime.EXIT_STALLED``) is started again, at most ``restarts`` times per name.  SIGTERM
    and Ctrl-C are passed on to every running child once and start nothing new; so does the end of the budget.
    Returns 130 if a child was stopped by a signal, else the first other non-zero exit code, else 0."""
    import signal
    import subprocess

    deadline = None if budget_s is None else time.monotonic() + budget_s
    queue, running, tries, codes = list(names), {}, dict.fromkeys(names, 0), []
    stopping = []

    def forward(signum, frame):
        stopping.append(signum)
        for child in running.values():
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            left = None if deadline is None else deadline - time.monotonic()
            while queue and len(running) < jobs and not stopping and (left is None or left > 0):
                ready = [n for n in queue if waits_for(n) is None or waits_for(n) not in set(queue) | set(running)]
                if not ready:
                    break
                name = ready[0]
                queue.remove(name)
                running[name] = subprocess.Popen(command_for(name, left),
                                                 preexec_fn=lambda: runtime.die_with_parent(True))
            if not running:
                break  # out of budget or stopped, with names left
            time.sleep(poll_s)
            for name, child in list(running.items()):
                if (code := child.poll()) is None:
                    continue
                del running[name]
                if code == runtime.EXIT_STALLED and tries[name] < restarts and not stopping:
                    tries[name] += 1
                    queue.insert(0, name)
                    say(f"{name}: the run stalled (exit code {code}); restarting it from its last checkpoint "
                        f"({tries[name]} of {restarts} restarts)")
                elif code != 0:
                    codes.append(code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping or 130 in codes:
        return 130
    return next((c for c in codes if c != 0), 0)
