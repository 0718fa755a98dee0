"""The in-context regression baselines (numpy, float64) on the (x, y) data of the prompts.

- autoregressive ridge LSQ on all consecutive pairs of the plain prompt [x_1, y_1, x_2, ...], including the
  spurious (y_i -> x_{i+1}) pairs (the paper's "LSQ control"); its early bump is dominated by a few nearly
  singular prompts, so the median over prompts is reported beside the mean;
- proper ridge LSQ on the pairs (x_j, y_j), j < i;
- one-step GD from W = 0 on the pairs (x_j, y_j), j < i, with one line-searched learning rate eta
  (``gd1_xy_direction``; ``mesacli.baselines.gd1_sequence_direction`` is GD-1 on a sequence's consecutive pairs).
"""

from __future__ import annotations

import numpy as np

from mesacli.baselines import ridge_predictions


def interleave(x_BNS: np.ndarray, y_BNS: np.ndarray) -> np.ndarray:
    """The plain prompt [x_1, y_1, x_2, y_2, ...] as [B, 2N, S]."""
    b, n, s = x_BNS.shape
    return np.stack([x_BNS, y_BNS], axis=2).reshape(b, 2 * n, s)


def ar_ridge_predictions(x_BNS: np.ndarray, y_BNS: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """The autoregressive LSQ control: at x_i, Phi = sum s_t s_{t-1}^T (sum s_{t-1} s_{t-1}^T + lam I)^{-1} over all
    consecutive pairs of the plain prompt up to x_i ((x_j, y_j) for j < i and (y_j, x_{j+1}) for j < i); y^_i = Phi x_i.
    """
    seq = interleave(np.asarray(x_BNS, np.float64), np.asarray(y_BNS, np.float64))
    return ridge_predictions(seq, lam)[:, 0::2]


def _cumulative_before(m_BNIJ: np.ndarray) -> np.ndarray:
    """sum_{j < i} m_j along axis 1 (exclusive prefix sum)."""
    c = np.cumsum(m_BNIJ, axis=1)
    return np.concatenate([np.zeros_like(c[:, :1]), c[:, :-1]], axis=1)


def ridge_xy_predictions(x_BNS: np.ndarray, y_BNS: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """Proper ridge regression on the pairs (x_j, y_j), j < i: W^_i = Y X^T (X X^T + lam I)^{-1}; y^_i = W^_i x_i."""
    x, y = np.asarray(x_BNS, np.float64), np.asarray(y_BNS, np.float64)
    n = x.shape[-1]
    xx = _cumulative_before(np.einsum("bni,bnj->bnij", x, x)) + lam * np.eye(n)
    yx = _cumulative_before(np.einsum("bni,bnj->bnij", y, x))
    z = np.linalg.solve(xx, x[..., None])[..., 0]
    return np.einsum("bnij,bnj->bni", yx, z)


def gd1_xy_direction(x_BNS: np.ndarray, y_BNS: np.ndarray) -> np.ndarray:
    """g_i = sum_{j<i} y_j x_j^T x_i: one GD step from W = 0 on 1/2 sum_{j<i} ||y_j - W x_j||^2 predicts eta g_i."""
    x, y = np.asarray(x_BNS, np.float64), np.asarray(y_BNS, np.float64)
    scores_BNN = np.tril(np.einsum("bis,bjs->bij", x, x), k=-1)  # x_i . x_j for j < i
    return np.einsum("bij,bjs->bis", scores_BNN, y)


def gd1_xy_line_search(x_BNS: np.ndarray, y_BNS: np.ndarray) -> float:
    """The eta minimising sum_{b,i} ||y_i - eta g_i||^2 (quadratic in eta): eta* = <y, g> / <g, g>."""
    g = gd1_xy_direction(x_BNS, y_BNS)
    return float(np.sum(g * np.asarray(y_BNS, np.float64)) / np.sum(g * g))


def losses_BN(pred_BNS: np.ndarray, y_BNS: np.ndarray) -> np.ndarray:
    """1/2 ||y_i - y^_i||^2 per prompt and example, [B, N] (float64)."""
    return 0.5 * np.sum((np.asarray(pred_BNS, np.float64) - np.asarray(y_BNS, np.float64)) ** 2, axis=-1)
