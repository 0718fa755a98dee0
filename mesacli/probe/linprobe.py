"""Linear probes across depth (paper-spec 4.4).

For every position t and every layer output l (0 = embedded input, then each block's output after
the residual and clipping) fit an unregularised, bias-free least-squares map on one batch and report
its MSE on the same batch (sum over dims / (2 B)), averaged over data seeds, for the targets
(i) s_{t+1}, (ii) the preconditioned input (S_{t-1} S_{t-1}^T + lambda I)^{-1} s_t (rows with a
target-norm z-score >= 2 dropped), (iii) s_t, and (iv) the control: s_{t+1} regressed on the
preconditioned input itself.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from mesacli import model, tasks
from mesacli.errors import MesaError
from mesacli.probe.common import (
    LSTSQ_CUTOFF,
    RunContext,
    fmt,
    lstsq_probe,
    preconditioned_exact,
    probe_batch,
    zscore_keep,
)

TITLE = "Linear probes across depth"
DESCRIPTION = "linear probes per layer/position: s_{t+1}, s_t, preconditioned s_t"

TARGETS = ("next s_{t+1}", "precond (SS^T+lam I)^{-1} s_t", "current s_t")


def chebyshev_coefficients(token_format: str) -> tuple[str, tuple, tuple]:
    """(name, alphas, betas) of the paper's learned 6-step Chebyshev inverse that its probe uses for a token format.

    [C] probes the constructed-token LSA-6 with the coefficients learned for constructed tokens
    (run_construction_experiments.ipynb: ``ProbeLayers(..., inv_fn=batched_chebyshev(steps=6, alphas=[1.0257748,
    3.2508426, ...]))``) and the raw-token Softmax-7 with those learned for raw tokens (``alphas7_f`` from
    cheb_params.pkl, run_probing_experiments_full_fledged.ipynb).  The two differ most where S_{t-1} S_{t-1}^T is
    ill-conditioned: LSA-6's input-layer probe at t = 10 is 0.65 with the constructed set, 0.75 with the raw one
    (paper 0.61); at t = 20, 0.0546 against 0.0589 (paper 0.054)."""
    from mesacli.probe.solvers import PAPER_CHEBYSHEV_CONSTRUCTED, PAPER_CHEBYSHEV_LINEAR

    if token_format == "constructed":
        return ("constructed", *PAPER_CHEBYSHEV_CONSTRUCTED)
    return ("raw", *PAPER_CHEBYSHEV_LINEAR)


def preconditioned_inputs(obs_BTS: np.ndarray, lam: float, method: str, token_format: str = "raw") -> np.ndarray:
    """The probe target (ii), (S_{t-1} S_{t-1}^T + lam I)^{-1} s_t with S_{t-1} = [s_1 .. s_{t-1}] (the tokens
    before t; none at t = 1): exact float64 solve, or the paper's learned 6-step Chebyshev inverse [C] with the
    coefficients [C] uses for ``token_format`` (``chebyshev_coefficients``)."""
    if method == "exact":
        return preconditioned_exact(obs_BTS, lam)
    if method == "chebyshev":
        from mesacli.probe.solvers import chebyshev_preconditioned

        _, alphas, betas = chebyshev_coefficients(token_format)
        return chebyshev_preconditioned(obs_BTS, lam, alphas, betas)
    raise MesaError(f"unknown preconditioner '{method}' (use exact or chebyshev)")


def probe_positions(seq_len: int) -> list[int]:
    """Positions shown in the depth figure (1-based): a few, always including t = 20 when it exists."""
    return sorted({t for t in (5, 20, seq_len // 2, seq_len) if 1 <= t <= seq_len})


def probe_errors(residual_LBTE: np.ndarray, obs_BTS: np.ndarray, targets_BTS: np.ndarray,
                 pre_BTS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probe MSEs [3 targets, L+1, T] and the control MSE [T] for one batch."""
    n_layers, _, seq_len, _ = residual_LBTE.shape
    errors = np.zeros((len(TARGETS), n_layers, seq_len))
    control = np.zeros(seq_len)
    for t in range(seq_len):
        keep = zscore_keep(pre_BTS[:, t])
        control[t] = lstsq_probe(pre_BTS[keep, t], targets_BTS[keep, t])[1]
        for layer in range(n_layers):
            x = residual_LBTE[layer, :, t]
            errors[0, layer, t] = lstsq_probe(x, targets_BTS[:, t])[1]
            errors[1, layer, t] = lstsq_probe(x[keep], pre_BTS[keep, t])[1]
            errors[2, layer, t] = lstsq_probe(x, obs_BTS[:, t])[1]
    return errors, control


def run(ctx: RunContext) -> dict:
    """The probes on ``ctx.seeds`` batches of ``ctx.batch_size`` sequences, data seed k from ``probe_batch``."""
    return fit_probes(ctx, [probe_batch(ctx.spec, seed, ctx.batch_size) for seed in range(ctx.seeds)], "probes")


