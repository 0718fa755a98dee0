"""Training of the hybrid language models (``mesacli lm train``, ``mesacli lm compare``).

A run directory (``mesacli.rundir``) holds spec.yaml (the resolved spec), data/ (memory-mapped tokens, unless
data.cache_dir says otherwise), checkpoints/ (Orbax), metrics.jsonl (train loss every log_every steps; validation
loss, bits per token, perplexity and ICL score every eval_every steps), eval.json (the final validation numbers and
the per-position validation loss) and two figures.  Steps run through the guarded loop (``mesacli.loop``): an
interrupted run resumes from its last checkpoint; a non-finite loss stops training and keeps the last good one.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mesacli import loop, rundir
from mesacli.checkpoint import dump_json
from mesacli.errors import MesaError, warn_stderr
from mesacli.lm import data as lm_data
from mesacli.lm import model
from mesacli.lm.evaluate import Evaluation, make_evaluator, result_row, token_losses, tokens_seen
from mesacli.lm.spec import LMSpec, lm_spec_from_dict, load_lm_spec
from mesacli.lm.state import init_state, make_optimizer, make_schedule
from mesacli.memory import check_fits
from mesacli.sharding import check_batch_divides, make_mesh
from mesacli.spec_loader import read_spec_file, spec_to_dict


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

    def row(self) -> dict:
        """The results-table row (``lm.evaluate.result_row``)."""
        return result_row(self.spec, self.step, self.evaluation, self.num_params, self.seconds)


def train_lm(spec: LMSpec, run_dir: str | Path, *, progress: bool = True, stop_at_step: int | None = None,
             say: Callable[[str], None] | None = None) -> LMResult:
    """Train ``spec`` in ``run_dir`` (resuming from its latest checkpoint), evaluate, write figures."""
    from mesacli import plots

    run_dir = Path(run_dir)
    rundir.prepare(spec, run_dir, load_lm_spec)
    corpus = lm_data.corpus_for(spec, run_dir, say)
    mesh = make_mesh()
    check_batch_divides(spec.train.batch_size, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    ckpts = rundir.open_checkpoints(run_dir, spec)
    state = init_state(spec, corpus.tokenizer.vocab_size, mesh)
    resumed, resumed_from = rundir.resume_state(spec, ckpts, state, say or warn_stderr), None
    if resumed is not None:
        state, resumed_from = resumed
    train_step = make_train_step(spec, mesh)
    windows_like = jax.ShapeDtypeStruct((spec.train.batch_size, spec.model.context + 1), jnp.int32,
                                        sharding=batch_sharding)  # as step_fn's, so the first step reuses it
    try:
        check_fits(train_step.lower(state, windows_like).compile(), "a training step",
                   hint="reduce model.context or train.batch_size")
    except BaseException:
        ckpts.close()
        raise
    evaluate, last = make_evaluator(spec, corpus.val), {}

    def evaluated(state, step: int) -> Evaluation:
        """The evaluation at ``step``, computed once (the loop's last one is also the final result)."""
        if last.get("step") != step:
            last.update(step=step, evaluation=evaluate(state["params"]))
        return last["evaluation"]

    length = spec.model.context + 1

    def step_fn(state, step: int):
        windows = lm_data.sample_windows(corpus.train, length, spec.train.batch_size,
                                         np.random.default_rng([spec.train.seed, step]))
        return train_step(state, jax.device_put(windows, batch_sharding))

    t = spec.train
    done = loop.run(state, ckpts=ckpts, run_dir=run_dir, log_path=run_dir / rundir.METRICS_FILE,
                    end=t.steps if stop_at_step is None else min(stop_at_step, t.steps), total=t.steps,
                    step_fn=step_fn, every=loop.Every(t.log_every, t.eval_every, t.checkpoint_every),
                    meta={"spec": spec_to_dict(spec), "mesacli": "0.1.0", "vocab_size": corpus.tokenizer.vocab_size},
                    seeds=[t.seed], description=spec.name,
                    eval_record=lambda state, step: {"step": step, **evaluated(state, step).record()},
                    progress=progress, usable=lambda state: bool(np.isfinite(evaluate(state["params"]).loss)))
    state = done.state
    final_step = int(state["step"])
    final = evaluated(state, final_step)
    num_params = model.count_params(state["params"])
    if final_step == spec.train.steps:
        dump_json(run_dir / rundir.LM_EVAL_FILE, {"step": final_step, **final.record(), "params": num_params,
                                                  "tokens_seen": tokens_seen(spec, final_step),
                                                  "tokenizer": corpus.tokenizer.kind,
                                                  "icl_positions": [spec.eval.icl_early, spec.eval.icl_late],
                                                  "per_position_loss": [float(x) for x in final.per_position]})
        plots.lm_position_plot({spec.name: final.per_position}, run_dir / "val_loss_per_position.png",
                               marks=(spec.eval.icl_early, spec.eval.icl_late),
                               title=f"{spec.name}: validation loss per position (step {final_step})")
        plots.lm_training_plot(run_dir / rundir.METRICS_FILE, run_dir / "training_curve.png", title=spec.name)
    return LMResult(run_dir, spec, final_step, final, state["params"], num_params, tokens_seen(spec, final_step),
                    done.seconds, resumed_from, done.interrupted)


# ----------------------------------------------------------------------------- comparison


def load_compare_specs(paths: Sequence[str | Path], overrides: Sequence[str] = (),
                       steps: int | None = None) -> list[LMSpec]:
    """The specs of ``lm compare``: each file read once, ``overrides`` applied; ``steps`` sets train.steps of
    every model and caps its warmup at a tenth of it."""
    specs = []
    for path in paths:
        data = read_spec_file(path)
        spec = lm_spec_from_dict(data, overrides)
        if steps is not None:
            spec = lm_spec_from_dict(data, [*overrides, f"train.steps={steps}",
                                            f"train.warmup_steps={min(spec.train.warmup_steps, steps // 10)}"])
        specs.append(spec)
    return specs


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
        rows.append(result.row())
    early, late = specs[0].eval.icl_early, specs[0].eval.icl_late
    dump_json(out_dir / "compare.json", {"rows": rows, "icl_positions": [early, late],
                                         "per_position_loss": {k: [float(x) for x in v] for k, v in curves.items()}})
    plots.lm_position_plot(curves, out_dir / "compare.png", title="validation loss per position", marks=(early, late))
    return rows
