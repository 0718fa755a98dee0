"""Reverse-engineering analyses of a trained run (paper-spec section 4): ``mesacli probe``.

``run_probe(run_dir, analyses)`` loads the run's checkpoint, runs each analysis and writes
RUN_DIR/probe/<analysis>.json, PNG figures and summary.md (rebuilt from every JSON present, so
analyses run separately accumulate in one summary).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from mesacli.errors import MesaError
from mesacli.probe import registry
from mesacli.probe.registry import ANALYSES, headline


@dataclasses.dataclass
class ProbeResult:
    run_dir: Path
    step: int
    results: dict[str, dict]  # analysis -> its JSON content
    files: list[Path]
    summary_path: Path
    seconds: float
    skipped: dict[str, str]  # analysis -> why it does not apply (only when no names were given)
    per_replica: dict[int, dict[str, dict]] = dataclasses.field(default_factory=dict)  # multi-seed: seed -> results


def parse_analyses(names: Sequence[str] | None) -> list[str]:
    """Validate analysis names (comma-separated values allowed); default: all, in the standard order."""
    if not names:
        return list(ANALYSES)
    chosen: list[str] = []
    for raw in names:
        for name in (x.strip() for x in raw.split(",")):
            if not name:
                continue
            if name not in ANALYSES:
                close = difflib.get_close_matches(name, list(ANALYSES), n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise MesaError(f"unknown analysis '{name}'{hint}; choose from {', '.join(ANALYSES)}")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise MesaError(f"--analysis {','.join(names)!r} names no analysis; choose from {', '.join(ANALYSES)}")
    return [name for name in ANALYSES if name in chosen]


# option -> (smallest allowed value, what it is); checked before any work, whichever analyses run
_STEP_OPTIONS = {"prop2_train_steps": (0, "--prop2-steps"), "prop2_k": (0, "--prop2-k"),
                 "prop2_window": (1, "prop2_window"), "gd1_phi0_steps": (0, "--gd1-phi0-steps"),
                 "distil_steps": (1, "--distil-steps"),
                 "interpolation_steps": (0, "--interpolation-steps"), "attention_sequences": (1, "attention_sequences")}
_RATE_OPTIONS = {"distil_lr": "--distil-lr", "prop2_lr": "prop2_lr", "probe_lambda": "probe_lambda"}
PRECOND_METHODS = ("auto", "exact", "chebyshev")


def check_options(options: dict) -> None:
    """MesaError for an analysis option out of range (a negative step count, a learning rate <= 0, ...)."""
    for key, (least, flag) in _STEP_OPTIONS.items():
        if key in options and (not isinstance(options[key], int) or options[key] < least):
            raise MesaError(f"{flag} must be an integer >= {least}, got {options[key]!r}")
    for key, flag in _RATE_OPTIONS.items():
        if key in options and not 0 < options[key] < math.inf:
            raise MesaError(f"{flag} must be a positive number, got {options[key]!r}")
    if options.get("precond", "auto") not in PRECOND_METHODS:
        raise MesaError(f"--precond must be auto, exact or chebyshev, got {options['precond']!r}")


def run_probe(
    run_dir: str | Path,
    analyses: Sequence[str] | None = None,
    *,
    step: int | None = None,
    seeds: int = 5,
    batch_size: int = 256,
    options: dict | None = None,
    report: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Run the named analyses; a named one that does not apply to the model is a MesaError.

    Without names, every analysis that applies runs and the others are listed as skipped in summary.md.

    ``options`` holds per-analysis settings, e.g. {"prop2_train_steps": 2000, "precond": "exact"}.
    """
    from mesacli import rundir
    from mesacli.checkpoint import dump_json
    from mesacli.probe import summary
    from mesacli.probe.common import RunContext
    from mesacli.spec import load_run_spec
    from mesacli.state import load_params
    explicit = bool(analyses)
    names = parse_analyses(analyses)
    check_options(dict(options or {}))
    if seeds < 1:
        raise MesaError(f"--seeds must be at least 1, got {seeds}")
    if batch_size < 2:
        raise MesaError(f"--batch-size must be at least 2, got {batch_size}")
    t0 = time.time()
    run_dir = Path(run_dir)
    spec = rundir.read_spec(run_dir, load_run_spec)
    rundir.check_writable(run_dir / rundir.PROBE_DIR)
    modules = {name: registry.module(name) for name in names}
    skipped = {}
    for name in list(names):  # fail fast, before any long computation, if an analysis does not apply
        check = getattr(modules[name], "check_applicable", None)
        try:
            if check is not None:
                check(spec)
        except MesaError as err:
            if explicit:
                raise
            skipped[name] = str(err)
            names.remove(name)
    if not names:
        raise MesaError("no analysis applies to this run: " + "; ".join(skipped.values()))
    spec, params, at_step = load_params(run_dir, step)
    members = rundir.replicas(spec, params)  # a multi-seed run: every replica is analysed, into probe/seed<k>/
    per_replica, files, summary_path = {}, [], None
    for replica_seed, replica_params in members:
        ctx = RunContext(run_dir, spec, replica_params, at_step, seeds=seeds, batch_size=batch_size, report=report,
                         options=dict(options or {}), replica_seed=None if len(members) == 1 else replica_seed)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in names:
            ctx.say(f"{name}" + (f" ({ctx.replica})" if ctx.replica else ""))
            started = time.time() - 1.0
            result = modules[name].run(ctx)
            result["run_dir"], result["spec_name"] = str(ctx.run_dir), spec.name
            if ctx.replica:
                result["replica_seed"] = replica_seed
            path = ctx.out_dir / f"{name}.json"
            dump_json(path, result)
            results[name] = result
            files += sorted(p for p in ctx.out_dir.iterdir() if p.suffix in (".json", ".png")
                            and p.stat().st_mtime >= started and p not in files)
        per_replica[replica_seed] = results
        written = summary.write_summary(ctx.out_dir, spec, skipped)
        summary_path = summary_path or written
    first = next(iter(per_replica.values()))
    return ProbeResult(run_dir, at_step, first, files, summary_path, time.time() - t0, skipped,
                       per_replica if len(members) > 1 else {})


