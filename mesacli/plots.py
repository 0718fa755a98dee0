"""Figures (matplotlib, Agg backend): per-position loss curves and training curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def per_position_plot(curves: dict[str, np.ndarray], path: Path, title: str, dashed: tuple[str, ...] = (),
                      bands: dict[str, np.ndarray] | None = None) -> None:
    """Test loss against position t (log scale), one line per model; names in ``dashed`` (baselines) dashed;
    ``bands``: a +-1 std band (over seeds) around the named curves."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        curve = np.asarray(curve)
        t = np.arange(1, len(curve) + 1)
        (line,) = ax.plot(t, curve, "--" if name in dashed else "-", label=f"{name} (mean {curve.mean():.4f})")
        if bands and name in bands:
            std = np.asarray(bands[name])
            ax.fill_between(t, np.maximum(curve - std, curve * 1e-3), curve + std, color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("position t")
    ax.set_ylabel(r"test loss  $\frac{1}{2}\|s_{t+1} - f_t\|^2$")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_plot(metrics_path: Path, path: Path, title: str) -> None:
    """Train loss (and eval loss where logged) against step, from metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"], r.get("loss_std", 0.0)) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"], r.get("eval_loss_std", 0.0)) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, style, label, alpha in ((train, "-", "train loss", 0.7), (evals, "o-", "test loss", 1.0)):
        if not points:
            continue
        steps, mean, std = (np.array(x, dtype=float) for x in zip(*points, strict=True))
        (line,) = ax.plot(steps, mean, style, label=label + (" (mean ± std over seeds)" if std.any() else ""),
                          alpha=alpha)
        if std.any():
            ax.fill_between(steps, np.maximum(mean - std, mean * 1e-3), mean + std, color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def icl_plot(curves: dict[str, dict], path: Path, title: str, dashed: tuple[str, ...] = (),
             switch_at: int | None = None) -> None:
    """Per-example label loss against example index i (log scale): mean over seeds with a +-1 std band; a dotted
    line for a curve's median over prompts where given; names in ``dashed`` (baselines) dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        mean, std = np.asarray(c["mean"]), np.asarray(c["std"])
        i = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(i, mean, "--" if name in dashed else "-", label=name)
        ax.fill_between(i, np.maximum(mean - std, 1e-8), mean + std, color=line.get_color(), alpha=0.15)
        if "median" in c:
            ax.plot(i, c["median"], ":", color=line.get_color(), label=f"{name}, median")
    if switch_at:
        ax.axvline(switch_at + 0.5, color="grey", lw=1, ls="-.", label="task switch")
    ax.set_yscale("log")
    ax.set_xlabel("example i")
    ax.set_ylabel(r"label loss  $\frac{1}{2}\|y_i - f(\ldots, x_i)\|^2$")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curve_plot(steps, losses, path: Path, title: str) -> None:
    """A training-style loss curve (log scale) from parallel lists of steps and losses."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("label loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
