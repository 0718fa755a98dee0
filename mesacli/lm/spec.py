"""Language-model specs (paper appendix G, paper-spec section 6): frozen dataclasses loaded strictly from YAML.

Sections: ``data`` (the text and its tokens), ``model`` (pre-LayerNorm GPT-2 blocks whose attention layer
is chosen per position), ``train`` (AdamW, warmup + cosine) and ``eval`` (validation windows and the
in-context-learning score).  Loading uses the same strict rules as the synthetic-task specs (unknown key
with a did-you-mean hint, wrong types, impossible combinations) and the same ``--set`` overrides.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from mesacli.errors import MesaError
from mesacli.spec_loader import adam_betas, build_spec, choice, non_negative, positive, read_spec_file

LM_LAYER_KINDS = ("softmax", "linear", "dpfp", "mesa", "mesanet")
MESANET_SOLVERS = ("exact", "cg", "cg_fixed")  # = mesacli.mesanet.SOLVERS (not imported: no jax at spec loading)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Local text only (never downloaded): ``path`` is a file, a directory (every file below it, sorted) or
    a glob; None = the embedded default corpus.  Files are documents, separated by an EOS token."""

    path: str | None = None  # a relative path is from the current directory (stored absolute in the run's spec)
    tokenizer: str = "bytes"  # bytes (vocabulary 256 + EOS) or a local tokenizer.json (needs `tokenizers`)
    val_fraction: float = 0.1  # share of the split blocks that go to validation
    split_block: int = 4096  # tokens per block of the deterministic train/validation split
    split_seed: int = 0  # which blocks are validation blocks (a hash of seed and block index)
    cache_dir: str | None = None  # where the memory-mapped token files go; None = <run dir>/data


@dataclasses.dataclass(frozen=True)
class LMModelSpec:
    """GPT-2 blocks: x <- x + attn(LN(x)); x <- x + MLP(LN(x)) (if ``mlp``); tokens embedded, sinusoidal PE
    added, embedding dropout, final LayerNorm, output projection to logits."""

    layers: tuple[str, ...] = ("softmax", "mesa")  # kind of each block: softmax | linear | dpfp | mesa | mesanet
    context: int = 256  # tokens per training window
    embed_dim: int = 128
    num_heads: int = 4
    key_size: int = 32
    mlp: bool = False
    mlp_ratio: int = 4  # hidden size of the ReLU MLP = mlp_ratio * embed_dim
    dpfp_nu: int = 2  # DPFP-nu features of keys/queries in dpfp and mesa layers (0: none); size 2 * key_size * nu
    key_shift: bool = False  # block 1's keys come from the previous token (the hard-coded one-step key-shift)
    mesa_lambda_init: float = 1.0
    mesa_chunk_size: int = 64
    # mesanet blocks (mesacli/lm/mesanet_block.py); recurrent decoding always solves exactly
    mesanet_solver: str = "exact"  # exact (chunked Cholesky) | cg (to mesanet_cg_tol) | cg_fixed (30 CG steps)
    mesanet_chunk_size: int = 64
    mesanet_cg_tol: float = 1e-4  # solver cg: stop at ||r|| <= tol ||q||, in (0, 1)
    mesanet_output_gate: bool = True  # y = W_o [RMSNorm(o) * SiLU(W_g x)]; false: W_o RMSNorm(o)
    dropout: float = 0.1  # embedding dropout
    init_std: float = 0.02  # N(0, init_std^2); weights feeding the residual stream scaled by 1/sqrt(2 * layers)


