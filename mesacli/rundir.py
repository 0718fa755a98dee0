"""The on-disk contract of a run directory, in one place.

A run directory (``mesacli train``, ``mesacli lm train``) holds::

    spec.yaml         the resolved spec (also in every checkpoint's metadata): the directory describes itself
    metrics.jsonl     one JSON line per logged step (mesacli.loop.MetricLog)
    sessions.jsonl    one JSON line per training session: the steps it trained, its wall time and the machine
    checkpoints/<s>/  Orbax checkpoints of {params, opt_state, step} and {spec, step, loss} (mesacli.checkpoint)
    eval_curve.json   synthetic task: the final per-position test loss    (eval.json for a language model)
    eval_step<s>.json ``mesacli eval`` on the spec's test batches (eval_authors_step<s>.json: the authors' ones)
    probe/            ``mesacli probe`` outputs;  prompt_tune/<stage>/: ``mesacli prompt-tune`` outputs
    seed<k>/          inside probe/ and prompt_tune/: one folder per replica of a ``train.seeds > 1`` run

Every command that reads a run directory goes through ``read_spec`` (the one "is not a run directory" check) and
``restore`` (spec-checked checkpoint restore).  This module knows file names and formats, not how a model is
trained: the trainers give it their spec loader and state template.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax

from mesacli.checkpoint import Checkpoints, CheckpointUnreadable, check_checkpoint_path, write_text_atomic
from mesacli.errors import MesaError
from mesacli.spec_loader import spec_diff, spec_to_dict, spec_to_yaml

SPEC_FILE = "spec.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
EVAL_CURVE_FILE = "eval_curve.json"  # synthetic-task runs
LM_EVAL_FILE = "eval.json"  # language-model runs
PROBE_DIR = "probe"
SOLVER_DIR = "solver"  # records of the analyses that need no trained model (probe.run_model_free)
TUNE_DIR = "prompt_tune"
SESSIONS_FILE = "sessions.jsonl"  # provenance: where and how long each training session ran (``record_session``)
EVAL_STEMS = {"ours": "eval", "authors": "eval_authors"}  # ``mesacli eval --test-set`` -> its records' stem


def eval_record_stem(test_set: str, step: int) -> str:
    """The name (without .json / .png) of ``mesacli eval``'s record of checkpoint ``step`` on ``test_set``."""
    return f"{EVAL_STEMS[test_set]}_step{step}"


