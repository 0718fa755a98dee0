"""The Proposition-2 solvers of a run's ``prop2`` record, on the authors' test sequences.

The paper's Prop-2 curves (Fig. 6C, 7A/B/C) were measured on the authors' own test batches
(``tasks.authors_test_batches``: 5 batches from PRNGKey(1), (11), ..., (11111), of 256 sequences on the linear task,
512 on the partially observed and nonlinear tasks).  This analysis takes the solvers exactly as ``prop2`` made them
(its k, learned alpha/beta, lambda, GD-1 step and, on the partially observed / nonlinear tasks, each baseline's
features and line-searched lambda) from RUN_DIR/probe/prop2.json (solver/prop2.json without a model), learns
nothing, and evaluates them, the model too when there is one, on those batches: the curves are named as in the
``prop2`` record, so the ledger reads both records alike.  It takes 20-90 s here where ``prop2`` itself costs up to
25 CPU minutes (80k AdamW steps for the 2-step solver), and is current while the ``prop2`` record it read is.
"""

from __future__ import annotations

import numpy as np

from mesacli.errors import MesaError
from mesacli.probe.common import RunContext, fmt
from mesacli.spec import Spec

TITLE = "Proposition 2 on the authors' test sequences"
DESCRIPTION = "the prop2 solvers (learned coefficients reused) and the model on the paper's own test batches"
ANALYSIS = "prop2_authors"
SOURCE = "prop2"  # the record whose solvers this analysis evaluates
SOURCE_KEYS = ("step", "k", "learned", "lambda", "gd1_eta")  # what makes the solvers of a prop2 record,
VARIANT_KEYS = ("features", "window", "lambda", "alpha", "beta", "curve", "ridge_curve")  # and of each baseline


def check_applicable(spec: Spec) -> None:
    """MesaError unless the authors' test batches cover the spec's task."""
    from mesacli import tasks

    tasks.check_authors_test_batches(spec.task)


def solvers_of(prop2_record: dict) -> dict:
    """The part of a prop2 record that defines its solvers (kept in this analysis's record as ``prop2``): not the
    losses it measured, which a rerun reproduces only to round-off."""
    solvers = {key: prop2_record.get(key) for key in SOURCE_KEYS}
    if prop2_record.get("variants"):
        solvers["variants"] = {name: {key: v.get(key) for key in VARIANT_KEYS}
                               for name, v in prop2_record["variants"].items()}
    return solvers


def reads_current(record: dict, prop2_record: dict | None) -> bool:
    """Whether ``record`` evaluated the solvers of the run's present ``prop2_record``."""
    return prop2_record is not None and record.get("prop2") == solvers_of(prop2_record)


def run(ctx: RunContext) -> dict:
    import json

    from mesacli import tasks
    from mesacli.probe import figures, solvers

    path = ctx.out_dir / f"{SOURCE}.json"
    if not path.is_file():
        how = "mesacli probe RUN --analysis prop2" if ctx.params is not None else "its model-free prop2 analysis"
        raise MesaError(f"prop2_authors evaluates the solvers of {path}, which is not there: run {how} first")
    source = json.loads(path.read_text())
    spec = ctx.spec
    batches = tasks.authors_test_batches(spec.task)
    ctx.say(f"prop2_authors: the prop2 solvers on the authors' {len(batches)} x {len(batches[0].obs_BTS)} "
            "test sequences")
    if source.get("variants"):
        preds = solvers.variant_predictions(batches, spec.task, source["variants"])
    else:
        chebyshev = source["learned"]["chebyshev"]
        learned = (chebyshev["alpha"], chebyshev["beta"]) if any(source.get("history", {}).values()) else None
        preds = solvers.raw_predictions(batches, source["k"], learned, source["lambda"], source["gd1_eta"])
    curves = {}
    if ctx.params is not None:
        model_preds = solvers.model_predictions(ctx.params, spec, batches)
        curves[solvers.model_curve_name(spec)] = solvers.loss_curve(model_preds, batches)
    curves.update({name: solvers.loss_curve(p, batches) for name, p in preds.items()})
    figures.loss_curves(curves, ctx.out_dir / "prop2_authors_loss.png",
                        f"{spec.name}: Proposition-2 solvers on the authors' test sequences")
    return {
        "analysis": ANALYSIS,
        "step": ctx.step,
        "model_free": ctx.params is None,
        "test_set": "authors",
        "test_seeds": list(tasks.AUTHORS_TEST_SEEDS),
        "sequences_per_batch": len(batches[0].obs_BTS),
        "prop2": solvers_of(source),
        "k": source["k"],
        **({"variants": source["variants"]} if source.get("variants") else {}),
        "seq_avg_loss": {name: float(np.mean(c)) for name, c in curves.items()},
        "per_position_loss": {name: np.asarray(c).tolist() for name, c in curves.items()},
        "notes": "the solvers of prop2.json as they are (nothing learned or line-searched again), on the authors' "
                 "test batches (tasks.authors_test_batches); curve names as in prop2.json.",
    }


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    curves = r["per_position_loss"]
    last = len(next(iter(curves.values())))
    lines = [f"The solvers of prop2.json (k = {r['k']}) on the authors' {len(r['test_seeds'])} x "
             f"{r['sequences_per_batch']} test sequences.", "",
             f"| model / solver | loss t={last} | seq.-avg |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(curve[-1])} | {fmt(r['seq_avg_loss'][name])} |" for name, curve in curves.items()]
    return lines + ["", "Figures: prop2_authors_loss.png."]


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    curves = r["per_position_loss"]
    return "authors' seqs: " + "; ".join(f"{name} t={len(c)} {c[-1]:.4f}" for name, c in curves.items())
