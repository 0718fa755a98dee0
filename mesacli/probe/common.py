"""Shared pieces of the probe analyses: the loaded run, probe data, least-squares probes, weight products.

Data seeds: seed k of an analysis draws its batches from ``fold_in(PRNGKey(eval_seed), 1000 + k)``
(the spec's fixed test batches use indices 0..eval_batches-1 and the GD-1 line search uses
``eval_seed + 1``, so none of them overlap).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mesacli import tasks
from mesacli.rundir import PROBE_DIR, replica_folder
from mesacli.spec import Spec

SLOT_NAMES = ("0", "s_t", "s_t", "s_{t-1}")  # the constructed token [0, s_t, s_t, s_{t-1}] (paper-spec 1)


@dataclasses.dataclass
class RunContext:
    """A loaded run and the options shared by the analyses."""

    run_dir: Path
    spec: Spec
    params: Any  # None: a model-free run (an analysis in registry.MODEL_FREE, see probe.run_model_free)
    step: int | None
    seeds: int = 5  # data seeds to average over (paper: 5)
    batch_size: int = 256  # sequences per probe batch (paper: 256)
    report: Callable[[str], None] | None = None  # progress messages
    options: dict = dataclasses.field(default_factory=dict)  # per-analysis settings (see run_probe)
    replica_seed: int | None = None  # the seed of one replica of a multi-seed run (None: a single-seed run)
    folder: str = PROBE_DIR  # the records' folder in run_dir (rundir.SOLVER_DIR for a model-free run)

    @property
    def replica(self) -> str:
        """"seed<k>" for one replica of a multi-seed run (its outputs go to probe/seed<k>/), else ""."""
        return replica_folder(self.replica_seed)

    @property
    def seed(self) -> int:
        """The training seed of the analysed parameters."""
        return self.spec.train.seed if self.replica_seed is None else self.replica_seed

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.folder / self.replica

    def say(self, message: str) -> None:
        if self.report is not None:
            self.report(message)


def fit_on_fresh_batches(params, tx, loss_fn: Callable, spec: Spec, data_key: jax.Array, *, steps: int,
                         batch_size: int, log_every: int) -> tuple[Any, list[tuple[int, float]]]:
    """Minimise loss_fn(params, batch) with the Optax ``tx``, a fresh batch every step from
    fold_in(data_key, step); returns (params, [(step, loss)] every ``log_every`` steps and at the last)."""
    import optax

    @jax.jit
    def step_fn(p, state, step):
        batch = tasks.sample_batch(jax.random.fold_in(data_key, step), spec, batch_size)
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state, history = tx.init(params), []
    for step in range(steps):
        params, state, loss = step_fn(params, state, step)
        if step % log_every == 0 or step == steps - 1:
            history.append((step, float(loss)))
    return params, history


@functools.lru_cache(maxsize=16)
def _sampler(spec: Spec, batch_size: int):
    return jax.jit(lambda key: tasks.sample_batch(key, spec, batch_size))


def probe_batch(spec: Spec, seed: int, batch_size: int) -> tasks.Batch:
    """The batch of data seed ``seed`` (see the module docstring)."""
    key = jax.random.fold_in(jax.random.PRNGKey(spec.train.eval_seed), 1000 + seed)
    return _sampler(spec, batch_size)(key)


def test_batches(spec: Spec, seed_offset: int = 0) -> list[tasks.Batch]:
    """The spec's fixed test batches (as mesacli.train.eval_batches; seed_offset=1 gives the GD-1 search set)."""
    key = jax.random.PRNGKey(spec.train.eval_seed + seed_offset)
    sample = _sampler(spec, spec.train.batch_size)
    return [sample(jax.random.fold_in(key, i)) for i in range(spec.train.eval_batches)]


# ----------------------------------------------------------------------------- least-squares probes


LSTSQ_CUTOFF = "float32"  # recorded in the probe records: singular values below float32 precision are cut


def lstsq_probe(x_BF: np.ndarray, y_BS: np.ndarray) -> tuple[np.ndarray, float]:
    """Unregularised least-squares map without bias, fitted and scored on the same rows (paper-spec 4.4).

    Returns (W [F, S] minimising ||X W - Y||^2, MSE = sum_{b, dims} (X W - Y)^2 / (2 B)).

    The activations are float32: directions of X whose singular value is below float32 precision
    (eps_32 * max(B, F) of the largest) are round-off, e.g. the 30 empty dimensions of a rank-10 input
    projection into 40, and are cut as the paper's float32 ``lstsq`` does; fitting them in float64 would let the
    probe fit noise (Softmax-7's input-layer target probe: 1.39 instead of 1.59; paper 1.61).
    """
    x = np.asarray(x_BF, np.float64)
    y = np.asarray(y_BS, np.float64)
    w, *_ = np.linalg.lstsq(x, y, rcond=np.finfo(np.float32).eps * max(x.shape))
    mse = float(np.sum((x @ w - y) ** 2) / (2 * x.shape[0]))
    return w, mse


