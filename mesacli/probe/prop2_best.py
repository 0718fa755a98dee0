"""The best k-step Proposition-2 solver, in closed form: a floor under every k-step Chebyshev / Neumann solver.

Every k-step solver of ``prop2`` predicts s^_{t+1} = Y X^T p(A'_t) s_t / ||A_t||_F with p a polynomial of degree
<= k in A'_t = A_t / ||A_t||_F (A_t = X X^T + lambda I over [C]'s pairs; its alpha/beta only pick p), and the
predictions are linear in p's coefficients.  The next-token loss (paper Eq. 1) is then a convex quadratic in them:
this analysis solves its normal equations (``solvers.fit_best_polynomial``, float64, basis T_j(2u - 1)) on batches
separate from the test batches and reports the test loss of that polynomial, on the spec's test batches and, where
they cover the task, on the authors' (``tasks.authors_test_batches``).  Up to sampling, no k-step solver of
``prop2`` does better: a learned Chebyshev solver well above this floor has not converged.  It takes seconds (no
training) and needs no model (also ``solver:prop2_best``).  Fully observed tasks only (s_t as the features).
"""

from __future__ import annotations

import json

import numpy as np

from mesacli.errors import MesaError
from mesacli.probe.common import RunContext, fmt
from mesacli.spec import Spec

TITLE = "Proposition 2: the best k-step solver (closed form)"
DESCRIPTION = "the degree-k polynomial solver of least loss, in closed form: a floor under the k-step Prop-2 solvers"
ANALYSIS = "prop2_best"
FIT_SEED_OFFSET = 2  # fitted on test_batches(spec, 2): separate from the test (0) and GD-1 search (1) batches
OURS, AUTHORS = "ours", "authors"  # the test sets of the record's curves
TEST_SET_LABELS = {OURS: "our test batches", AUTHORS: "the authors' test batches"}


def curve_name(k: int) -> str:
    return f"best {k}-step solver (closed form)"


def check_applicable(spec: Spec) -> None:
    """MesaError on tasks whose Prop-2 baselines run on other features (partially observed, nonlinear)."""
    from mesacli.probe import solvers

    if solvers.variants_for(spec.task):
        raise MesaError(f"prop2_best needs a fully observed task (s_t as the solver's features); "
                        f"'{spec.task.kind}' runs its Prop-2 baselines on other features")


def run(ctx: RunContext) -> dict:
    from mesacli import tasks
    from mesacli.probe import figures, solvers
    from mesacli.probe.common import test_batches

    spec = ctx.spec
    k, lam = solvers.solver_steps(ctx), solvers.LAMBDA_TRAIN
    fit = test_batches(spec, seed_offset=FIT_SEED_OFFSET)
    ctx.say(f"prop2_best: the best {k}-step solver in closed form on {len(fit)} x {spec.train.batch_size} sequences")
    coefficients, fit_loss = solvers.fit_best_polynomial(fit, k, lam)
    test_sets = {OURS: test_batches(spec)}
    try:
        tasks.check_authors_test_batches(spec.task)
        test_sets[AUTHORS] = tasks.authors_test_batches(spec.task)
    except MesaError:  # the authors' batches do not cover this task: our test batches only
        pass
    curves = {}
    for name, batches in test_sets.items():
        preds = [solvers.polynomial_basis_predictions(b.obs_BTS, k, lam) @ coefficients for b in batches]
        curves[name] = solvers.loss_curve(preds, batches)
    learned = _learned_chebyshev(ctx, k)
    shown = {f"{curve_name(k)}, {TEST_SET_LABELS[name]}": c for name, c in curves.items()}
    if learned is not None:
        shown[f"Chebyshev k={k} (learned, prop2.json), {TEST_SET_LABELS[OURS]}"] = learned["curve"]
    figures.loss_curves(shown, ctx.out_dir / "prop2_best_loss.png", f"{spec.name}: the best {k}-step Prop-2 solver")
    return {
        "analysis": ANALYSIS,
        "step": ctx.step,
        "model_free": ctx.params is None,
        "k": k,
        "lambda": lam,
        "pairs": solvers.PAIRS_NOTE,
        "basis": "P_j(u) = T_j(2u - 1), u = A / ||A||_F; Inv(A) = sum_j c_j P_j(u) / ||A||_F",
        "coefficients": coefficients.tolist(),
        "fit_sequences": len(fit) * spec.train.batch_size,
        "fit_loss": fit_loss,
        "curve": curve_name(k),
        "seq_avg_loss": {name: float(np.mean(c)) for name, c in curves.items()},
        "per_position_loss": {name: np.asarray(c).tolist() for name, c in curves.items()},
        **({"learned_chebyshev": {key: learned[key] for key in ("alpha", "beta", "coefficients", "seq_avg")}}
           if learned is not None else {}),
        "notes": "the degree-k polynomial preconditioner (in A / ||A||_F) of least next-token loss over [C]'s "
                 f"pairs at lambda = {lam:g}, by the normal equations on test_batches(spec, {FIT_SEED_OFFSET}); "
                 "every k-step Chebyshev / Neumann solver is such a polynomial, so (up to sampling) none does "
                 "better. per_position_loss: ours = the spec's test batches, authors = tasks.authors_test_batches.",
    }


def _learned_chebyshev(ctx: RunContext, k: int) -> dict | None:
    """The learned k-step Chebyshev solver of this run's prop2.json, as a polynomial, with its test curve."""
    from mesacli.probe import solvers

    path = ctx.out_dir / "prop2.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    chebyshev = record.get("learned", {}).get("chebyshev")
    curve = record.get("per_position_loss", {}).get(solvers.learned_curve_name(k))
    if record.get("k") != k or not chebyshev or curve is None:
        return None
    return {"alpha": chebyshev["alpha"], "beta": chebyshev["beta"], "curve": curve, "seq_avg": float(np.mean(curve)),
            "coefficients": solvers.chebyshev_polynomial(chebyshev["alpha"], chebyshev["beta"]).tolist()}


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    curves = r["per_position_loss"]
    last = len(next(iter(curves.values())))
    lines = [f"The degree-{r['k']} polynomial preconditioner of least next-token loss, fitted in closed form on "
             f"{r['fit_sequences']} sequences (lambda = {r['lambda']:g}, [C]'s pairs): no {r['k']}-step Chebyshev or "
             "Neumann solver does better, up to sampling.", "",
             f"| test set | loss t={last} | seq.-avg |", "|---|---|---|"]
    lines += [f"| {TEST_SET_LABELS.get(name, name)} | {fmt(curve[-1])} | {fmt(r['seq_avg_loss'][name])} |"
              for name, curve in curves.items()]
    lines += ["", f"Coefficients (basis T_j(2A/||A||_F - 1)): {[round(c, 4) for c in r['coefficients']]}."]
    if "learned_chebyshev" in r:
        learned = r["learned_chebyshev"]
        lines += [f"prop2.json's learned Chebyshev solver (alpha = {[round(a, 3) for a in learned['alpha']]}, beta = "
                  f"{[round(b, 3) for b in learned['beta']]}) is the polynomial "
                  f"{[round(c, 4) for c in learned['coefficients']]}: seq.-avg {fmt(learned['seq_avg'])} on our test "
                  f"set against this floor's {fmt(r['seq_avg_loss'][OURS])}."]
    return lines + ["", "Figures: prop2_best_loss.png."]


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    return f"best {r['k']}-step solver: " + "; ".join(
        f"{name} t={len(c)} {c[-1]:.4f}, seq.-avg {r['seq_avg_loss'][name]:.4f}"
        for name, c in r["per_position_loss"].items())