def eval_record_steps(run_dir: str | Path, test_set: str = "ours") -> dict[int, Path]:
    """The eval records of ``run_dir`` on ``test_set``: {checkpoint step: path of its JSON}."""
    stem = EVAL_STEMS[test_set]
    found = {}
    for path in Path(run_dir).glob(f"{stem}_step*.json"):
        match = re.fullmatch(rf"{stem}_step(\d+)\.json", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


SpecLoader = Callable[[Path], Any]


def check_writable(path: str | Path) -> None:
    """MesaError unless the folder ``path`` can be written (created, if it does not exist yet): checked before long
    work starts, so that a finished computation never fails on its outputs."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is below the file {existing}"
        raise MesaError(f"cannot write to {path}: it {what}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MesaError(f"cannot write to {path}: permission denied on {existing}")


def prepare(spec: Any, run_dir: Path, load: SpecLoader) -> None:
    """Create a run directory, or check that an existing one was made with this exact spec (read by ``load``).

    A run directory with a different spec is refused, unless it holds no checkpoint yet (a start that failed
    before its first save, e.g. on a bad corpus path or batch size): then the new spec replaces the old one and
    the stale metric log is dropped."""
    run_dir = Path(run_dir)
    spec_path = run_dir / SPEC_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise MesaError(f"run directory {run_dir} exists and is not a directory")
    check_writable(run_dir)
    check_checkpoint_path(run_dir)
    if spec_path.exists():
        try:
            stored = load(spec_path)
        except MesaError as err:
            raise MesaError(f"run directory {run_dir} has an unreadable spec: {err}") from None
        checkpoints = run_dir / CHECKPOINT_DIR
        if stored != spec and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
            spec_path.unlink()  # nothing was trained with the old spec: start over with this one
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
            (run_dir / SESSIONS_FILE).unlink(missing_ok=True)
        elif stored != spec:
            diff = "; ".join(spec_diff(stored, spec)[:4])
            raise MesaError(
                f"run directory {run_dir} was made with a different spec ({diff}); "
                f"use another --run-dir or the same spec"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise MesaError(f"{run_dir} is not empty and is not a mesacli run directory (no {SPEC_FILE})")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not spec_path.exists():
        tmp = spec_path.with_suffix(".tmp")
        tmp.write_text(f"# resolved spec written by mesacli\n{spec_to_yaml(spec)}")
        tmp.replace(spec_path)


def read_spec(run_dir: str | Path, load: SpecLoader) -> Any:
    """The spec of an existing run directory (read by ``load``); MesaError if ``run_dir`` is not one."""
    run_dir = Path(run_dir)
    if not (run_dir / SPEC_FILE).exists():
        raise MesaError(f"{run_dir} is not a mesacli run directory (no {SPEC_FILE})")
    return load(run_dir / SPEC_FILE)


def open_checkpoints(run_dir: Path, spec: Any, read_only: bool = False, moments_dtype: str | None = None
                     ) -> Checkpoints:
    """The run's checkpoint manager (keeping ``spec.train.keep_checkpoints``); read-only needs the folder to exist;
    ``moments_dtype``: compact checkpoints (``mesacli.checkpoint``)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if read_only and not directory.is_dir():
        raise MesaError(f"no checkpoint found in {directory}")
    return Checkpoints(directory, keep=spec.train.keep_checkpoints, read_only=read_only, moments_dtype=moments_dtype)


def checkpoint_steps(run_dir: Path, spec: Any) -> list[int]:
    """The steps of every checkpoint kept in the run, oldest first."""
    ckpts = open_checkpoints(run_dir, spec, read_only=True)
    try:
        return ckpts.all_steps()
    finally:
        ckpts.close()


def saved_steps(run_dir: str | Path) -> list[int]:
    """The steps of the finished checkpoints in ``run_dir``, oldest first, read from the folder names alone (no
    Orbax): what `mesacli reproduce status` needs to tell how far a run has trained."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def prune_checkpoints(run_dir: str | Path, keep: int = 1) -> list[int]:
    """Delete all but the latest ``keep`` checkpoints of ``run_dir`` (the committed record keeps one: the latest,
    resumable); returns the deleted steps."""
    import shutil

    steps = saved_steps(run_dir)
    gone = steps[:-keep] if keep > 0 else steps
    for step in gone:
        shutil.rmtree(Path(run_dir) / CHECKPOINT_DIR / str(step))
    return gone


def restore_state(spec: Any, ckpts: Checkpoints, template: dict, step: int | None = None) -> dict:
    """Restore a train state, refusing a checkpoint written for a different spec (any spec dataclass).  An
    unreadable latest checkpoint (no ``step`` given) is an error that names the newest readable one."""
    try:
        meta = ckpts.restore_meta(step)
        _check_spec(spec, meta, ckpts)
        state, _ = ckpts.restore(template, step)
    except CheckpointUnreadable as err:
        if step is not None:
            raise
        found = ckpts.newest_readable(lambda meta: template, below=err.step)
        older = None if found is None else found[0]
        where = f"the newest readable one is step {older}: pass --step {older}" if older is not None else \
            "no older checkpoint is readable"
        raise MesaError(f"{err}; {where}") from None
    return state


def resume_state(spec: Any, ckpts: Checkpoints, template: dict,
                 warn: Callable[[str], None]) -> tuple[dict, int] | None:
    """(state, step) of the newest readable checkpoint to resume training from, or None if there is none.

    Unreadable newer checkpoints are renamed ``<step>.unreadable`` (kept, no longer steps) with a warning, so
    that training goes on from the one before; if every checkpoint is unreadable that is an error (nothing is
    retrained over them silently)."""
    found = ckpts.resume_newest_readable(lambda meta: template, warn,
                                         hint="move the folder away to train from scratch")
    if found is None:
        return None
    step, state, meta = found
    _check_spec(spec, meta, ckpts)
    if meta.get("moments_dtype"):
        warn(f"note: the optimiser moments of checkpoint step {step} were stored in {meta['moments_dtype']} "
             f"(a compact checkpoint): training goes on from them rounded, not bit-identical to an uninterrupted run")
    return state, step


def _check_spec(spec: Any, meta: dict, ckpts: Checkpoints) -> None:
    if not same_spec(spec, meta.get("spec")):
        raise MesaError(f"checkpoint in {ckpts.directory} was written for a different spec")


def same_spec(spec: Any, stored: Any) -> bool:
    """Was ``stored`` (a checkpoint's spec dict) written for ``spec``?  A key the stored dict lacks counts as
    its default: a spec key added to mesacli later does not orphan the checkpoints written before it."""

    def matches(obj: Any, as_dict: dict, stored: Any) -> bool:
        if not isinstance(stored, dict) or set(stored) - set(as_dict):
            return False
        for field in dataclasses.fields(obj):
            value, name = getattr(obj, field.name), field.name
            if name not in stored:
                if field.default is not dataclasses.MISSING:
                    default = field.default
                elif field.default_factory is not dataclasses.MISSING:
                    default = field.default_factory()
                else:
                    return False
                if value != default:
                    return False
            elif dataclasses.is_dataclass(value):
                if not matches(value, as_dict[name], stored[name]):
                    return False
            elif as_dict[name] != stored[name]:
                return False
        return True

    return matches(spec, spec_to_dict(spec), stored)


def restore(run_dir: str | Path, load: SpecLoader, make_template: Callable[[Any], dict],
            step: int | None = None) -> tuple[Any, dict]:
    """(spec, state) of a run directory's latest (or given) checkpoint; ``make_template(spec)`` gives the state's
    structure, shapes, dtypes and shardings (a freshly initialised state)."""
    run_dir = Path(run_dir)
    spec = read_spec(run_dir, load)
    ckpts = open_checkpoints(run_dir, spec, read_only=True)
    try:
        state = restore_state(spec, ckpts, make_template(spec), step)
    finally:
        ckpts.close()
    return spec, state


# ----------------------------------------------------------------------------- a longer run of a finished one

# what a longer run of the same recipe may change: the names and the bookkeeping (none of it enters the maths)
LONGER_RUN_MAY_CHANGE = ("name", "description", "train.steps", "train.log_every", "train.eval_every",
                         "train.checkpoint_every", "train.keep_checkpoints")


def longer_run_differences(source: Any, spec: Any) -> list[str]:
    """What keeps ``spec`` from being a longer run of ``source``'s recipe (empty: it is one).  Only the keys
    of ``LONGER_RUN_MAY_CHANGE`` may differ, and ``spec`` may not train fewer steps.  The step count does not
    enter the schedule (warmup_cosine decays to ``train.decay_steps``) nor the data (fold_in(seed, step)), so
    steps 0..N of the longer run are the source's steps."""
    differs = [d for d in spec_diff(source, spec) if d.split(":")[0] not in LONGER_RUN_MAY_CHANGE]
    if spec.train.steps < source.train.steps:
        differs.append(f"train.steps: {source.train.steps!r} -> {spec.train.steps!r} (fewer)")
    return differs


def start_from_run(source_dir: str | Path, run_dir: str | Path, spec: Any, load: SpecLoader, template: dict,
                   meta: dict, write: bool = True) -> int:
    """Seed ``run_dir`` (prepared for ``spec``, no checkpoint yet) with the latest checkpoint of ``source_dir``,
    a run of the same recipe with fewer steps (``longer_run_differences``): its state (parameters, optimiser
    state, step) is saved as ``run_dir``'s first checkpoint with ``meta`` (+ step, loss, started_from), and its
    metric and session lines up to that step are copied (``write``: this process writes files).  Training
    ``run_dir`` then resumes there: the same run as training ``spec`` from scratch.  Returns the step."""
    source_dir, run_dir = Path(source_dir), Path(run_dir)
    source = read_spec(source_dir, load)
    if differs := longer_run_differences(source, spec):
        raise MesaError(f"{source_dir} is not a shorter run of this spec ({'; '.join(differs[:4])}); "
                        f"a run can only start from a run of the same recipe")
    source_ckpts = open_checkpoints(source_dir, source, read_only=True)
    try:
        if source_ckpts.latest_step() is None:
            raise MesaError(f"no checkpoint found in {source_dir / CHECKPOINT_DIR}")
        step = source_ckpts.latest_step()
        source_meta = source_ckpts.restore_meta(step)
        state = restore_state(source, source_ckpts, template, step)
    finally:
        source_ckpts.close()
    ckpts = open_checkpoints(run_dir, spec)
    try:
        if ckpts.latest_step() is not None:
            raise MesaError(f"{run_dir} already has checkpoints; it resumes from its own")
        ckpts.save(step, state, dict(meta, step=step, loss=source_meta.get("loss"), started_from=str(source_dir)))
    finally:
        ckpts.close()
    if write:
        lines = []
        if (source_dir / METRICS_FILE).is_file():
            for line in (source_dir / METRICS_FILE).read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= step:
                    lines.append(line)
        (run_dir / METRICS_FILE).write_text("".join(f"{line}\n" for line in lines))
        # the steps it starts from were trained there: say where (one write for all the source's lines)
        copied = [dict(session, run=source_dir.name) for session in read_sessions(source_dir)
                  if session.get("from_step", 0) < step]
        if copied:
            _write_sessions(run_dir, read_sessions(run_dir) + copied)
    return step


# ----------------------------------------------------------------------------- provenance of the steps


def record_session(run_dir: str | Path, record: dict) -> None:
    """Write one training session's line of ``sessions.jsonl`` (``from_step``, ``to_step``, ``seconds``, how it
    ``ended``, the machine: ``mesacli.loop.session_record``): a record whose ``session`` id is already there
    replaces that line (the loop rewrites its line at every checkpoint), any other is added.  The file is
    replaced atomically, so a crash never leaves half a line."""
    sessions = read_sessions(run_dir)
    same = [i for i, s in enumerate(sessions) if "session" in record and s.get("session") == record["session"]]
    if same:
        sessions[same[0]] = record
    else:
        sessions.append(record)
    _write_sessions(run_dir, sessions)


def forget_session(run_dir: str | Path, session: str) -> None:
    """Remove the line of ``session`` (a session whose checkpoints were all deleted after a divergence)."""
    sessions = read_sessions(run_dir)
    kept = [s for s in sessions if s.get("session") != session]
    if len(kept) != len(sessions):
        _write_sessions(run_dir, kept)


def _write_sessions(run_dir: str | Path, sessions: list[dict]) -> None:
    write_text_atomic(Path(run_dir) / SESSIONS_FILE, "".join(json.dumps(s) + "\n" for s in sessions))


def read_sessions(run_dir: str | Path) -> list[dict]:
    """The training sessions recorded in a run directory, oldest first ([] before any, or in older runs).  An
    unreadable line (torn by a crash mid-append before lines were written atomically, not UTF-8, not a JSON
    object) is skipped: provenance is a record, and one damaged line must not stop ``reproduce status``, the
    report or ``--start-from``."""
    path = Path(run_dir) / SESSIONS_FILE
    if not path.is_file():
        return []
    sessions = []
    for raw in path.read_bytes().splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            sessions.append(record)
    return sessions


# ----------------------------------------------------------------------------- replicas (train.seeds > 1)


def replica_seeds(train: Any) -> list[int]:
    """Replica i of a ``train.seeds = S`` run is the plain run with seed ``train.seed + i``."""
    return [train.seed + i for i in range(getattr(train, "seeds", 1))]


def replicas(spec: Any, params) -> list[tuple[int, Any]]:
    """[(seed, params)] for every replica of a run's (possibly stacked) parameters."""
    if getattr(spec.train, "seeds", 1) == 1:
        return [(spec.train.seed, params)]
    return [(seed, jax.tree_util.tree_map(lambda x, i=i: x[i], params))
            for i, seed in enumerate(replica_seeds(spec.train))]


def replica_folder(seed: int | None) -> str:
    """"seed<k>": the folder of replica k's outputs inside probe/ and prompt_tune/ ("" for a single-seed run)."""
    return "" if seed is None else f"seed{seed}"
