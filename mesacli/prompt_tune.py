"""Prompt tuning of a frozen next-token model for in-context regression (paper-spec section 5, paper F.1.4).

Stage "eos": learn one EOS vector in R^{n_s} (init N(0, I)) for prompts [x_1, y_1, EOS, x_2, ...].
Stage "prefix": with that EOS frozen, learn P prefix vectors (init N(0, I)) prepended to the EOS prompt.
Both minimise the label loss only, mean over prompts and examples of 1/2 ||y_i - f(prompt up to x_i)||^2, with
Adam (paper/code: lr 1e-3, 5,000 steps; batch 64 [C] / 256 [P] for EOS, 128 [C] / 256 [P] for the prefix).
The model's parameters never change.

Each stage lives in RUN_DIR/prompt_tune/<stage>/: Orbax checkpoints of {tokens, opt_state, step} (plus, for the
prefix stage, the frozen EOS), loss.jsonl and loss.png.  The batch of step s comes from
fold_in(fold_in(PRNGKey(seed), "tune"), s), so a resumed stage follows the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mesacli import icl, runtime
from mesacli.checkpoint import Checkpoints, restore_latest
from mesacli.errors import MesaError
from mesacli.train import accumulated_value_and_grad

TUNE_DIR = "prompt_tune"
STAGES = ("eos", "prefix")
LOSS_FILE = "loss.jsonl"


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    steps: int = 5000
    lr: float = 1e-3
    batch: int = 64
    micro_batch: int | None = None  # accumulate the gradient over micro-batches (same update, smaller working set)
    prefix_len: int = 20
    n_examples: int | None = None  # None: as many as fit in the model's context
    x_dist: str = "uniform"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10

    def validate(self) -> TuneConfig:
        for name in ("steps", "batch", "prefix_len", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise MesaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise MesaError(f"--lr must be positive, got {self.lr}")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.batch % self.micro_batch):
            raise MesaError(f"--micro-batch ({self.micro_batch}) must be a positive divisor of --batch ({self.batch})")
        if self.x_dist not in icl.X_DISTS:
            raise MesaError(f"--x-dist: '{self.x_dist}' is not one of {', '.join(icl.X_DISTS)}")
        return self

    def identity(self, stage: str) -> dict:
        """The settings a resumed stage must share with the stored one (steps may grow)."""
        keys = ["lr", "batch", "n_examples", "x_dist", "seed"] + (["prefix_len"] if stage == "prefix" else [])
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass
class StageResult:
    stage: str
    step: int
    tokens: np.ndarray
    losses: list[tuple[int, float]]  # (step, train label loss) logged this session
    resumed_from: int | None
    seconds: float
    heldout_before: float | None = None  # held-out label loss of the initial tokens / after tuning
    heldout_after: float | None = None
    loss_path: Path | None = None
    plot_path: Path | None = None
    replica: int | None = None  # the replica's seed, for a run trained with train.seeds > 1


def stage_dir(run_dir: Path, stage: str, replica: int | None = None) -> Path:
    """RUN/prompt_tune/<stage>, or RUN/prompt_tune/seed<k>/<stage> for replica k of a multi-seed run."""
    return Path(run_dir) / TUNE_DIR / ("" if replica is None else f"seed{replica}") / stage


def _state_template(meta: dict) -> dict:
    n_s, stage = meta["n_s"], meta["stage"]
    shape = (n_s,) if stage == "eos" else (meta["config"]["prefix_len"], n_s)
    tokens = jnp.zeros(shape, jnp.float32)
    state = {"tokens": tokens, "opt_state": optax.adam(meta["config"]["lr"]).init(tokens),
             "step": jnp.array(0, jnp.int32)}
    if stage == "prefix":
        state["eos"] = jnp.zeros((n_s,), jnp.float32)
    return state


def load_tuned(run_dir: str | Path, n_s: int, replica: int | None = None) -> dict[str, Any]:
    """{"eos": vector or None, "prefix": [P, n_s] or None, "prefix_eos": the EOS frozen with that prefix,
    "<stage>_step" and "<stage>_model_step" (the model checkpoint step it was tuned on)} from the latest
    checkpoints of RUN_DIR/prompt_tune (of replica ``replica`` of a multi-seed run);
    a token of the wrong size is a MesaError."""
    out: dict[str, Any] = {"eos": None, "prefix": None, "prefix_eos": None}
    for stage in STAGES:
        found = restore_latest(stage_dir(run_dir, stage, replica) / "checkpoints", _state_template)
        if found is None:
            continue
        state, meta, step = found
        tokens = np.asarray(state["tokens"])
        if tokens.shape[-1] != n_s:
            raise MesaError(f"tuned {stage} tokens in {stage_dir(run_dir, stage)} have size {tokens.shape[-1]} but "
                            f"this run's observations have n_s={n_s} (token size mismatch)")
        out[f"{stage}_step"] = step
        out[f"{stage}_model_step"] = meta.get("model_step")
        if stage == "eos":
            out["eos"] = tokens
        else:
            out["prefix"], out["prefix_eos"] = tokens, np.asarray(state["eos"])  # the EOS frozen with the prefix
    return out


def _truncate_log(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(k + "\n" for k in keep))


@lru_cache(maxsize=8)
def make_tune_step(spec, layout: icl.PromptLayout, stage: str, lr: float, batch: int, x_dist: str, seed: int,
                   micro_batch: int | None = None):
    """The jitted step(state, params): sample the step's prompts, Adam update of the tuned tokens on the mean label
    loss (accumulated over micro-batches of ``micro_batch`` prompts when set).  Cached on everything that shapes
    it, so an interrupted and a resumed session share one compile."""
    tx = optax.adam(lr)
    n_s = spec.task.obs_dim

    def loss(tokens, eos, params, x, y):
        eos_S, prefix = (tokens, None) if stage == "eos" else (eos, tokens)
        return jnp.mean(icl.label_losses_BN(params, spec, layout, x, y, eos_S, prefix))

    @jax.jit
    def step_fn(state, params):
        x, y = icl.sample_regression(icl.icl_key("tune", seed, state["step"]), n_s, layout.n_examples, batch, x_dist)
        value, grad = accumulated_value_and_grad(lambda tokens, xy: loss(tokens, state.get("eos"), params, *xy),
                                                 state["tokens"], (x, y), micro_batch)
        updates, opt_state = tx.update(grad, state["opt_state"], state["tokens"])
        new = dict(state, tokens=optax.apply_updates(state["tokens"], updates), opt_state=opt_state,
                   step=state["step"] + 1)
        return new, value

    return tx, step_fn


def tune_stage(run_dir: str | Path, stage: str, cfg: TuneConfig, *, progress: bool = True,
               model_step: int | None = None, stop_at_step: int | None = None, heldout: bool = True,
               loaded: tuple | None = None, replica: int | None = None) -> StageResult:
    """Tune the EOS vector or the prefix of a frozen run; resumes from the stage's latest checkpoint.

    For a multi-seed run, ``loaded`` = (spec, params of one replica, step) and ``replica`` = its seed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mesacli import plots
    from mesacli.spec import load_spec
    from mesacli.train import SPEC_FILE, load_params

    if stage not in STAGES:
        raise MesaError(f"unknown prompt-tune stage '{stage}' (one of {', '.join(STAGES)})")
    cfg.validate()
    run_dir = Path(run_dir)
    if not (run_dir / SPEC_FILE).exists():
        raise MesaError(f"{run_dir} is not a mesacli run directory (no {SPEC_FILE})")
    if loaded is None:
        _check_single_model(load_spec(run_dir / SPEC_FILE), run_dir)
    n_s = icl.check_task_hosts_prompt(load_spec(run_dir / SPEC_FILE).task)
    prefix_len = cfg.prefix_len if stage == "prefix" else 0
    layout = icl.make_layout(load_spec(run_dir / SPEC_FILE).task.seq_len, cfg.n_examples, True, prefix_len)
    spec, params, at_step = loaded if loaded is not None else load_params(run_dir, model_step)

    frozen_eos = None
    if stage == "prefix":
        tuned = load_tuned(run_dir, n_s, replica)
        if tuned["eos"] is None:
            raise MesaError(f"no tuned EOS in {run_dir}: run `mesacli prompt-tune {run_dir} --what eos` first")
        frozen_eos = jnp.asarray(tuned["eos"])

    directory = stage_dir(run_dir, stage, replica)
    meta = {"stage": stage, "n_s": n_s, "config": dataclasses.asdict(cfg), "model_step": at_step,
            "layout": {"n_examples": layout.n_examples, "prefix_len": layout.prefix_len, "length": layout.length}}
    key = icl.icl_key("init", cfg.seed, 0 if stage == "eos" else 1)
    init_tokens = jax.random.normal(key, (n_s,) if stage == "eos" else (prefix_len, n_s))
    tx, step_fn = make_tune_step(spec, layout, stage, cfg.lr, cfg.batch, cfg.x_dist, cfg.seed, cfg.micro_batch)
    state = {"tokens": init_tokens, "opt_state": tx.init(init_tokens), "step": jnp.array(0, jnp.int32)}
    if stage == "prefix":
        state["eos"] = frozen_eos

    directory.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(directory / "checkpoints", keep=2)
    resumed_from = ckpts.latest_step()
    if resumed_from is not None:
        stored = ckpts.restore_meta(resumed_from)
        old = TuneConfig(**stored["config"]).identity(stage)
        if old != cfg.identity(stage) or stored.get("model_step") != at_step or stored.get("n_s") != n_s:
            ckpts.close()
            changed = [(k, old.get(k), v) for k, v in cfg.identity(stage).items() if old.get(k) != v]
            if stored.get("model_step") != at_step:
                changed.append(("model checkpoint step", stored.get("model_step"), at_step))
            diff = ", ".join(f"{k}: {a} -> {b}" for k, a, b in changed) or f"n_s: {stored.get('n_s')} -> {n_s}"
            raise MesaError(f"{directory} was tuned with other settings ({diff}); "
                            f"use the same options or delete {directory} to start over")
        state, _ = ckpts.restore(state, resumed_from)
        if stage == "prefix" and not np.array_equal(np.asarray(state["eos"]), np.asarray(frozen_eos)):
            ckpts.close()  # the EOS was re-tuned since: resuming would go on with the old EOS frozen
            raise MesaError(f"{directory} was tuned with an EOS that {stage_dir(run_dir, 'eos', replica)} no longer "
                            f"holds (the EOS was tuned further); delete {directory} to tune the prefix with the "
                            f"current EOS")
    # placed like the (restored, mesh-replicated) params, so the step's outputs have its inputs' types and the
    # second call does not retrace and recompile the whole frozen model
    state = jax.device_put(state, jax.tree_util.tree_leaves(params)[0].sharding)
    start = int(state["step"])
    _truncate_log(directory / LOSS_FILE, start)
    end = cfg.steps if stop_at_step is None else min(stop_at_step, cfg.steps)

    eval_loss = None
    if heldout:  # held-out prompts: the eval stream of another seed, never seen in tuning
        x_h, y_h = icl.sample_regression(icl.icl_key("eval", cfg.seed + 7919, 0), n_s, layout.n_examples, cfg.batch,
                                         cfg.x_dist)

        def eval_loss(tokens, eos):
            eos_S, prefix = (tokens, None) if stage == "eos" else (eos, tokens)
            return float(icl.model_losses_BN(params, spec, layout, x_h, y_h, eos_S, prefix).mean())
    before = eval_loss(init_tokens, state.get("eos")) if eval_loss else None

    t0, logged, pending = time.time(), [], []

    def flush(step: int) -> float | None:
        """Sync the pending losses, check them, append the logged ones to loss.jsonl; the last loss."""
        nonlocal pending
        values = [(s, float(v)) for s, v in jax.device_get(pending)]
        pending = []
        if not all(np.isfinite(v) for _, v in values):
            raise MesaError(f"prompt-tune {stage}: non-finite label loss by step {step}; try a smaller --lr")
        lines = [(s, v) for s, v in values if s % cfg.log_every == 0 or s == step]
        with (directory / LOSS_FILE).open("a") as f:
            for s, v in lines:
                f.write(json.dumps({"step": s, "loss": v}) + "\n")
        logged.extend(lines)
        return values[-1][1] if values else None

    def save(step: int) -> None:
        if ckpts.latest_step() != step:
            ckpts.save(step, state, dict(meta, step=step))

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("label loss {task.fields[loss]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task_id = bar.add_task(f"prompt-tune {stage}", total=cfg.steps, completed=start, loss="-")
        step = start
        try:
            with runtime.stop_on_sigterm():  # SIGTERM: stop after the step under way, as on Ctrl-C
                while step < end:
                    state, value = step_fn(state, params)
                    pending.append((step + 1, value))
                    step += 1
                    do_ckpt = step % cfg.checkpoint_every == 0 or step == end
                    if step % cfg.log_every == 0 or do_ckpt:
                        bar.update(task_id, completed=step, loss=f"{flush(step):.4f}")
                    if do_ckpt:
                        save(step)
                    if runtime.stop_requested() and step < end:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:  # keep what was done: the losses so far and a checkpoint at this step
            if pending:
                flush(step)
            save(step)
            raise
        finally:
            ckpts.close()
    after = eval_loss(state["tokens"], state.get("eos")) if eval_loss else None
    rows = [json.loads(line) for line in (directory / LOSS_FILE).read_text().splitlines() if line.strip()] \
        if (directory / LOSS_FILE).exists() else []
    plot_path = directory / "loss.png"
    if rows:
        plots.loss_curve_plot([r["step"] for r in rows], [r["loss"] for r in rows], plot_path,
                              title=f"{spec.name}: prompt-tune {stage} (train label loss)")
    return StageResult(stage, int(state["step"]), np.asarray(state["tokens"]), logged, resumed_from,
                       time.time() - t0, before, after, directory / LOSS_FILE, plot_path, replica)


def _check_single_model(spec, run_dir: Path) -> None:
    if spec.train.seeds > 1:
        raise MesaError(f"{run_dir} holds {spec.train.seeds} replicas (train.seeds): tune them with prompt_tune(), "
                        f"which tunes every replica, or pass loaded=(spec, replica params, step) and replica=seed")


def prompt_tune(run_dir: str | Path, what: str, cfg: TuneConfig, *, progress: bool = True,
                model_step: int | None = None, stop_at_step: int | None = None) -> list[StageResult]:
    """``what`` = eos, prefix (needs a tuned EOS) or both (EOS, then the prefix with that EOS frozen)."""
    from mesacli.spec import load_spec
    from mesacli.train import SPEC_FILE, load_params, replicas

    if what not in ("eos", "prefix", "both"):
        raise MesaError(f"--what: '{what}' is not one of eos, prefix, both")
    cfg.validate()
    stages = ["eos", "prefix"] if what == "both" else [what]
    run_dir = Path(run_dir)
    if not (run_dir / SPEC_FILE).exists():
        raise MesaError(f"{run_dir} is not a mesacli run directory (no {SPEC_FILE})")
    task = load_spec(run_dir / SPEC_FILE).task
    icl.check_task_hosts_prompt(task)
    for stage in stages:  # a context too short for the prompt fails before any JAX work
        icl.make_layout(task.seq_len, cfg.n_examples, True, cfg.prefix_len if stage == "prefix" else 0)
    spec, params, at_step = load_params(run_dir, model_step)
    members = replicas(spec, params)  # a multi-seed run: every replica gets its own tokens, prompt_tune/seed<k>/
    results = []
    for replica_seed, replica_params in members:
        for stage in stages:
            results.append(tune_stage(run_dir, stage, cfg, progress=progress, model_step=model_step,
                                      stop_at_step=stop_at_step, loaded=(spec, replica_params, at_step),
                                      replica=replica_seed if len(members) > 1 else None))
            if results[-1].step < cfg.steps:
                return results  # stopped before the stage finished
    return results
