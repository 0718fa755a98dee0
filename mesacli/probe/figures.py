"""Figures of the probe analyses (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mesacli.plots import finish, save  # noqa: E402


def _save(fig, path: Path) -> None:
    save(fig, path, dpi=90)


def loss_curves(curves: dict[str, np.ndarray], path: Path, title: str, log: bool = True) -> None:
    """Per-position loss, one line per model / baseline."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, curve) in enumerate(curves.items()):
        curve = np.asarray(curve)
        ax.plot(np.arange(1, len(curve) + 1), curve, "-" if i == 0 else "--",
                label=f"{name} (mean {curve.mean():.4f})")
    finish(fig, ax, path, xlabel="position t", ylabel=r"$\frac{1}{2}\|s_{t+1} - f_t\|^2$", title=title, log=log,
           dpi=90)


def cosine_curves(curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        curve = np.asarray(curve)
        ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{name} (mean over t>=2: {curve[1:].mean():.3f})")
    ax.set_ylim(min(0.0, min(float(np.min(c)) for c in curves.values())), 1.05)
    ax.set_xlabel("position t")
    ax.set_ylabel("cosine similarity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _blocks(ax, n: int, shape: tuple[int, int], labels: Sequence[str] | None, out_labels: Sequence[str] | None):
    for k in range(1, shape[0] // n):
        ax.axhline(k * n - 0.5, color="k", lw=0.5)
    for k in range(1, shape[1] // n):
        ax.axvline(k * n - 0.5, color="k", lw=0.5)
    if labels is not None:
        ax.set_yticks([n * k + n / 2 - 0.5 for k in range(len(labels))], labels, fontsize=7)
    if out_labels is not None:
        ax.set_xticks([n * k + n / 2 - 0.5 for k in range(len(out_labels))], out_labels, fontsize=7)


def product_heatmaps(qk_HII: np.ndarray, vp_HIE: np.ndarray, n: int, path: Path,
                     slot_labels: Sequence[str] | None, title: str) -> None:
    """One row per head: W_q W_k^T (query rows x key columns) and W_v P (value rows x output columns)."""
    heads = qk_HII.shape[0]
    fig, axes = plt.subplots(heads, 2, figsize=(8, 3.6 * heads), squeeze=False)
    for h in range(heads):
        for ax, mat, name in ((axes[h, 0], qk_HII[h], "Wq Wk^T (query x key)"),
                              (axes[h, 1], vp_HIE[h], "Wv P (value x output)")):
            lim = float(np.abs(mat).max()) or 1.0
            im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
            out_labels = slot_labels if mat.shape[1] == mat.shape[0] else None
            _blocks(ax, n, mat.shape, slot_labels, out_labels)
            ax.set_title(f"head {h + 1}: {name}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def depth_curves(layers: np.ndarray, series: dict[str, dict[int, np.ndarray]], path: Path, title: str) -> None:
    """Probe error against layer (0 = input): one panel per position, one line per probe target."""
    positions = sorted(next(iter(series.values())).keys())
    fig, axes = plt.subplots(1, len(positions), figsize=(4 * len(positions), 3.6), squeeze=False)
    for ax, t in zip(axes[0], positions, strict=True):
        for name, per_t in series.items():
            ax.plot(layers, np.maximum(per_t[t], 1e-8), "o-", label=name)  # exact fits shown at 1e-8
        ax.set_yscale("log")
        ax.set_xlabel("layer (0 = input)")
        ax.set_title(f"t = {t}", fontsize=9)
        ax.set_xticks(layers)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel(r"probe MSE  $\sum_{dims}/(2B)$")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def position_curves(curves: dict[str, np.ndarray], path: Path, title: str, ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        curve = np.asarray(curve)
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
    finish(fig, ax, path, xlabel="position t", ylabel=ylabel, title=title, legend_size=7, dpi=90)


def binding_bars(lags: Sequence[int], mse: Sequence[float], r2: Sequence[float], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    axes[0].bar(list(lags), mse)
    axes[0].set_ylabel("MSE (element mean)")
    axes[1].bar(list(lags), r2)
    axes[1].set_ylabel(r"$R^2$")
    for ax in axes:
        ax.set_xlabel(r"$t'$ (probe target $s_{t'}$)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def attention_maps(maps_HTT: np.ndarray, path: Path, title: str) -> None:
    heads = maps_HTT.shape[0]
    fig, axes = plt.subplots(1, heads, figsize=(3.4 * heads, 3.4), squeeze=False)
    for h in range(heads):
        mat = maps_HTT[h]
        if mat.min() < 0:
            lim = float(np.abs(mat).max()) or 1.0
            im = axes[0, h].imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
        else:
            im = axes[0, h].imshow(mat, cmap="viridis")
        axes[0, h].set_title(f"head {h + 1}", fontsize=9)
        axes[0, h].set_xlabel("key t'")
        axes[0, h].set_ylabel("query t")
        fig.colorbar(im, ax=axes[0, h], fraction=0.046)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def steps_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    finish(fig, ax, path, xlabel="step", ylabel="loss", title=title, dpi=90)


def sensitivity_curves(steps: Sequence[int], positions: Sequence[int], sens_NPT: np.ndarray, path: Path,
                       title: str) -> None:
    """One panel per position t: ||d e^(1)_t / d s_t'|| against training step for t' = t, t-1, t-2 and the mean
    over older tokens."""
    fig, axes = plt.subplots(1, len(positions), figsize=(4 * len(positions), 3.4), squeeze=False)
    for ax, (i, t) in zip(axes[0], enumerate(positions), strict=True):
        for lag in range(min(3, t)):
            ax.plot(steps, sens_NPT[:, i, t - 1 - lag], "o-", ms=3, label="t' = t" + (f"-{lag}" if lag else ""))
        if t > 3:
            ax.plot(steps, sens_NPT[:, i, : t - 3].mean(axis=-1), "o--", ms=3, label="t' <= t-3 (mean)")
        ax.set_xlabel("training step")
        ax.set_title(f"t = {t}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(r"$\|\partial e^{(1)}_t / \partial s_{t'}\|_F$")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