def fit_probes(ctx: RunContext, batches: Sequence[tasks.Batch], analysis: str) -> dict:
    """The record of ``analysis``: the probes fitted on each of ``batches`` (one data seed each), averaged over
    them; figures <analysis>_depth.png and <analysis>_next_by_position.png."""
    from mesacli.probe import figures

    spec, params = ctx.spec, ctx.params
    lam = float(ctx.options.get("probe_lambda", 1e-3))
    method = ctx.options.get("precond", "auto")
    if method == "auto":  # the paper's target (its learned Chebyshev inverse) where its coefficients apply
        method = "exact" if spec.task.kind in ("partial", "nonlinear") else "chebyshev"
    if method == "chebyshev" and spec.task.kind in ("partial", "nonlinear"):
        raise MesaError("--precond chebyshev uses the paper's coefficients for fully observed linear tasks only")
    seeds = len(batches)
    residuals = jax.jit(lambda p, x: model.apply(p, x, spec)[1]["residual_LBTE"])
    all_errors, all_control = [], []
    for seed, batch in enumerate(batches):
        ctx.say(f"{analysis}: data seed {seed + 1}/{seeds}")
        obs, tgt = np.asarray(batch.obs_BTS, np.float64), np.asarray(batch.targets_BTS, np.float64)
        res = np.asarray(residuals(params, batch.tokens_BTI), np.float64)
        errors, control = probe_errors(res, obs, tgt,
                                       preconditioned_inputs(obs, lam, method, spec.task.token_format))
        all_errors.append(errors)
        all_control.append(control)
    errors = np.mean(all_errors, axis=0)  # [3, L+1, T]
    errors_std = np.std(all_errors, axis=0)
    control = np.mean(all_control, axis=0)
    layers = np.arange(errors.shape[1])
    positions = probe_positions(spec.task.seq_len)
    series = {name: {t: errors[i, :, t - 1] for t in positions} for i, name in enumerate(TARGETS)}
    series["control (s_{t+1} on precond)"] = {t: np.full(len(layers), control[t - 1]) for t in positions}
    figures.depth_curves(layers, series, ctx.out_dir / f"{analysis}_depth.png",
                         f"{spec.name}: linear probes across depth ({seeds} data seeds, precond {method})")
    figures.position_curves({f"{TARGETS[0]}, layer {int(layer)}": errors[0, layer] for layer in layers},
                            ctx.out_dir / f"{analysis}_next_by_position.png",
                            f"{spec.name}: target probe s_{{t+1}} per layer", "probe MSE")
    at = {str(t): {name: errors[i, :, t - 1].tolist() for i, name in enumerate(TARGETS)} | {
        "control": float(control[t - 1])} for t in positions}
    t20 = 20 if spec.task.seq_len >= 20 else positions[-1]
    return {
        "analysis": analysis,
        "step": ctx.step,
        "lstsq_cutoff": LSTSQ_CUTOFF,
        "seeds": seeds,
        "batch_size": ctx.batch_size,
        "precond": method,
        # the Chebyshev coefficient set of the target (None: exact solve); records without it used the raw-token
        # set on every task
        "precond_coefficients": chebyshev_coefficients(spec.task.token_format)[0] if method == "chebyshev" else None,
        "lambda": lam,
        "targets": list(TARGETS),
        "layers": layers.tolist(),
        "mse": {name: errors[i].tolist() for i, name in enumerate(TARGETS)},  # [L+1][T]
        "mse_std_over_seeds": {name: errors_std[i].tolist() for i, name in enumerate(TARGETS)},
        "control_mse": control.tolist(),
        "at_positions": at,
        "t_report": t20,
        "paper": {"claim": "target-probe and preconditioning-probe errors fall with depth while the current-token "
                           "probe error rises; the control stays flat (~1.64) (Fig. 4, Softmax-7 / LSA-6)"},
        "notes": "MSE = sum over dims / (2 B) on the fitting batch (no held-out split), as [C]; "
                 "precond target rows with norm z-score >= 2 dropped; index 0 = input layer; position t is 1-based "
                 "([C]'s index t - 1) and S_{t-1} holds the tokens before t.",
    }


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    t = str(r["t_report"])
    at = r["at_positions"][t]
    names = r["targets"]
    lines = [f"Probe MSE (sum over dims / 2B) at t = {t}, by layer (0 = input), {r['seeds']} data seeds, "
             f"batch {r['batch_size']}, preconditioner {r['precond']}"
             + (f" ({r['precond_coefficients']}-token coefficients)" if r.get("precond_coefficients") else "")
             + ":", "",
             "| target | " + " | ".join(f"layer {layer}" for layer in r["layers"]) + " |",
             "|---|" + "---|" * len(r["layers"])]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(fmt(x, 3) for x in at[name]) + " |")
    lines.append(f"| control (s_(t+1) on precond input) | {fmt(at['control'], 3)} (flat) |" + " |" * (
        len(r["layers"]) - 1))
    nxt = at[names[0]]
    falls = all(b <= a * 1.02 for a, b in zip(nxt, nxt[1:], strict=False))
    lines += ["", f"Target-probe error {'falls monotonically' if falls else 'does not fall monotonically'} with "
                  f"depth at t = {t} ({fmt(nxt[0], 3)} -> {fmt(nxt[-1], 3)}).",
              f"Paper: {r['paper']['claim']}.", "",
              f"Figures: {r['analysis']}_depth.png, {r['analysis']}_next_by_position.png."]
    return lines


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    t = str(r["t_report"])
    nxt = r["at_positions"][t][r["targets"][0]]
    return f"target probe at t={t} by layer: " + ", ".join(f"{x:.3g}" for x in nxt)
