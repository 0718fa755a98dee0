"""The one guarded training loop, shared by ``train``, ``lm train`` and ``prompt-tune``.

``run(...)`` takes a restored (or fresh) state and a checkpoint manager and steps it to ``end``:

- metrics are buffered on device and flushed every ``log`` steps (and at evaluations and checkpoints) into a
  JSONL log (``MetricLog``); on resume the log is first cut back to the restored step (``truncate_jsonl``);
- a non-finite loss (or parameters, where the step reports ``params_finite``) raises ``TrainingDiverged``,
  deleting the checkpoints that do not evaluate finite and naming the last good one;
- SIGTERM and Ctrl-C (which stop after the step under way: ``runtime.stop_on_signals``; a second Ctrl-C cuts the
  step, never a save) flush the log, save the last finished step and return ``interrupted = True``;
- a stalled step (no progress for far longer than the slowest step) ends the process with exit code 75
  (``runtime.StallWatchdog``), the last checkpoint kept;
- one progress bar (``progress_bar``) shows the step, the loss and the time left;
- a session that trained steps has its line in the run directory's ``sessions.jsonl`` (``session_record``: the
  steps, the wall time, how it ended, the devices and host), written at every checkpoint and at its end, so a run
  trained over several sessions or machines says where, even when a session was killed outright.

``accumulated_value_and_grad`` is the gradient accumulation over micro-batches used by the train and tune steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mesacli import runtime
from mesacli.checkpoint import Checkpoints, finite_or_none
from mesacli.errors import MesaError
from mesacli.rundir import CHECKPOINT_DIR, forget_session, record_session


class TrainingDiverged(MesaError):
    """The loss or the parameters became non-finite; the last good checkpoint is kept.

    ``first_bad_params``: the number of updates after which the parameters were found bad (the step with 0-based
    index i evaluates the loss of the parameters after i updates: a non-finite loss there condemns them)."""

    def __init__(self, message: str, first_bad_params: int = 0):
        super().__init__(message)
        self.first_bad_params = first_bad_params


# ----------------------------------------------------------------------------- gradient accumulation


def accumulated_value_and_grad(loss: Callable, params, batch, micro_batch: int | None,
                               sharding: NamedSharding | None = None):
    """(L, dL/dparams) of the batch-mean loss L = (1/M) sum_m L_m over M equal micro-batches of
    ``micro_batch`` sequences (micro-batch m holds rows m, m + M, m + 2M, ...), accumulated in a
    ``lax.scan``: the full batch's value and gradient up to float rounding, with 1/M of the working set.
    ``micro_batch=None`` (or the whole batch) takes one pass."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if micro_batch is None or micro_batch >= size:
        return jax.value_and_grad(loss)(params, batch)
    count = size // micro_batch
    # [B, ...] -> [M, B/M, ...] with row i*M + m in micro-batch m: each micro-batch keeps the batch's
    # split over the "data" devices (every device's rows stay on it)
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(micro_batch, count, *x.shape[1:]), 0, 1), batch)

    def accumulate(carry, micro_batch_data):
        if sharding is not None:
            micro_batch_data = jax.lax.with_sharding_constraint(micro_batch_data, sharding)
        value, grads = jax.value_and_grad(loss)(params, micro_batch_data)
        return jax.tree.map(jnp.add, carry, (value, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (value, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    return value / count, jax.tree.map(lambda g: g / count, grads)


# ----------------------------------------------------------------------------- the metric log


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the lines of a JSONL log written after ``last_step`` (the checkpoint a run resumes from), and any
    unreadable line (not JSON, not UTF-8), so that the resumed log has no duplicates."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn or overwritten line (a crash mid-write, a disk fault)
    path.write_text("".join(k + "\n" for k in keep))


class MetricLog:
    """Buffers per-step device metrics; ``flush`` syncs them, checks finiteness and appends JSONL lines.

    A step's metrics hold ``loss`` (per replica when seeds are stacked), optionally ``params_finite``, and any other
    scalars (``grad_norm``, ``lr``), logged as their mean: {"step", "loss", <others>} every ``log_every`` steps
    and at every flush.  With several seeds the line also has ``loss_std`` and ``loss_per_seed``.  The flushed
    step's line has ``step_seconds`` when the loop sets it: the wall time per step of the interval (evaluation
    and checkpoint time excluded)."""

    def __init__(self, path: Path, log_every: int, seeds: list[int], write: bool = True, hint: str = ""):
        self.path, self.log_every, self.seeds, self.write, self.hint = Path(path), log_every, seeds, write, hint
        self.pending: list[tuple[int, dict]] = []
        self.last_loss = float("nan")
        self.step_seconds: float | None = None  # set by the loop before a flush: wall seconds per step since the last

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, extra: dict | None = None) -> None:
        pending, self.pending = jax.device_get(self.pending), []
        lines = []
        for step, m in pending:
            loss = np.atleast_1d(np.asarray(m["loss"], np.float64))
            bad = ~(np.isfinite(loss) & np.atleast_1d(np.asarray(m.get("params_finite", True))))
            if bad.any():
                self._write(lines)
                bad_seeds = ", ".join(str(s) for s in np.array(self.seeds)[bad])
                which = "" if len(self.seeds) == 1 else f" (seed {bad_seeds})"
                finite_loss = bool(np.isfinite(loss).all())  # bad parameters alone: these updated ones are bad
                raise TrainingDiverged(f"non-finite loss or parameters at step {step + 1}{which}",
                                       step if not finite_loss else step + 1)
            self.last_loss = float(loss.mean())
            if (step + 1) % self.log_every == 0 or step == pending[-1][0]:
                line = {"step": step + 1, "loss": self.last_loss}
                line.update({k: float(np.mean(v)) for k, v in m.items() if k not in ("loss", "params_finite")})
                if step == pending[-1][0] and self.step_seconds is not None:
                    line["step_seconds"] = round(self.step_seconds, 5)
                if len(self.seeds) > 1:
                    line.update(loss_std=float(loss.std()), loss_per_seed=[float(x) for x in loss])
                lines.append(line)
        if extra is not None:
            if lines and lines[-1]["step"] == extra["step"]:
                lines[-1].update(extra)
            else:
                lines.append(extra)
        self._write(lines)

    def _write(self, lines: list[dict]) -> None:
        if lines and self.write:
            with self.path.open("a") as f:
                for line in lines:
                    f.write(json.dumps(finite_or_none(line), allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- progress


def progress_bar(enabled: bool, loss_label: str = "loss"):
    """The one progress bar of the training loops: description, bar, step/total, loss, time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn(f"{loss_label} {{task.fields[loss]}}"), TimeRemainingColumn()]
    return Progress(*columns, disable=not enabled, transient=False)


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class Every:
    """Intervals of the loop: log flush, evaluation (None: never), checkpoint."""

    log: int
    eval: int | None
    checkpoint: int


def run_steps(state, start: int, end: int, total: int, *, step_fn: Callable, log: MetricLog, save: Callable,
              ckpts: Checkpoints, run_dir: Path, every: Every, eval_record: Callable | None,
              on_flush: Callable[[int, float], None], usable: Callable[[Any], bool] | None = None
              ) -> tuple[Any, int, bool]:
    """Steps start..end-1 with ``step_fn(state, step) -> (state, metrics)``.

    Metrics are flushed every log interval and at evaluations and checkpoints (a non-finite loss raises
    TrainingDiverged there); ``eval_record(state, step)`` is logged every eval interval and at step ``total``;
    ``save(state, step)`` every checkpoint interval and at ``end``.  A step that never ends (an XLA:CPU deadlock)
    ends the process with ``runtime.EXIT_STALLED`` (``runtime.StallWatchdog``).  SIGTERM or Ctrl-C
    (``runtime.stop_on_signals``: the step under way is finished; a second Ctrl-C cuts it, never a save) flushes
    and saves the last finished step and returns interrupted = True.  Divergence deletes, newest first, the
    checkpoints for which ``usable(state)`` (their held-out evaluation is finite) is False, or without that check
    those whose own loss was not finite (the step that diverged evaluated the parameters saved before it); it
    closes the checkpoints and names the last good one.  Returns (state, step, interrupted)."""
    step, interrupted = start, False
    saved = [ckpts.latest_step()]
    timed_from, timed_steps_from = time.perf_counter(), start  # wall time of the steps since the last flush

    def where() -> str:  # the stall watchdog's last words
        last = f"the last checkpoint is step {saved[-1]}" if saved[-1] is not None else "no checkpoint was saved"
        return f"at step {step + 1} of {end}, {last} in {Path(run_dir) / CHECKPOINT_DIR} (run again to resume)"

    try:
        with runtime.stop_on_signals(), runtime.stall_watchdog(where) as watchdog:
            try:
                while step < end:
                    state, metrics = step_fn(state, step)
                    log.add(step, metrics)
                    step += 1
                    do_eval = eval_record is not None and (step % every.eval == 0 or step == total)
                    do_ckpt = step % every.checkpoint == 0 or step == end
                    flushing = step % every.log == 0 or do_eval or do_ckpt
                    if flushing:
                        jax.block_until_ready(metrics)  # the interval's steps are done: time them, not the eval
                        log.step_seconds = (time.perf_counter() - timed_from) / max(1, step - timed_steps_from)
                        log.flush(eval_record(state, step) if do_eval else None)
                        on_flush(step, log.last_loss)
                    if do_ckpt:
                        save(state, step)
                        saved.append(step)
                    if flushing:
                        timed_from, timed_steps_from = time.perf_counter(), step
                    if watchdog is not None:
                        watchdog.beat()
                    if runtime.stop_requested() and step < end:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                interrupted = True
                step = int(state["step"])  # a second Ctrl-C may land between the step and the counter
                log.pending = [(s, m) for s, m in log.pending if s < step]
                log.step_seconds = None  # an interrupted interval is not timed
                log.flush()
                try:
                    save(state, step)
                except KeyboardInterrupt:  # a Ctrl-C during the save: it is complete (uninterruptible)
                    pass
    except TrainingDiverged as err:
        while (last := ckpts.latest_step()) is not None and not _good(ckpts, last, state, usable, err):
            ckpts.delete(last)
        ckpts.close()
        kept = f"last good checkpoint: step {last}" if last is not None else "no good checkpoint was saved"
        hint = f"; {log.hint}" if log.hint else ""
        raise TrainingDiverged(f"{err}; training stopped ({kept} in {Path(run_dir) / CHECKPOINT_DIR}){hint}",
                               err.first_bad_params) from None
    return state, step, interrupted


def _good(ckpts: Checkpoints, step: int, template, usable: Callable[[Any], bool] | None,
          err: TrainingDiverged) -> bool:
    """Is the checkpoint of ``step`` worth keeping after a divergence?  With a held-out check, its own evaluation
    must be finite (a NaN from a bad batch leaves good parameters); without, it must precede the parameters the
    divergence condemned."""
    if usable is None:
        return step < err.first_bad_params
    try:
        return usable(ckpts.restore(template, step)[0])
    except MesaError:  # unreadable
        return False


SESSION_ENDS = {
    "end": "reached the step it was asked for",
    "stop": "stopped by SIGTERM, Ctrl-C or a budget; the step under way was saved",
    "error": "stopped by an error (e.g. a divergence); to_step is the checkpoint it kept",
    "checkpoint": "written at a checkpoint; the process never wrote its end (killed outright, or still running)",
}


def session_record(start: int, end: int, seconds: float, started: float, ended: str,
                   moments_dtype: str | None = None, session: str | None = None) -> dict:
    """One training session's provenance: the steps ``start`` -> ``end`` (the checkpoint a later session resumes
    from), its wall ``seconds`` (compilation included) from ``started`` (UNIX time), how it ``ended``
    (``SESSION_ENDS``; ``interrupted`` = it did not reach its end), the machine that ran it, and its ``session``
    id (the line is rewritten under that id)."""
    if ended not in SESSION_ENDS:
        raise ValueError(f"ended must be one of {sorted(SESSION_ENDS)}, got {ended!r}")
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "from_step": start, "to_step": end,
              "seconds": round(seconds, 1), "interrupted": ended != "end", "ended": ended, **runtime.machine(),
              "moments_dtype": moments_dtype}
    return record if session is None else {"session": session, **record}


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    interrupted: bool
    last_loss: float
    seconds: float  # wall time of this session's steps (compilation included)


def run(state, *, ckpts: Checkpoints, run_dir: Path, log_path: Path, end: int, total: int, step_fn: Callable,
        every: Every, meta: dict, seeds: list[int], description: str, eval_record: Callable | None = None,
        progress: bool = True, write: bool = True, loss_label: str = "loss", hint: str = "",
        on_log: Callable[[int, float], None] | None = None, usable: Callable[[Any], bool] | None = None
        ) -> LoopResult:
    """Step ``state`` (resumed at its own ``step``) to ``end`` of ``total`` with the guarded loop, logging to
    ``log_path`` and checkpointing into ``ckpts`` (= run_dir/checkpoints, closed on return); ``meta`` goes into
    every checkpoint with the step and the loss.  ``write`` = False (a non-primary process) writes no log lines.
    ``hint`` ends the divergence message; ``on_log(step, loss)`` is called at every flush; ``usable(state)`` tells
    whether a checkpoint kept after a divergence evaluates finite (``run_steps``)."""
    start = int(state["step"])
    if write:
        truncate_jsonl(log_path, start)
    log = MetricLog(log_path, every.log, seeds, write=write, hint=hint)
    t0 = time.time()
    session = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(t0))}-{os.getpid()}"

    def record(to_step: int, ended: str) -> None:
        """This session's line of sessions.jsonl (rewritten at every checkpoint and at the end)."""
        if write and to_step > start:
            record_session(run_dir, session_record(start, to_step, time.time() - t0, t0, ended,
                                                   ckpts.moments_dtype, session))
        elif write:  # a divergence deleted every checkpoint this session wrote
            forget_session(run_dir, session)

    def save(state, step: int) -> None:
        if ckpts.latest_step() != step:
            with runtime.uninterruptible():
                ckpts.save(step, state, dict(meta, step=step, loss=finite_or_none(log.last_loss)))
            record(step, "checkpoint")

    step, interrupted, ended = start, True, "error"
    try:
        with progress_bar(progress, loss_label) as bar:
            task_id = bar.add_task(description, total=total, completed=start, loss="-")

            def on_flush(step: int, loss: float) -> None:
                bar.update(task_id, completed=step, loss=f"{loss:.4f}")
                if on_log is not None:
                    on_log(step, loss)

            state, step, interrupted = run_steps(state, start, end, total, step_fn=step_fn, log=log, save=save,
                                                 ckpts=ckpts, run_dir=run_dir, every=every, eval_record=eval_record,
                                                 on_flush=on_flush, usable=usable)
        ended = "stop" if interrupted else "end"
    finally:
        if ended == "error":  # the steps that count are those of the checkpoint a rerun resumes from
            with contextlib.suppress(Exception):
                step = ckpts.latest_step() or start
        ckpts.close()
        with contextlib.suppress(Exception) if ended == "error" else contextlib.nullcontext():
            record(step, ended)  # on an error, never hide the error itself
    seconds = time.time() - t0
    return LoopResult(state, step, interrupted, log.last_loss, seconds)
