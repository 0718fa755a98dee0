"""Closed-form in-context baselines on observation sequences (numpy, float64).

Both regress s_{t'} on s_{t'-1} over the pairs t' <= t (s_0 = 0, current pair included) and predict
s_{t+1} from s_t:
- GD-1 (Proposition 1, Phi_0 = 0): s^_{t+1} = eta sum_{t'<=t} s_{t'} s_{t'-1}^T s_t, one gradient step
  from zero with learning rate eta, line-searched exactly (the loss is quadratic in eta).
- ridge least squares: s^_{t+1} = Phi_t s_t with Phi_t = Y X^T (X X^T + lam I)^{-1}.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mesacli import tasks
from mesacli.spec import Spec


def _pairs(obs_BTS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regression inputs x_{t'} = s_{t'-1} (s_0 = 0) and targets y_{t'} = s_{t'}."""
    obs = np.asarray(obs_BTS, dtype=np.float64)
    prev = np.concatenate([np.zeros_like(obs[:, :1]), obs[:, :-1]], axis=1)
    return prev, obs


def gd1_sequence_direction(obs_BTS: np.ndarray) -> np.ndarray:
    """g_t = sum_{t'<=t} s_{t'} s_{t'-1}^T s_t, so that GD-1 predicts eta * g_t."""
    x, y = _pairs(obs_BTS)
    scores_BTS = np.einsum("bti,bsi->bts", np.asarray(obs_BTS, np.float64), x)
    scores_BTS = np.tril(scores_BTS)  # t' <= t
    return np.einsum("bts,bsi->bti", scores_BTS, y)


def gd1_line_search(obs_BTS: np.ndarray, targets_BTS: np.ndarray) -> float:
    """The eta minimising sum ||s_{t+1} - eta g_t||^2: eta* = <y, g> / <g, g>."""
    g = gd1_sequence_direction(obs_BTS)
    y = np.asarray(targets_BTS, np.float64)
    return float(np.sum(g * y) / np.sum(g * g))


def gd1_predictions(obs_BTS: np.ndarray, eta: float) -> np.ndarray:
    return eta * gd1_sequence_direction(obs_BTS)


def ridge_predictions(obs_BTS: np.ndarray, lam: float = 1e-3, features_BTF: np.ndarray | None = None) -> np.ndarray:
    """Phi_t s_t with Phi_t = (sum y x^T)(sum x x^T + lam I)^{-1}, sums over t' <= t.

    With ``features_BTF`` (phi_t = phi(s_t), e.g. concatenated past observations) the inputs are x_{t'} = phi_{t'-1}
    (phi_0 = 0), the targets stay y_{t'} = s_{t'}, and the prediction is Phi_t phi_t."""
    s = np.asarray(obs_BTS, np.float64)
    phi = s if features_BTF is None else np.asarray(features_BTF, np.float64)
    x, _ = _pairs(phi)
    n = x.shape[-1]
    xx_BTNN = np.cumsum(np.einsum("bti,btj->btij", x, x), axis=1) + lam * np.eye(n)
    yx_BTSN = np.cumsum(np.einsum("bti,btj->btij", s, x), axis=1)
    # Phi_t phi_t = Y X^T (X X^T + lam I)^{-1} phi_t; solve the symmetric system for z = (.)^{-1} phi_t.
    z = np.linalg.solve(xx_BTNN, phi[..., None])[..., 0]
    return np.einsum("btij,btj->bti", yx_BTSN, z)


def per_position_loss(pred_BTS: np.ndarray, targets_BTS: np.ndarray) -> np.ndarray:
    """Paper Eq. 1 per position, in float64: (1/2B) sum_b ||s_{t+1} - f_t||^2."""
    diff = np.asarray(pred_BTS, np.float64) - np.asarray(targets_BTS, np.float64)
    return 0.5 * np.mean(np.sum(diff**2, axis=-1), axis=0)


def gd1_search_eta(spec: Spec) -> float:
    """GD-1's eta line-searched on batches separate from the test batches (keys from eval_seed + 1)."""
    search_spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, eval_seed=spec.train.eval_seed + 1))
    search = tasks.eval_batches(search_spec)
    return gd1_line_search(np.concatenate([np.asarray(b.obs_BTS) for b in search]),
                           np.concatenate([np.asarray(b.targets_BTS) for b in search]))


def baseline_curves(spec: Spec, lam: float = 1e-3, test_batches: list | None = None
                    ) -> tuple[dict[str, np.ndarray], float]:
    """Per-position test loss of GD-1 and ridge LSQ on the spec's fixed test batches (or ``test_batches``).

    eta is line-searched on separate batches (keys from eval_seed + 1), not on the test batches.
    Returns ({name: curve [T]}, eta).
    """
    eta = gd1_search_eta(spec)
    test = tasks.eval_batches(spec) if test_batches is None else test_batches
    gd, ridge = [], []
    for b in test:
        obs, tgt = np.asarray(b.obs_BTS), np.asarray(b.targets_BTS)
        gd.append(per_position_loss(gd1_predictions(obs, eta), tgt))
        ridge.append(per_position_loss(ridge_predictions(obs, lam), tgt))
    return {f"GD-1 (eta={eta:.4f})": np.mean(gd, axis=0), f"ridge LSQ (lam={lam:g})": np.mean(ridge, axis=0)}, eta
