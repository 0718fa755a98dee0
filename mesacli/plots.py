"""Figures (matplotlib, Agg backend): per-position loss curves and training curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def finish(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, log: bool = True, title_size: int = 10,
           legend_size: int | None = 8, dpi: int = 120) -> None:
    """The common end of a line figure: log y axis (optional), labels, grid, legend (optional); then ``save``."""
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3, which="both")
    if legend_size is not None:
        ax.legend(fontsize=legend_size)
    save(fig, path, dpi)


def save(fig, path: Path, dpi: int = 120) -> None:
    """Tight layout, write the PNG (creating its folder), close the figure."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


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
    finish(fig, ax, path, xlabel="position t", ylabel=r"test loss  $\frac{1}{2}\|s_{t+1} - f_t\|^2$", title=title)


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
    finish(fig, ax, path, xlabel="step", ylabel="loss", title=title)


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
    finish(fig, ax, path, xlabel="example i", ylabel=r"label loss  $\frac{1}{2}\|y_i - f(\ldots, x_i)\|^2$",
           title=title, title_size=9, legend_size=7)


def loss_curve_plot(steps, losses, path: Path, title: str) -> None:
    """A training-style loss curve (log scale) from parallel lists of steps and losses."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses)
    finish(fig, ax, path, xlabel="step", ylabel="label loss", title=title, legend_size=None)


def lm_position_plot(curves: dict[str, np.ndarray], path: Path, title: str,
                     marks: tuple[int, ...] = ()) -> None:
    """Validation cross-entropy (bits) against position in the window (log x), one line per model;
    dotted vertical lines at ``marks`` (the ICL-score positions)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        bits = np.asarray(curve) / np.log(2.0)
        ax.plot(np.arange(1, len(bits) + 1), bits, label=f"{name} (mean {bits.mean():.3f})")
    for mark in marks:
        ax.axvline(mark, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    finish(fig, ax, path, xlabel="position in the window (tokens)", ylabel="validation loss (bits per token)",
           title=title, log=False)


def lm_training_plot(metrics_path: Path, path: Path, title: str) -> None:
    """Train and validation loss (bits per token) against step, from a language model's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"] / np.log(2.0)) for r in rows if "loss" in r]
    val = [(r["step"], r["val_bits_per_token"]) for r in rows if "val_bits_per_token" in r]
    for points, style, label in ((train, "-", "train"), (val, "o-", "validation")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    finish(fig, ax, path, xlabel="step", ylabel="loss (bits per token)", title=title, log=False)


def ledger_plot(curves: dict[str, list[float]], points: dict[str, list[tuple[float, float]]], path: Path, title: str,
                xlabel: str, ylabel: str, x_start: int = 1, dashed: tuple[str, ...] = ()) -> None:
    """Our curves (lines, x = x_start, x_start + 1, ...) beside the paper's values (markers, one series per
    name in ``points``; a marker series takes the colour of the curve of the same name), log y axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = {}
    for name, curve in curves.items():
        x = np.arange(x_start, x_start + len(curve))
        (line,) = ax.plot(x, curve, "--" if name in dashed else "-", label=f"ours: {name}")
        colours[name] = line.get_color()
    for name, xy in points.items():
        if xy:
            xs, ys = zip(*xy, strict=True)
            ax.plot(xs, ys, "o", mfc="none", ms=8, mew=1.5, color=colours.get(name), label=f"paper: {name}")
    finish(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, title_size=9, legend_size=7)
