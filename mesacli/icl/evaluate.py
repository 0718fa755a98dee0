"""icl-eval: few-shot in-context regression with a frozen next-token model (paper-spec section 5; paper Fig. 8/18).

Per-example label loss 1/2 ||y_i - f(prompt up to x_i)||^2 of the frozen model on plain prompts, EOS prompts (the
tuned EOS if ``prompt-tune`` made one, else the zero vector) and tuned prompts (tuned EOS + tuned prefix), next to
the baselines of ``mesacli.icl.baselines`` on the same (x, y) data; mean and std over data seeds.  A run trained
with ``train.seeds > 1`` is evaluated replica by replica, each with its own tuned tokens.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from mesacli import rundir
from mesacli.errors import MesaError
from mesacli.icl.baselines import (
    ar_ridge_predictions,
    gd1_xy_direction,
    gd1_xy_line_search,
    losses_BN,
    ridge_xy_predictions,
)
from mesacli.icl.prompts import (
    LABEL_NOISE,
    X_DISTS,
    check_task_hosts_prompt,
    icl_key,
    make_layout,
    max_examples,
    model_losses_BN,
    sample_regression,
)
from mesacli.icl.tokens import check_tuned_on_step, load_tuned
from mesacli.spec import Spec, load_run_spec
from mesacli.state import load_params

PROMPT_KINDS = ("plain", "eos", "tuned")
REPORT_EXAMPLES = (1, 5, 10, 20, 40, 68)


@dataclasses.dataclass
class IclReport:
    spec: Spec
    step: int
    n_examples: int
    curves: dict[str, dict[str, list[float]]]  # name -> {"mean", "std" over seeds, optional "median"}
    model_curves: tuple[str, ...]
    meta: dict
    json_path: Path | None = None
    plot_path: Path | None = None


def prompt_names(prompts: str) -> list[str]:
    names = [p.strip() for p in prompts.split(",") if p.strip()]
    for name in names:
        if name not in PROMPT_KINDS:
            raise MesaError(f"--prompt: '{name}' is not one of {', '.join(PROMPT_KINDS)} (or a comma-separated list)")
    if not names:
        raise MesaError("--prompt: give plain, eos or tuned")
    return list(dict.fromkeys(names))


def _seed_stats(per_seed: list[np.ndarray]) -> dict[str, list[float]]:
    arr = np.asarray(per_seed)
    return {"mean": arr.mean(0).tolist(), "std": arr.std(0).tolist()}


def icl_eval(run_dir: str | Path, prompts: str = "plain", *, n_examples: int | None = None, seeds: int = 5,
             batch: int = 128, lam: float = 1e-3, continual: bool = False, switch_at: int | None = None,
             x_dist: str = "uniform", data_seed: int = 0, step: int | None = None, write: bool = True) -> IclReport:
    """Per-example label loss of the frozen model on the chosen prompt kinds and of the baselines, mean and std over
    ``seeds`` data seeds of ``batch`` prompts each; writes RUN_DIR/icl_eval_<prompts>[_continual][_lam..]
    [_xnormal][_step..].json/.png."""
    run_dir = Path(run_dir)
    names = prompt_names(prompts)
    for value, what in [(seeds, "--seeds"), (batch, "--batch")]:
        if value < 1:
            raise MesaError(f"{what} must be at least 1, got {value}")
    if not 0 < lam < math.inf:
        raise MesaError(f"--lam must be positive (the early LSQ systems are singular without it), got {lam}")
    if x_dist not in X_DISTS:
        raise MesaError(f"--x-dist: '{x_dist}' is not one of {', '.join(X_DISTS)}")
    n_s = check_task_hosts_prompt(rundir.read_spec(run_dir, load_run_spec).task)  # before any JAX work
    rundir.check_writable(run_dir)
    spec, params, at_step = load_params(run_dir, step)
    members = rundir.replicas(spec, params)  # a run trained with train.seeds = S: every replica is evaluated
    seq_len = spec.task.seq_len

    # The tokens of each prompt kind: plain; EOS (tuned if one was tuned, else the zero vector); tuned EOS + prefix.
    # A multi-seed run has tuned tokens per replica (prompt_tune/seed<k>/).
    def prompt_setups(tuned: dict) -> tuple[dict[str, tuple[str, Any, Any, int]], dict[str, str]]:
        setups, sources = {}, {}
        for name in names:
            if name == "plain":
                setups[name] = ("model (plain)", None, None, 0)
            elif name == "eos":
                eos = tuned.get("eos")
                if eos is not None:
                    check_tuned_on_step(tuned, "eos", at_step, run_dir)
                sources["eos"] = "tuned" if eos is not None else "zero vector (no tuned EOS in this run)"
                setups[name] = ("model (EOS)" if eos is not None else "model (zero EOS)",
                                eos if eos is not None else np.zeros(n_s, np.float32), None, 0)
            else:
                if tuned.get("prefix") is None:
                    raise MesaError(f"no tuned prefix in {run_dir}: run `mesacli prompt-tune {run_dir} --what both` "
                                    f"first")
                check_tuned_on_step(tuned, "prefix", at_step, run_dir)
                sources["tuned"] = f"tuned EOS + tuned {len(tuned['prefix'])}-token prefix"
                setups[name] = ("model (EOS+prefix)", tuned["prefix_eos"], tuned["prefix"], len(tuned["prefix"]))
        return setups, sources

    member_results = {seed: prompt_setups(load_tuned(run_dir, n_s, seed if len(members) > 1 else None))
                      for seed, _ in members}
    member_setups = {seed: result[0] for seed, result in member_results.items()}
    setups, sources = member_results[members[0][0]]  # the first replica's kinds name the curves
    for seed, other in member_setups.items():
        if [(v[0], v[3]) for v in other.values()] != [(v[0], v[3]) for v in setups.values()]:
            raise MesaError(f"the replicas of {run_dir} were prompt-tuned differently (seed {seed}); "
                            f"run `mesacli prompt-tune {run_dir}` so that every replica has the same tokens' kinds")
    layouts = {}
    if n_examples is None:  # as many as every chosen prompt kind can hold
        n_examples = min(max_examples(seq_len, name != "plain", setups[name][3]) for name in names)
    for name in names:
        layouts[name] = make_layout(seq_len, n_examples, name != "plain", setups[name][3])
    if continual or switch_at is not None:  # --switch-at implies the continual setting
        switch_at = max(1, round(n_examples * 21 / 68)) if switch_at is None else switch_at
        if not 1 <= switch_at < n_examples:
            raise MesaError(f"--switch-at must lie in 1..{n_examples - 1}, got {switch_at}")
    else:
        switch_at = None

    # eta of GD-1: line-searched once on separate prompts (never the test prompts).
    xs, ys = sample_regression(icl_key("search", data_seed, 0), n_s, n_examples, max(batch, 256), x_dist, switch_at)
    eta = gd1_xy_line_search(np.asarray(xs), np.asarray(ys))

    per_seed: dict[str, list[np.ndarray]] = {}
    per_replica: dict[str, dict[int, list[np.ndarray]]] = {}
    medians: dict[str, list[np.ndarray]] = {}
    model_names = []
    ar_name = f"AR ridge LSQ, all token pairs (lam={lam:g})"
    for k in range(seeds):
        x, y = sample_regression(icl_key("eval", data_seed, k), n_s, n_examples, batch, x_dist, switch_at)
        xn, yn = np.asarray(x), np.asarray(y)
        for name in names:
            label = setups[name][0]
            if label not in model_names:
                model_names.append(label)
            for replica_seed, replica_params in members:
                _, eos, prefix, _ = member_setups[replica_seed][name]
                losses = model_losses_BN(replica_params, spec, layouts[name], x, y, eos, prefix)
                per_seed.setdefault(label, []).append(losses.mean(0))
                per_replica.setdefault(label, {}).setdefault(replica_seed, []).append(losses.mean(0))
        baseline_losses = {
            ar_name: losses_BN(ar_ridge_predictions(xn, yn, lam), yn),
            f"ridge LSQ on (x, y) pairs (lam={lam:g})": losses_BN(ridge_xy_predictions(xn, yn, lam), yn),
            f"GD-1 on (x, y) pairs (eta={eta:.4f})": losses_BN(eta * gd1_xy_direction(xn, yn), yn),
        }
        for label, losses in baseline_losses.items():
            per_seed.setdefault(label, []).append(losses.mean(0))
            medians.setdefault(label, []).append(np.median(losses, axis=0))
    curves = {label: _seed_stats(values) for label, values in per_seed.items()}
    for label, values in medians.items():
        curves[label]["median"] = np.mean(values, axis=0).tolist()
    if len(members) > 1:  # model curves: mean/std over replicas x data seeds, and each replica's mean
        for label, by_seed in per_replica.items():
            curves[label]["per_replica"] = {str(s): np.mean(v, axis=0).tolist() for s, v in by_seed.items()}
    meta = {
        "run_dir": str(run_dir), "step": at_step, "spec": spec.name, "seq_len": seq_len, "n_s": n_s,
        "prompts": names, "eos_source": sources, "n_examples": n_examples, "seeds": seeds, "batch": batch,
        "lam": lam, "gd1_eta": eta, "x_dist": x_dist, "x_dist_source": "[C] U(-1,1)" if x_dist == "uniform" else
        "[P] N(0,I)", "label_noise": LABEL_NOISE, "continual_switch_at": switch_at, "data_seed": data_seed,
        "step_given": step is not None, "replica_seeds": [s for s, _ in members],
        "metric": "1/2 ||y_i - f(prompt up to x_i)||^2, mean over prompts; mean/std over data seeds; median = "
                  "median over prompts, averaged over seeds",
        "baselines_on": "the same (x, y) data; the AR ridge control on the plain prompt [x1, y1, x2, ...]",
        "layouts": {name: {"eos": lay.eos, "prefix_len": lay.prefix_len, "length": lay.length,
                           "x_positions": lay.x_positions.tolist()} for name, lay in layouts.items()},
    }
    report = IclReport(spec, at_step, n_examples, curves, tuple(model_names), meta)
    if write:
        write_report(report, run_dir)
    return report


def report_stem(prompts: list[str], continual: bool, lam: float = 1e-3, x_dist: str = "uniform",
                step: int | None = None) -> str:
    """The file name (without suffix) of an icl-eval record: icl_eval_<prompts>[_continual][_lam..][_xnormal]
    [_step<N> when --step was given]."""
    tag = "_".join(prompts) + ("_continual" if continual else "")
    tag += (f"_lam{lam:g}" if lam != 1e-3 else "") + ("_xnormal" if x_dist == "normal" else "")
    tag += f"_step{step}" if step is not None else ""
    return f"icl_eval_{tag}"


def write_report(report: IclReport, run_dir: Path) -> None:
    from mesacli import plots
    from mesacli.checkpoint import dump_json

    meta = report.meta
    stem = report_stem(meta["prompts"], bool(meta["continual_switch_at"]), meta["lam"], meta["x_dist"],
                       report.step if meta.get("step_given") else None)
    report.json_path = run_dir / f"{stem}.json"
    report.plot_path = run_dir / f"{stem}.png"
    dump_json(report.json_path, {"meta": report.meta, "curves": report.curves})
    title = (f"{report.spec.name} @ {report.step}: in-context regression, {report.meta['seeds']} seeds x "
             f"{report.meta['batch']} prompts" + (f"\ntask switch (new W*) after example {meta['continual_switch_at']}"
                                                   if meta["continual_switch_at"] else ""))
    plots.icl_plot(report.curves, report.plot_path, title=title, dashed=tuple(
        k for k in report.curves if k not in report.model_curves), switch_at=meta["continual_switch_at"])
