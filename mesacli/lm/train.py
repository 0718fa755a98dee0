"""Training, evaluation and sampling of the hybrid language models (``mesacli lm``).

A run directory holds spec.yaml (the resolved spec), data/ (memory-mapped tokens, unless data.cache_dir
says otherwise), checkpoints/ (Orbax), metrics.jsonl (train loss every log_every steps; validation loss,
bits per token, perplexity and ICL score every eval_every steps), eval.json (the final validation
numbers and the per-position validation loss) and two figures.  An interrupted run resumes from its
last checkpoint; a non-finite loss stops training and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mesacli.checkpoint import Checkpoints, dump_json
from mesacli.errors import MesaError
from mesacli.layers import sinusoidal_encoding
from mesacli.lm import data as lm_data
from mesacli.lm import model
from mesacli.lm.spec import LMSpec, LMTrainSpec, load_lm_spec
from mesacli.spec import spec_to_dict
from mesacli.train import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    SPEC_FILE,
    _MetricLog,
    _truncate_metrics,
    check_batch_divides,
    make_mesh,
    prepare_run_dir,
    restore_state,
    run_steps,
)

EVAL_FILE = "eval.json"
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- optimiser


def make_schedule(train: LMTrainSpec) -> optax.Schedule:
    """Linear warmup from lr / 1000 to lr over warmup_steps, then cosine decay to end_lr at the last step."""
    return optax.warmup_cosine_decay_schedule(init_value=train.lr / 1000, peak_value=train.lr,
                                              warmup_steps=train.warmup_steps, decay_steps=train.steps,
                                              end_value=train.end_lr)


def make_optimizer(train: LMTrainSpec) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with weight decay on matrices only (not on biases, LayerNorm, lambda)."""
    decay_mask = partial(jax.tree_util.tree_map, lambda p: p.ndim >= 2)
    return optax.chain(optax.clip_by_global_norm(train.grad_clip),
                       optax.adamw(make_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                                   weight_decay=train.weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------- losses


def token_losses(params, windows_BT1, spec: LMSpec, dropout_key=None):
    """Cross-entropy (nats) of predicting token t+1 from tokens <= t, per position: [B, T]."""
    logits, _ = model.apply(params, windows_BT1[:, :-1], spec, dropout_key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows_BT1[:, 1:])


def make_train_step(spec: LMSpec, mesh) -> Callable:
    """The one jitted step: (state, windows [B, T+1]) -> (state, metrics); dropout key fold_in(seed, step)."""
    tx = make_optimizer(spec.train)
    schedule = make_schedule(spec.train)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    def loss_fn(params, windows, key):
        return jnp.mean(token_losses(params, windows, spec, key))

    @partial(jax.jit, in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
             donate_argnums=0)
    def train_step(state, windows_BT1):
        key = jax.random.fold_in(jax.random.PRNGKey(spec.train.seed), state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], windows_BT1, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": finite,
                   "lr": schedule(state["step"])}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def init_state(spec: LMSpec, vocab_size: int, mesh) -> dict:
    def init_all():
        params = model.init(jax.random.PRNGKey(spec.train.seed), spec, vocab_size)
        return {"params": params, "opt_state": make_optimizer(spec.train).init(params),
                "step": jnp.array(0, jnp.int32)}

    return jax.jit(init_all, out_shardings=NamedSharding(mesh, PartitionSpec()))()


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


# ----------------------------------------------------------------------------- run directory


def corpus_for(spec: LMSpec, run_dir: Path, progress: Callable[[str], None] | None = None) -> lm_data.TokenData:
    cache = Path(spec.data.cache_dir) if spec.data.cache_dir else run_dir / "data"
    data = lm_data.prepare_corpus(spec.data, cache, progress)
    lm_data.check_context(data, spec.model.context)
    return data


def load_lm(run_dir: str | Path, step: int | None = None) -> tuple[LMSpec, Any, int, lm_data.Tokenizer]:
    """(spec, params, step, tokenizer) of a language-model run directory's latest (or given) checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / SPEC_FILE).exists():
        raise MesaError(f"{run_dir} is not a mesacli run directory (no {SPEC_FILE})")
    spec = load_lm_spec(run_dir / SPEC_FILE)
    tokenizer = lm_data.load_tokenizer(spec.data.tokenizer)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise MesaError(f"no checkpoint found in {ckpt_dir}")
    ckpts = Checkpoints(ckpt_dir, keep=spec.train.keep_checkpoints, read_only=True)
    try:
        state = restore_state(spec, ckpts, init_state(spec, tokenizer.vocab_size, make_mesh()), step)
    finally:
        ckpts.close()
    return spec, state["params"], int(state["step"]), tokenizer


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class LMResult:
    run_dir: Path
    spec: LMSpec
    step: int
    evaluation: Evaluation
    params: Any
    num_params: int
    tokens_seen: int
    seconds: float | None  # wall time of this session's training steps (compilation included)
    resumed_from: int | None
    interrupted: bool = False


def train_lm(spec: LMSpec, run_dir: str | Path, *, progress: bool = True, stop_at_step: int | None = None,
             say: Callable[[str], None] | None = None) -> LMResult:
    """Train ``spec`` in ``run_dir`` (resuming from its latest checkpoint), evaluate, write figures."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mesacli import plots

    run_dir = Path(run_dir)
    prepare_run_dir(spec, run_dir, load=load_lm_spec)
    corpus = corpus_for(spec, run_dir, say)
    mesh = make_mesh()
    check_batch_divides(spec.train.batch_size, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    ckpts = Checkpoints(run_dir / CHECKPOINT_DIR, keep=spec.train.keep_checkpoints)
    state = init_state(spec, corpus.tokenizer.vocab_size, mesh)
    resumed_from = ckpts.latest_step()
    if resumed_from is not None:
        state = restore_state(spec, ckpts, state)
    start = int(state["step"])
    _truncate_metrics(run_dir / METRICS_FILE, start)
    meta = {"spec": spec_to_dict(spec), "mesacli": "0.1.0", "vocab_size": corpus.tokenizer.vocab_size}
    train_step = make_train_step(spec, mesh)
    evaluate, last = make_evaluator(spec, corpus.val), {}

    def evaluated(state, step: int) -> Evaluation:
        """The evaluation at ``step``, computed once (the loop's last one is also the final result)."""
        if last.get("step") != step:
            last.update(step=step, evaluation=evaluate(state["params"]))
        return last["evaluation"]

    log = _MetricLog(run_dir / METRICS_FILE, spec.train.log_every, [spec.train.seed])
    end = spec.train.steps if stop_at_step is None else min(stop_at_step, spec.train.steps)
    t0, length = time.time(), spec.model.context + 1

    def save(state, step: int) -> None:
        if ckpts.latest_step() != step:
            ckpts.save(step, state, dict(meta, step=step, loss=log.last_loss))

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task_id = bar.add_task(spec.name, total=spec.train.steps, completed=start, loss="-")

        def step_fn(state, step: int):
            windows = lm_data.sample_windows(corpus.train, length, spec.train.batch_size,
                                             np.random.default_rng([spec.train.seed, step]))
            return train_step(state, jax.device_put(windows, batch_sharding))

        state, step, interrupted = run_steps(
            state, start, end, spec.train.steps, step_fn=step_fn, log=log, save=save, ckpts=ckpts, run_dir=run_dir,
            every=(spec.train.log_every, spec.train.eval_every, spec.train.checkpoint_every),
            eval_record=lambda state, step: {"step": step, **evaluated(state, step).record()},
            on_flush=lambda step, loss: bar.update(task_id, completed=step, loss=f"{loss:.4f}"))
    ckpts.close()
    seconds = time.time() - t0
    final = evaluated(state, int(state["step"]))
    final_step = int(state["step"])
    num_params = model.count_params(state["params"])
    tokens_seen = final_step * spec.train.batch_size * spec.model.context
    if final_step == spec.train.steps:
        dump_json(run_dir / EVAL_FILE, {"step": final_step, **final.record(), "params": num_params,
                                        "tokens_seen": tokens_seen, "tokenizer": corpus.tokenizer.kind,
                                        "icl_positions": [spec.eval.icl_early, spec.eval.icl_late],
                                        "per_position_loss": [float(x) for x in final.per_position]})
        plots.lm_position_plot({spec.name: final.per_position}, run_dir / "val_loss_per_position.png",
                               marks=(spec.eval.icl_early, spec.eval.icl_late),
                               title=f"{spec.name}: validation loss per position (step {final_step})")
        plots.lm_training_plot(run_dir / METRICS_FILE, run_dir / "training_curve.png", title=spec.name)
    return LMResult(run_dir, spec, final_step, final, state["params"], num_params, tokens_seen, seconds,
                    resumed_from, interrupted)


def evaluate_run(run_dir: str | Path, *, windows: int | None = None, step: int | None = None) -> dict:
    """Re-evaluate a run's checkpoint on ``windows`` validation windows (default: the spec's eval.windows);
    returns a results row (``result_row`` keys, seconds None) with the per-position loss."""
    spec, params, at_step, _ = load_lm(run_dir, step)
    if windows is not None:
        if windows < 1:
            raise MesaError(f"--windows must be >= 1, got {windows}")
        spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, windows=windows))
    corpus = corpus_for(spec, Path(run_dir))
    evaluation = make_evaluator(spec, corpus.val)(params)
    result = LMResult(Path(run_dir), spec, at_step, evaluation, params, model.count_params(params),
                      at_step * spec.train.batch_size * spec.model.context, None, None)
    return {**result_row(result), "windows": spec.eval.windows,
            "per_position_loss": [float(x) for x in evaluation.per_position]}