def r_squared(pred_BS: np.ndarray, y_BS: np.ndarray) -> float:
    """The authors' ``r2_score_batch``: 1 - SS_res / SS_tot per dimension (SS_tot about the batch mean), averaged
    over dimensions (not pooled over them)."""
    y = np.asarray(y_BS, np.float64)
    ss_res = np.sum((y - np.asarray(pred_BS, np.float64)) ** 2, axis=0)
    ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    return float(np.mean(1.0 - ss_res / ss_tot))


def zscore_keep(y_BS: np.ndarray, limit: float = 2.0) -> np.ndarray:
    """Rows whose target norm has a z-score below ``limit`` (the paper drops rows with z >= 2)."""
    norms = np.linalg.norm(np.asarray(y_BS, np.float64), axis=-1)
    std = norms.std()
    if std == 0:
        return np.ones_like(norms, dtype=bool)
    return (norms - norms.mean()) / std < limit


def cosine(a: np.ndarray, b: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Cosine similarity along ``axis``."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = np.sum(a * b, axis=axis)
    return num / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis) + eps)


# ----------------------------------------------------------------------------- preconditioned inputs


def context_gram(obs_BTS: np.ndarray, lam: float) -> np.ndarray:
    """A_t = S_{t-1} S_{t-1}^T + lam I with S_{t-1} = [s_1 .. s_{t-1}] (tokens before t), shape [B, T, S, S]."""
    s = np.asarray(obs_BTS, np.float64)
    outer = np.einsum("bti,btj->btij", s, s)
    before = np.cumsum(outer, axis=1) - outer  # sum over t' < t
    return before + lam * np.eye(s.shape[-1])


def preconditioned_exact(obs_BTS: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """(S_{t-1} S_{t-1}^T + lam I)^{-1} s_t, solved exactly in float64 (paper-spec 4.4 target ii)."""
    a = context_gram(obs_BTS, lam)
    return np.linalg.solve(a, np.asarray(obs_BTS, np.float64)[..., None])[..., 0]


# ----------------------------------------------------------------------------- weight products


def token_space_products(params: Any, spec: Spec, layer: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-head W_q W_k^T and W_v P of block ``layer``, mapped into token space through input_proj.

    Returns qk_HII (score = x_q^T QK x_k, rows = query dims, columns = key dims) and vp_HIE
    (the head adds x_k^T VP to the residual stream).  Without input_proj, I = E.
    """
    block = params["blocks"][layer]
    wq, wk = np.asarray(block["w_q"], np.float64), np.asarray(block["w_k"], np.float64)
    wv, wo = np.asarray(block["w_v"], np.float64), np.asarray(block["w_o"], np.float64)
    qk = np.einsum("ehd,fhd->hef", wq, wk)
    vp = np.einsum("ehd,hdf->hef", wv, wo)
    if layer == 0 and spec.model.input_proj:
        a = np.asarray(params["input_proj"], np.float64)  # [I, E]
        e = a.shape[1]
        qk = np.einsum("ie,hef,jf->hij", a, qk[:, :e, :e], a)  # a softmax_pe layer's PE part is dropped
        vp = np.einsum("ie,hef->hif", a, vp)
    return qk, vp


def block_diag_means(m_XY: np.ndarray, n: int) -> np.ndarray:
    """Mean of the diagonal of every n x n block of a matrix: [X, Y] -> [X/n, Y/n] (paper-spec 4.2)."""
    rows, cols = m_XY.shape[-2] // n, m_XY.shape[-1] // n
    blocks = m_XY[..., : rows * n, : cols * n].reshape(m_XY.shape[:-2] + (rows, n, cols, n))
    return np.einsum("...iaja->...ij", blocks) / n


def block_offdiag_max(m_XY: np.ndarray, n: int) -> np.ndarray:
    """Largest |off-diagonal entry| inside every n x n block."""
    rows, cols = m_XY.shape[-2] // n, m_XY.shape[-1] // n
    blocks = m_XY[..., : rows * n, : cols * n].reshape(m_XY.shape[:-2] + (rows, n, cols, n))
    off = np.abs(blocks) * (1 - np.eye(n))[:, None, :]
    return off.max(axis=(-3, -1))


def jnp_f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for summary.md: ``digits`` significant digits, '-' for a missing value."""
    return "-" if x is None else f"{x:.{digits}g}"
