"""Validation of the language models: per-position loss on fixed windows, bits per token, perplexity, ICL score."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mesacli.errors import MesaError
from mesacli.lm import data as lm_data
from mesacli.lm import model
from mesacli.lm.spec import LMSpec
from mesacli.lm.state import load_lm

LN2 = math.log(2.0)


def token_losses(params, windows_BT1, spec: LMSpec, dropout_key=None):
    """Cross-entropy (nats) of predicting token t+1 from tokens <= t, per position: [B, T]."""
    logits, _ = model.apply(params, windows_BT1[:, :-1], spec, dropout_key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows_BT1[:, 1:])


@dataclasses.dataclass
class Evaluation:
    """Validation numbers: mean loss (nats per token), bits per token (= bits per byte for byte tokens),
    perplexity, ICL score (loss at token icl_late minus loss at token icl_early) and the per-position loss."""

    loss: float
    bits_per_token: float
    perplexity: float
    icl_score: float
    per_position: np.ndarray

    def record(self, prefix: str = "val_") -> dict:
        return {f"{prefix}loss": self.loss, f"{prefix}bits_per_token": self.bits_per_token,
                f"{prefix}perplexity": self.perplexity, "icl_score": self.icl_score}


def make_evaluator(spec: LMSpec, val_tokens: np.ndarray) -> Callable[[Any], Evaluation]:
    """params -> Evaluation on eval.windows fixed windows of the validation split."""
    windows = lm_data.eval_windows(val_tokens, spec.model.context + 1, spec.eval.windows)
    losses = jax.jit(lambda params, w: jnp.sum(token_losses(params, w, spec), axis=0))
    size = spec.eval.batch_size

    def evaluate(params) -> Evaluation:
        total = sum(np.asarray(losses(params, jnp.asarray(windows[i:i + size]))).astype(np.float64)
                    for i in range(0, len(windows), size))
        curve = total / len(windows)
        loss = float(curve.mean())
        icl = float(curve[spec.eval.icl_late - 1] - curve[spec.eval.icl_early - 1])
        return Evaluation(loss, loss / LN2, math.exp(min(loss, 50.0)), icl, curve)

    return evaluate


def tokens_seen(spec: LMSpec, step: int) -> int:
    return step * spec.train.batch_size * spec.model.context


def result_row(spec: LMSpec, step: int, evaluation: Evaluation, num_params: int, seconds: float | None) -> dict:
    """One line of a results table: the model, its budget and its validation numbers."""
    return {"name": spec.name, "layers": list(spec.model.layers), "mlp": spec.model.mlp,
            "key_shift": spec.model.key_shift, "params": num_params, "steps": step,
            "tokens": tokens_seen(spec, step), "seconds": seconds, **evaluation.record()}


def evaluate_run(run_dir: str | Path, *, windows: int | None = None, step: int | None = None) -> dict:
    """Re-evaluate a run's checkpoint on ``windows`` validation windows (default: the spec's eval.windows);
    returns a results row (``result_row`` keys, seconds None) with the per-position loss."""
    spec, params, at_step, _ = load_lm(run_dir, step)
    if windows is not None:
        if windows < 1:
            raise MesaError(f"--windows must be >= 1, got {windows}")
        spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, windows=windows))
    corpus = lm_data.corpus_for(spec, Path(run_dir))
    evaluation = make_evaluator(spec, corpus.val)(params)
    return {**result_row(spec, at_step, evaluation, model.count_params(params), None), "windows": spec.eval.windows,
            "per_position_loss": [float(x) for x in evaluation.per_position]}