# ----------------------------------------------------------------------------- sampling


def generate(params, spec: LMSpec, tokenizer: lm_data.Tokenizer, prompt: str, *, max_new_tokens: int = 200,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> str:
    """Sample a continuation of ``prompt`` token by token with the recurrent forms (``model.decode_step``):
    constant memory per linear/dpfp/mesa layer, a key/value cache per softmax layer.  temperature 0 = greedy."""
    if max_new_tokens < 1:
        raise MesaError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise MesaError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise MesaError(f"--top-k must be >= 1, got {top_k}")
    prompt_ids = tokenizer.encode(prompt.encode("utf-8"))
    if len(prompt_ids) == 0:
        prompt_ids = np.array([tokenizer.eos_id])
    total = len(prompt_ids) + max_new_tokens
    pe_TE = sinusoidal_encoding(total, spec.model.embed_dim)
    step = jax.jit(lambda p, state, token, pos: model.decode_step(p, spec, state, token, pos, pe_TE))
    state = model.init_decode_state(params, spec, 1, total)
    logits = None
    for pos, token in enumerate(prompt_ids):
        state, logits = step(params, state, jnp.array([token]), jnp.int32(pos))
    key = jax.random.PRNGKey(seed)
    out = []
    for pos in range(len(prompt_ids), total):
        key, sub = jax.random.split(key)
        row = logits[0]
        if temperature == 0:
            token = int(jnp.argmax(row))
        else:
            row = row / temperature
            if top_k is not None and top_k < row.shape[0]:
                row = jnp.where(row < jnp.sort(row)[-top_k], -jnp.inf, row)
            token = int(jax.random.categorical(sub, row))
        out.append(token)
        if pos + 1 < total:
            state, logits = step(params, state, jnp.array([token]), jnp.int32(pos))
    return tokenizer.decode(np.array(out))


# ----------------------------------------------------------------------------- comparison


def result_row(result: LMResult) -> dict:
    """One line of a results table: the model, its budget and its validation numbers."""
    spec = result.spec
    return {"name": spec.name, "layers": list(spec.model.layers), "mlp": spec.model.mlp,
            "key_shift": spec.model.key_shift, "params": result.num_params, "steps": result.step,
            "tokens": result.tokens_seen, "seconds": result.seconds, **result.evaluation.record()}


def compare_lms(specs: list[LMSpec], out_dir: str | Path, *, progress: bool = True,
                say: Callable[[str], None] | None = None) -> list[dict]:
    """Train every spec with the same budget (steps, batch size, context: the same number of tokens) in
    out_dir/<name>, then return one row per model and write compare.json and compare.png there."""
    from mesacli import plots

    out_dir = Path(out_dir)
    budgets = {(s.train.steps, s.train.batch_size, s.model.context) for s in specs}
    if len(budgets) > 1:
        listing = ", ".join(f"{s.name}: steps {s.train.steps}, batch {s.train.batch_size}, context {s.model.context}"
                            for s in specs)
        raise MesaError(f"compare needs equal budgets (same train.steps, train.batch_size, model.context): {listing}")
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        raise MesaError(f"compare needs distinct spec names (they name the run directories), got {names}")
    rows, curves = [], {}
    for spec in specs:
        if say:
            say(f"training {spec.name} ({', '.join(spec.model.layers)})")
        result = train_lm(spec, out_dir / spec.name, progress=progress, say=say)
        if result.interrupted:
            raise KeyboardInterrupt
        curves[spec.name] = result.evaluation.per_position
        rows.append(result_row(result))
    early, late = specs[0].eval.icl_early, specs[0].eval.icl_late
    dump_json(out_dir / "compare.json", {"rows": rows, "icl_positions": [early, late],
                                         "per_position_loss": {k: [float(x) for x in v] for k, v in curves.items()}})
    plots.lm_position_plot(curves, out_dir / "compare.png", title="validation loss per position", marks=(early, late))
    return rows