@dataclasses.dataclass(frozen=True)
class LMTrainSpec:
    """AdamW (decay on matrices only), global-norm clipping, linear warmup then cosine decay."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    end_lr: float = 1e-4  # reached at the last step
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0  # init and the training windows of step s: fold_in(seed, s)
    log_every: int = 25
    eval_every: int = 250
    checkpoint_every: int = 250
    keep_checkpoints: int = 2


@dataclasses.dataclass(frozen=True)
class LMEvalSpec:
    """Validation: ``windows`` fixed windows of the validation split.  ICL score (Kaplan et al., Olsson et
    al.): loss at token ``icl_late`` minus loss at token ``icl_early`` (1-based positions in a window)."""

    windows: int = 1024
    batch_size: int = 32
    icl_early: int = 50
    icl_late: int = 200


@dataclasses.dataclass(frozen=True)
class LMSpec:
    name: str = "lm"
    description: str = ""
    data: DataSpec = DataSpec()
    model: LMModelSpec = LMModelSpec()
    train: LMTrainSpec = LMTrainSpec()
    eval: LMEvalSpec = LMEvalSpec()


def validate_lm(spec: LMSpec) -> None:
    """Reject values that cannot work, with a one-line reason."""
    d, m, t, e = spec.data, spec.model, spec.train, spec.eval
    if not m.layers:
        raise MesaError("model.layers: list at least one layer kind, e.g. [softmax, mesa]")
    for i, kind in enumerate(m.layers):
        choice(kind, LM_LAYER_KINDS, f"model.layers[{i}]")
    if d.tokenizer != "bytes" and not d.tokenizer.endswith(".json"):
        raise MesaError(f"data.tokenizer: 'bytes' or the path of a local tokenizer.json, got {d.tokenizer!r}")
    if not 0 < d.val_fraction < 1:
        raise MesaError(f"data.val_fraction: must lie in (0, 1), got {d.val_fraction}")
    for path, value in [
        ("data.split_block", d.split_block), ("model.context", m.context), ("model.embed_dim", m.embed_dim),
        ("model.num_heads", m.num_heads), ("model.key_size", m.key_size), ("model.mlp_ratio", m.mlp_ratio),
        ("model.mesa_lambda_init", m.mesa_lambda_init), ("model.mesa_chunk_size", m.mesa_chunk_size),
        ("model.mesanet_chunk_size", m.mesanet_chunk_size),
        ("model.init_std", m.init_std), ("train.steps", t.steps), ("train.batch_size", t.batch_size),
        ("train.lr", t.lr), ("train.grad_clip", t.grad_clip), ("train.log_every", t.log_every),
        ("train.eval_every", t.eval_every), ("train.checkpoint_every", t.checkpoint_every),
        ("train.keep_checkpoints", t.keep_checkpoints), ("eval.windows", e.windows),
        ("eval.batch_size", e.batch_size), ("eval.icl_early", e.icl_early), ("eval.icl_late", e.icl_late),
    ]:
        positive(value, path)
    for path, value in [("model.dpfp_nu", m.dpfp_nu), ("train.warmup_steps", t.warmup_steps),
                        ("train.weight_decay", t.weight_decay), ("train.end_lr", t.end_lr)]:
        non_negative(value, path)
    adam_betas(t.b1, t.b2, t.eps)
    choice(m.mesanet_solver, MESANET_SOLVERS, "model.mesanet_solver")
    if not 0 < m.mesanet_cg_tol < 1:
        raise MesaError(f"model.mesanet_cg_tol: must lie in (0, 1), got {m.mesanet_cg_tol}")
    if not 0 <= m.dropout < 1:
        raise MesaError(f"model.dropout: must lie in [0, 1), got {m.dropout}")
    if m.embed_dim % 2:
        raise MesaError(f"model.embed_dim ({m.embed_dim}) must be even (sinusoidal position encodings)")
    if m.key_shift and m.layers[0] == "softmax":
        raise MesaError("model.key_shift replaces the first softmax layer: block 1 must be linear, dpfp, mesa or "
                        "mesanet")
    if t.warmup_steps >= t.steps:
        raise MesaError(f"train.warmup_steps ({t.warmup_steps}) must be smaller than train.steps ({t.steps})")
    if not e.icl_early < e.icl_late <= m.context:
        raise MesaError(f"eval.icl_early ({e.icl_early}) < eval.icl_late ({e.icl_late}) <= model.context "
                        f"({m.context}) is required")


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def absolute_data_paths(spec: LMSpec) -> LMSpec:
    """``spec`` with data.path, data.cache_dir and a tokenizer.json path made absolute (relative ones are meant
    from the current directory), so that the run directory's spec.yaml names the same files from anywhere
    (`mesacli lm eval RUN` run from another directory)."""
    d = spec.data
    tokenizer = d.tokenizer if d.tokenizer == "bytes" else _absolute(d.tokenizer)
    data = dataclasses.replace(d, path=_absolute(d.path), cache_dir=_absolute(d.cache_dir), tokenizer=tokenizer)
    return spec if data == d else dataclasses.replace(spec, data=data)


def lm_spec_from_dict(data: Any, overrides: typing.Sequence[str] = ()) -> LMSpec:
    """The spec of parsed YAML (``--set`` overrides applied), its data paths made absolute."""
    if isinstance(data, dict) and "task" in data:
        raise MesaError("this is a synthetic-task spec (it has a 'task' section): run it with `mesacli train`")
    return absolute_data_paths(build_spec(LMSpec, data, overrides, validate_lm))


def load_lm_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> LMSpec:
    return lm_spec_from_dict(read_spec_file(path), overrides)


def load_lm_run_spec(path: str | Path) -> LMSpec:
    """The spec.yaml of a language-model run directory (``rundir.read_spec(run_dir, load_lm_run_spec)``); a
    synthetic-task run directory is refused with the commands that do read it."""
    data = read_spec_file(path)
    if isinstance(data, dict) and "task" in data:
        run = Path(path).parent
        raise MesaError(f"{run} is a synthetic-task run directory (this command reads runs of `mesacli lm`): "
                        f"use `mesacli eval {run}`")
    return lm_spec_from_dict(data)
