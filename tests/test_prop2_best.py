"""The best k-step Prop-2 solver in closed form (probe.prop2_best, solvers.polynomial_basis_predictions): every
Chebyshev solver lies in its polynomial family, the fit is the least-squares optimum, and the record reads back as
the ledger's metrics."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, merge

from mesacli import tasks
from mesacli.errors import MesaError
from mesacli.probe import prop2_best, run_model_free, solvers
from mesacli.reproduce import metrics
from mesacli.spec import spec_from_dict

LINEAR = spec_from_dict(merge(TINY, {"task": {"seq_len": 12}, "train": {"batch_size": 32, "eval_batches": 2}}))


def _batches(n: int, seed: int = 0) -> list[tasks.Batch]:
    return [tasks.sample_batch(jax.random.fold_in(jax.random.PRNGKey(seed), i), LINEAR, 32) for i in range(n)]


def _loss(pred_BTS, batches) -> float:
    return float(np.mean(solvers.loss_curve(pred_BTS, batches)))


@pytest.mark.parametrize("current_pair", [False, True])
def test_every_chebyshev_solver_is_a_polynomial_of_the_basis(current_pair):
    """basis @ chebyshev_polynomial(alpha, beta) gives prop2_predictions (the solver's own recursion), for random
    coefficients of 0, 1 and 3 steps and the paper's 6-step ones."""
    obs = _batches(1)[0].obs_BTS
    rng = np.random.default_rng(1)
    cases = [(rng.uniform(0.5, 4, k).tolist(), [0.0] + rng.uniform(0, 2, max(k - 1, 0)).tolist()) for k in (0, 1, 3)]
    for alphas, betas in cases + [solvers.PAPER_CHEBYSHEV_LINEAR]:
        k = len(alphas)
        basis = solvers.polynomial_basis_predictions(obs, k, 1e-3, current_pair=current_pair)
        assert basis.shape == (*obs.shape, k + 1) and basis.dtype == np.float64
        want = np.asarray(solvers.prop2_predictions(jnp.asarray(obs), jnp.asarray(alphas, jnp.float32),
                                                    jnp.asarray(betas[:k], jnp.float32), current_pair=current_pair))
        got = basis @ solvers.chebyshev_polynomial(alphas, betas[:k])
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


def test_the_best_polynomial_is_the_least_squares_optimum_and_a_floor_under_chebyshev_solvers():
    fit = _batches(3)
    k = 2
    coefficients, fit_loss = solvers.fit_best_polynomial(fit, k)
    # an independent reference: the float64 least-squares solve of the stacked design matrix
    design = np.concatenate([solvers.polynomial_basis_predictions(b.obs_BTS, k).reshape(-1, k + 1) for b in fit])
    target = np.concatenate([np.asarray(b.targets_BTS, np.float64).reshape(-1) for b in fit])
    want = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(coefficients, want, rtol=1e-6)
    best = [solvers.polynomial_basis_predictions(b.obs_BTS, k) @ coefficients for b in fit]
    assert fit_loss == pytest.approx(_loss(best, fit), rel=1e-9)
    rng = np.random.default_rng(2)
    for alphas, betas in [([1.0, 1.0], [0.0, 0.0]), ([1.25, 5.1], [0.0, 3.7])] + [
            (rng.uniform(0.5, 6, 2).tolist(), [0.0, float(rng.uniform(0, 4))]) for _ in range(4)]:
        chebyshev = solvers.solver_predictions(fit, alphas, betas)
        assert _loss(chebyshev, fit) >= fit_loss * (1 - 1e-5)
    assert fit_loss < _loss(solvers.solver_predictions(fit, [1.0, 1.0], [0.0, 0.0]), fit)  # Neumann: strictly above


def test_model_free_prop2_best_records_the_floor_on_both_test_sets(tmp_path):
    run = tmp_path / "run"
    record = run_model_free(run, "prop2_best", LINEAR, options={"prop2_k": 2})
    assert record["k"] == 2 and record["model_free"] and len(record["coefficients"]) == 3
    assert set(record["per_position_loss"]) == {"ours", "authors"}
    saved = json.loads((run / "solver" / "prop2_best.json").read_text())
    assert saved["coefficients"] == pytest.approx(record["coefficients"])
    assert (run / "solver" / "prop2_best_loss.png").stat().st_size > 1000
    for name, batches in (("ours", None), ("authors", tasks.authors_test_batches(LINEAR.task))):
        if batches is not None:  # the curve is the fitted polynomial on the authors' batches
            preds = [solvers.polynomial_basis_predictions(b.obs_BTS, 2) @ np.asarray(record["coefficients"])
                     for b in batches]
            np.testing.assert_allclose(record["per_position_loss"][name], solvers.loss_curve(preds, batches),
                                       rtol=1e-9)
        twin = "_authors" if name == "authors" else ""
        read = metrics.parse_metric(f"solver.prop2_best{twin}.t12").read(run)
        assert read.value == pytest.approx(record["per_position_loss"][name][-1])
        seq_avg = metrics.parse_metric(f"solver.prop2_best{twin}.seq_avg").read(run).value
        assert seq_avg == pytest.approx(record["seq_avg_loss"][name])
    assert metrics.authors_twin("probe.prop2_best.t50") == "probe.prop2_best_authors.t50"
    assert metrics.authors_twin("probe.prop2.chebyshev.t50") == "probe.prop2_authors.chebyshev.t50"
    assert "best 2-step solver: ours t=12" in prop2_best.headline(record)
    # beside prop2's learned solver, when the run has one: its polynomial and loss in the record and summary
    made = run_model_free(run, "prop2", LINEAR, options={"prop2_k": 2, "prop2_train_steps": 20, "prop2_lr": 0.3})
    again = run_model_free(run, "prop2_best", LINEAR, options={"prop2_k": 2})
    learned = made["learned"]["chebyshev"]
    assert again["learned_chebyshev"]["coefficients"] == pytest.approx(
        solvers.chebyshev_polynomial(learned["alpha"], learned["beta"]).tolist())
    assert again["learned_chebyshev"]["seq_avg"] >= again["seq_avg_loss"]["ours"] * 0.98
    assert "prop2.json's learned Chebyshev solver" in "\n".join(prop2_best.summary(again))


def test_prop2_best_refuses_tasks_whose_solvers_use_other_features(tmp_path):
    partial = spec_from_dict(merge(TINY, {"task": {"kind": "partial", "state_dim": 6, "obs_dim": 2}}))
    with pytest.raises(MesaError, match="prop2_best needs a fully observed task"):
        run_model_free(tmp_path / "run", "prop2_best", partial)
