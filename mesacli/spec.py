"""Experiment specs: frozen dataclasses loaded strictly from YAML.

A spec has three sections, ``task`` (the data), ``model`` (the Transformer) and ``train``
(optimiser, schedule, checkpoints).  Loading is strict (``mesacli.spec_loader``): an unknown key is an
error with a did-you-mean hint, a value of the wrong type is an error, and shapes that cannot
work together (e.g. constructed tokens that do not fit the embedding) are rejected by ``validate``
before any JAX work starts.  ``--set section.key=value`` overrides are parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from mesacli.errors import MesaError
from mesacli.spec_loader import adam_betas, build_spec, choice, non_negative, positive, read_spec_file

TASK_KINDS = ("linear", "partial", "nonlinear", "contracting", "fixed_teacher")
ATTENTION_KINDS = ("linear", "softmax", "mesa")
FIRST_LAYER_KINDS = ("linear", "softmax", "mesa", "softmax_pe")
MESA_IMPLS = ("chunked", "sequential")
MESA_FORGET = ("none", "fixed", "gate")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Synthetic sequence task (paper-spec section 1). Defaults: fully observed linear dynamics.

    h_{t+1} = clip(W* f(h_t) + sigma_h eps), s_t = C* h_t + sigma_s eps, a fresh W* (and C*) per
    sequence.  Inputs are s_1..s_T, targets s_2..s_{T+1}.
    """

    kind: str = "linear"  # linear | partial | nonlinear | contracting | fixed_teacher
    state_dim: int = 10  # n_h
    obs_dim: int = 10  # n_s (must equal state_dim unless kind == partial)
    seq_len: int = 50  # T
    init_dist: str = "uniform"  # uniform: h_1 ~ U(-s, s) as in the authors' code; normal: N(0, s^2) as in the paper
    init_scale: float = 1.0
    state_noise: float = 0.01  # std of the transition noise
    obs_noise: float = 0.0  # std of the observation noise (0.01 for partial in the authors' code)
    obs_matrix_std: float = 0.5  # C*_ij ~ obs_matrix_std * N(0, 1) (partial only)
    state_clip: float = 10.0  # states are clipped to [-state_clip, state_clip] after every transition
    mlp_hidden: int = 40  # n_m of the nonlinear teacher MLP*
    mlp_scale: float = 1.1  # A, B ~ mlp_scale * N(0, 1), fixed for all sequences
    mlp_seed: int = 421  # A from PRNGKey(mlp_seed), B from PRNGKey(mlp_seed + 1)
    eig_low: float = 0.3  # contracting: 9 eigenvalues ~ U[eig_low, eig_high] plus one at eig_high
    eig_high: float = 0.9
    teacher_seed: int = 42  # fixed_teacher: W* = orthogonal(PRNGKey(teacher_seed))
    token_format: str = "constructed"  # raw: e_t = s_t; constructed: e_t = [0, s_t, s_t, s_{t-1}]
    mask_slots: tuple[int, ...] = ()  # constructed slots set to zero (the 1-layer models use [0, 1])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Transformer stack (paper-spec section 2). ``layers`` blocks; block 1 is ``first_layer``."""

    layers: int = 1
    attention: str = "linear"  # linear | softmax | mesa: the type of blocks 2..layers
    first_layer: str | None = None  # type of block 1 (softmax_pe: PE concatenated to q/k input); None = attention
    num_heads: int = 2
    key_size: int = 20
    embed_dim: int = 40
    input_proj: bool = False  # Dense token_dim -> embed_dim (no bias); else tokens must have embed_dim
    output_proj: bool = False  # Dense embed_dim -> obs_dim (no bias); else read slot 0 (first obs_dim dims)
    mlp: bool = False  # GELU MLP after each attention block
    mlp_hidden: int = 300
    layer_norm: bool = False  # pre-LayerNorm on the attention and MLP inputs
    qk_norm: bool = False  # L2-normalise q and k in blocks 2..layers (the nonlinear models)
    act_clip: float | None = None  # clip the residual stream to [-c, c] after every block
    init_std: float = 0.05  # weights ~ N(0, init_std^2)
    mesa_lambda_init: float = 1.0  # per-head lambda of the mesa-layer
    mesa_impl: str = "chunked"  # chunked: exact chunked parallel form; sequential: Sherman-Morrison scan
    mesa_chunk_size: int = 64  # tokens per chunk of the chunked form
    mesa_forget: str = "none"  # none | fixed (gamma = mesa_gamma) | gate (gamma_t = sigmoid(w_h . e_t + b_h))
    mesa_gamma: float = 1.0  # the fixed forgetting factor, in (0, 1]
    mesa_gate_bias: float = 3.0  # initial gate bias b_h (sigmoid(3) ~ 0.95)

    def layer_kinds(self) -> tuple[str, ...]:
        first = self.first_layer or self.attention
        return (first,) + (self.attention,) * (self.layers - 1)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Online training: AdamW, a fresh batch every step, Orbax checkpoints."""

    steps: int = 5000
    batch_size: int = 256
    # split each step's batch into micro-batches of this many sequences, gradients accumulated: the same
    # update up to float rounding, with a smaller working set (T=224 Softmax-7 on a 2-core CPU: 1.5x faster)
    micro_batch: int | None = None
    lr: float = 1e-4  # peak learning rate
    schedule: str = "constant"  # constant | warmup_cosine
    warmup_steps: int = 1000
    decay_steps: int = 30000  # warmup_cosine: cosine from peak to end_lr, reached at decay_steps
    end_lr: float = 1e-5
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_clip_kind: str = "elementwise"  # elementwise (authors' code: optax.clip) | global_norm (paper text)
    seed: int = 0  # init key and data stream: fold_in(seed, step)
    seeds: int = 1  # replicas trained in one program; replica i is the plain run with seed + i
    eval_seed: int = 12345  # fixed test batches
    eval_batches: int = 10
    eval_every: int = 500
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str = "experiment"
    description: str = ""
    task: TaskSpec = TaskSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()

    @property
    def token_dim(self) -> int:
        return (4 if self.task.token_format == "constructed" else 1) * self.task.obs_dim


# ----------------------------------------------------------------------------- loading


def spec_from_dict(data: Any, overrides: typing.Sequence[str] = ()) -> Spec:
    if isinstance(data, dict) and "data" in data and "task" not in data:
        raise MesaError("this is a language-model spec (it has a 'data' section): run it with `mesacli lm SPEC.yaml`")
    return build_spec(Spec, data, overrides, validate)


def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> Spec:
    return spec_from_dict(read_spec_file(path), overrides)


def load_run_spec(path: str | Path) -> Spec:
    """The spec.yaml of a synthetic-task run directory (``rundir.read_spec(run_dir, load_run_spec)``); a
    language-model run directory is refused with the commands that do read it."""
    data = read_spec_file(path)
    if isinstance(data, dict) and "data" in data and "task" not in data:
        run = Path(path).parent
        raise MesaError(f"{run} is a language-model run directory (this command reads runs of `mesacli train`): "
                        f"use `mesacli lm eval {run}` or `mesacli lm generate {run}`")
    return spec_from_dict(data)


# ----------------------------------------------------------------------------- validation


def validate(spec: Spec) -> None:
    """Reject values and shape combinations that cannot work, with a one-line reason."""
    task, model, train = spec.task, spec.model, spec.train
    choice(task.kind, TASK_KINDS, "task.kind")
    choice(task.init_dist, ("uniform", "normal"), "task.init_dist")
    choice(task.token_format, ("raw", "constructed"), "task.token_format")
    choice(model.attention, ATTENTION_KINDS, "model.attention")
    if model.first_layer is not None:
        choice(model.first_layer, FIRST_LAYER_KINDS, "model.first_layer")
    choice(model.mesa_impl, MESA_IMPLS, "model.mesa_impl")
    choice(model.mesa_forget, MESA_FORGET, "model.mesa_forget")
    if not 0 < model.mesa_gamma <= 1:
        raise MesaError(f"model.mesa_gamma: the forgetting factor must lie in (0, 1], got {model.mesa_gamma}")
    if model.mesa_lambda_init <= 0:
        raise MesaError(f"model.mesa_lambda_init: must be positive, got {model.mesa_lambda_init}")
    choice(train.schedule, ("constant", "warmup_cosine"), "train.schedule")
    choice(train.grad_clip_kind, ("elementwise", "global_norm"), "train.grad_clip_kind")
    for path, value in [
        ("task.state_dim", task.state_dim), ("task.obs_dim", task.obs_dim), ("task.seq_len", task.seq_len),
        ("task.mlp_hidden", task.mlp_hidden), ("model.layers", model.layers), ("model.num_heads", model.num_heads),
        ("model.key_size", model.key_size), ("model.embed_dim", model.embed_dim),
        ("model.mlp_hidden", model.mlp_hidden), ("model.init_std", model.init_std),
        ("model.mesa_chunk_size", model.mesa_chunk_size),
        ("train.steps", train.steps), ("train.batch_size", train.batch_size), ("train.lr", train.lr),
        ("train.eval_batches", train.eval_batches), ("train.eval_every", train.eval_every),
        ("train.log_every", train.log_every), ("train.checkpoint_every", train.checkpoint_every),
        ("train.keep_checkpoints", train.keep_checkpoints), ("train.seeds", train.seeds),
        ("task.init_scale", task.init_scale), ("task.state_clip", task.state_clip),
    ]:
        positive(value, path)
    for path, value in [("task.state_noise", task.state_noise), ("task.obs_noise", task.obs_noise),
                        ("task.obs_matrix_std", task.obs_matrix_std), ("train.weight_decay", train.weight_decay),
                        ("train.warmup_steps", train.warmup_steps), ("train.end_lr", train.end_lr)]:
        non_negative(value, path)
    adam_betas(train.b1, train.b2, train.eps)
    if task.seq_len < 2:
        raise MesaError(f"task.seq_len: must be at least 2, got {task.seq_len} (the loss is in-context prediction: "
                        f"at t=1 there is no earlier observation to learn from, s_0 = 0)")
    if model.act_clip is not None:
        positive(model.act_clip, "model.act_clip")
    if train.grad_clip is not None:
        positive(train.grad_clip, "train.grad_clip")
    if train.micro_batch is not None:
        positive(train.micro_batch, "train.micro_batch")
        if train.batch_size % train.micro_batch:
            raise MesaError(f"train.micro_batch ({train.micro_batch}) must divide train.batch_size "
                            f"({train.batch_size})")
    if task.kind != "partial" and task.obs_dim != task.state_dim:
        raise MesaError(
            f"task.obs_dim ({task.obs_dim}) must equal task.state_dim ({task.state_dim}) "
            f"unless task.kind is 'partial'"
        )
    if task.kind == "contracting" and not 0 < task.eig_low <= task.eig_high < 1:
        raise MesaError("task.eig_low/eig_high: need 0 < eig_low <= eig_high < 1 for contracting dynamics")
    if task.mask_slots and task.token_format != "constructed":
        raise MesaError("task.mask_slots only applies to task.token_format: constructed")
    for slot in task.mask_slots:
        if not 0 <= slot < 4:
            raise MesaError(f"task.mask_slots: slot {slot} does not exist (constructed tokens have slots 0-3)")
    if not model.input_proj and spec.token_dim != model.embed_dim:
        fmt = "constructed tokens [0, s_t, s_t, s_{t-1}]" if task.token_format == "constructed" else "raw tokens"
        raise MesaError(
            f"model.embed_dim ({model.embed_dim}) must equal the token size ({spec.token_dim}: {fmt} "
            f"of task.obs_dim {task.obs_dim}) when model.input_proj is false"
        )
    if not model.output_proj and model.embed_dim < task.obs_dim:
        raise MesaError(
            f"model.embed_dim ({model.embed_dim}) is smaller than task.obs_dim ({task.obs_dim}): "
            f"the prediction is read from the first obs_dim dimensions; set model.output_proj: true"
        )
    if "softmax_pe" in model.layer_kinds() and model.embed_dim % 2:
        raise MesaError(f"model.embed_dim ({model.embed_dim}) must be even for sinusoidal encodings (softmax_pe)")
    if train.schedule == "warmup_cosine" and train.decay_steps <= train.warmup_steps:
        raise MesaError("train.decay_steps must be larger than train.warmup_steps")
