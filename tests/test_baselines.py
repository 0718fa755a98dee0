"""GD-1 and ridge least-squares baselines against direct numpy computations."""

from __future__ import annotations

import numpy as np

from mesacli import baselines
from tests.conftest import tiny_spec


def test_ridge_matches_a_direct_solve_per_position():
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, 12, 4))
    lam = 0.1
    pred = baselines.ridge_predictions(obs, lam)
    for b in range(3):
        for t in range(12):
            x = np.vstack([np.zeros(4), obs[b, :t]])  # inputs s_0..s_{t-1}, s_0 = 0
            y = obs[b, : t + 1]  # targets s_1..s_t
            phi = np.linalg.solve(x.T @ x + lam * np.eye(4), x.T @ y).T
            np.testing.assert_allclose(pred[b, t], phi @ obs[b, t], rtol=1e-9, atol=1e-12)


def test_gd1_line_search_is_the_best_eta():
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(4, 10, 3))
    targets = rng.normal(size=(4, 10, 3))
    eta = baselines.gd1_line_search(obs, targets)
    grid = np.linspace(eta - 0.5, eta + 0.5, 2001)
    losses = [baselines.per_position_loss(baselines.gd1_predictions(obs, e), targets).mean() for e in grid]
    assert abs(grid[int(np.argmin(losses))] - eta) <= 0.5 / 1000 + 1e-12
    # the direction is one gradient step from Phi = 0 on 1/2 sum ||s_t' - Phi s_t'-1||^2
    b, t = 2, 6
    grad = -sum(np.outer(obs[b, i], obs[b, i - 1] if i else np.zeros(3)) for i in range(t + 1))
    np.testing.assert_allclose(baselines.gd1_sequence_direction(obs)[b, t], -grad @ obs[b, t], rtol=1e-10)


def test_baseline_curves_on_the_task():
    spec = tiny_spec(task={"seq_len": 12})
    curves, eta = baselines.baseline_curves(spec)
    gd, ridge = curves.values()
    assert eta > 0 and gd.shape == ridge.shape == (12,)
    assert ridge[-1] < 0.1 * gd[-1]  # least squares identifies W* after enough pairs