def run_model_free(
    run_dir: str | Path,
    analysis: str,
    spec,
    *,
    options: dict | None = None,
    report: Callable[[str], None] | None = None,
) -> dict:
    """Run ``analysis`` on ``spec``'s task without a trained model (the analyses in ``registry.MODEL_FREE``: the
    Prop-2 solvers): the record goes to RUN_DIR/solver/<analysis>.json, and RUN_DIR is made a run directory of
    ``spec`` (its spec.yaml) if it is not one yet, so that the model may be trained there later."""
    from mesacli import rundir
    from mesacli.checkpoint import dump_json
    from mesacli.probe.common import RunContext
    from mesacli.spec import load_run_spec

    names = parse_analyses([analysis])
    if len(names) != 1:
        raise MesaError(f"run_model_free runs one analysis, got {analysis!r}")
    name = names[0]
    if name not in registry.MODEL_FREE:
        raise MesaError(f"{name} analyses a trained model; only {', '.join(registry.MODEL_FREE)} run without one")
    module = registry.module(name)
    check_options(dict(options or {}))
    check = getattr(module, "check_applicable", None)
    if check is not None:
        check(spec)
    run_dir = Path(run_dir)
    rundir.prepare(spec, run_dir, load_run_spec)
    ctx = RunContext(run_dir, spec, None, None, report=report, options=dict(options or {}), folder=rundir.SOLVER_DIR)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    ctx.say(f"{name} (model-free)")
    result = module.run(ctx)
    result["run_dir"], result["spec_name"] = str(run_dir), spec.name
    dump_json(ctx.out_dir / f"{name}.json", result)
    return result


__all__ = ["ANALYSES", "ProbeResult", "check_options", "headline", "parse_analyses", "run_model_free", "run_probe"]
