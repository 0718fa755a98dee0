"""prompt-tune: prompt tuning of a frozen next-token model for in-context regression (paper-spec section 5, F.1.4).

Stage "eos": learn one EOS vector in R^{n_s} (init N(0, I)) for prompts [x_1, y_1, EOS, x_2, ...].
Stage "prefix": with that EOS frozen, learn P prefix vectors (init N(0, I)) prepended to the EOS prompt.
Both minimise the label loss only, mean over prompts and examples of 1/2 ||y_i - f(prompt up to x_i)||^2, with
Adam (paper/code: lr 1e-3, 5,000 steps; batch 64 [C] / 256 [P] for EOS, 128 [C] / 256 [P] for the prefix).
The model's parameters never change.

The steps run in the guarded loop of ``mesacli.loop`` (loss.jsonl, checkpoints, SIGTERM/Ctrl-C, divergence);
where a stage's checkpoints and log live is ``mesacli.icl.tokens``.  The batch of step s comes from
fold_in(fold_in(PRNGKey(seed), "tune"), s), so a resumed stage follows the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mesacli import loop, rundir
from mesacli.checkpoint import Checkpoints
from mesacli.errors import MesaError, warn_stderr
from mesacli.icl.prompts import (
    X_DISTS,
    PromptLayout,
    check_task_hosts_prompt,
    icl_key,
    label_losses_BN,
    make_layout,
    model_losses_BN,
    sample_regression,
)
from mesacli.icl.tokens import LOSS_FILE, STAGES, checkpoint_meta, checkpoints_dir, load_tuned, stage_dir, tuning_state
from mesacli.memory import check_fits
from mesacli.spec import load_run_spec
from mesacli.state import load_params


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
        if not 0 < self.lr < math.inf:
            raise MesaError(f"--lr must be a positive number, got {self.lr}")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.batch % self.micro_batch):
            raise MesaError(f"--micro-batch ({self.micro_batch}) must be a positive divisor of --batch ({self.batch})")
        if self.x_dist not in X_DISTS:
            raise MesaError(f"--x-dist: '{self.x_dist}' is not one of {', '.join(X_DISTS)}")
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
    interrupted: bool = False  # stopped by SIGTERM or Ctrl-C (the step under way saved); run again to resume


@lru_cache(maxsize=8)
def make_tune_step(spec, layout: PromptLayout, stage: str, lr: float, batch: int, x_dist: str, seed: int,
                   micro_batch: int | None = None):
    """The jitted step(state, params): sample the step's prompts, Adam update of the tuned tokens on the mean label
    loss (accumulated over micro-batches of ``micro_batch`` prompts when set).  Cached on everything that shapes
    it, so an interrupted and a resumed session share one compile."""
    tx = optax.adam(lr)
    n_s = spec.task.obs_dim

    def loss(tokens, eos, params, x, y):
        eos_S, prefix = (tokens, None) if stage == "eos" else (eos, tokens)
        return jnp.mean(label_losses_BN(params, spec, layout, x, y, eos_S, prefix))

    @jax.jit
    def step_fn(state, params):
        x, y = sample_regression(icl_key("tune", seed, state["step"]), n_s, layout.n_examples, batch, x_dist)
        value, grad = loop.accumulated_value_and_grad(lambda tokens, xy: loss(tokens, state.get("eos"), params, *xy),
                                                      state["tokens"], (x, y), micro_batch)
        updates, opt_state = tx.update(grad, state["opt_state"], state["tokens"])
        new = dict(state, tokens=optax.apply_updates(state["tokens"], updates), opt_state=opt_state,
                   step=state["step"] + 1)
        return new, value

    return tx, step_fn


def _resume(ckpts: Checkpoints, state: dict, stage: str, cfg: TuneConfig, *, n_s: int, at_step: int,
            frozen_eos, directory: Path, run_dir: Path, replica: int | None) -> dict:
    """The stage's newest readable checkpoint (newer unreadable ones set aside with a warning), if it was tuned
    with the same settings, on the same model checkpoint and (prefix) with the current EOS; else MesaError
    (``ckpts`` closed)."""
    try:
        step, restored, stored = ckpts.resume_newest_readable(lambda meta: state, warn_stderr,
                                                              hint=f"delete {directory} to tune afresh")
    except MesaError:
        ckpts.close()
        raise
    old = TuneConfig(**stored["config"]).identity(stage)
    if old != cfg.identity(stage) or stored.get("model_step") != at_step or stored.get("n_s") != n_s:
        ckpts.close()
        changed = [(k, old.get(k), v) for k, v in cfg.identity(stage).items() if old.get(k) != v]
        if stored.get("model_step") != at_step:
            changed.append(("model checkpoint step", stored.get("model_step"), at_step))
        diff = ", ".join(f"{k}: {a} -> {b}" for k, a, b in changed) or f"n_s: {stored.get('n_s')} -> {n_s}"
        raise MesaError(f"{directory} was tuned with other settings ({diff}); "
                        f"use the same options or delete {directory} to start over")
    state = restored
    if stage == "prefix" and not np.array_equal(np.asarray(state["eos"]), np.asarray(frozen_eos)):
        ckpts.close()  # the EOS was re-tuned since: resuming would go on with the old EOS frozen
        raise MesaError(f"{directory} was tuned with an EOS that {stage_dir(run_dir, 'eos', replica)} no longer "
                        f"holds (the EOS was tuned further); delete {directory} to tune the prefix with the "
                        f"current EOS")
    return state


def tune_stage(run_dir: str | Path, stage: str, cfg: TuneConfig, *, progress: bool = True,
               model_step: int | None = None, stop_at_step: int | None = None, heldout: bool = True,
               loaded: tuple | None = None, replica: int | None = None) -> StageResult:
    """Tune the EOS vector or the prefix of a frozen run; resumes from the stage's latest checkpoint.

    For a multi-seed run, ``loaded`` = (spec, params of one replica, step) and ``replica`` = its seed.
    SIGTERM or Ctrl-C saves the step under way and returns with ``interrupted`` set; a non-finite loss raises
    ``loop.TrainingDiverged``, keeping the stage's last checkpoint."""
    from mesacli import plots

    if stage not in STAGES:
        raise MesaError(f"unknown prompt-tune stage '{stage}' (one of {', '.join(STAGES)})")
    cfg.validate()
    run_dir = Path(run_dir)
    run_spec = rundir.read_spec(run_dir, load_run_spec)
    rundir.check_writable(run_dir / rundir.TUNE_DIR)
    if loaded is None:
        _check_single_model(run_spec, run_dir)
    n_s = check_task_hosts_prompt(run_spec.task)
    prefix_len = cfg.prefix_len if stage == "prefix" else 0
    layout = make_layout(run_spec.task.seq_len, cfg.n_examples, True, prefix_len)
    spec, params, at_step = loaded if loaded is not None else load_params(run_dir, model_step)

    frozen_eos = None
    if stage == "prefix":
        tuned = load_tuned(run_dir, n_s, replica)
        if tuned["eos"] is None:
            raise MesaError(f"no tuned EOS in {run_dir}: run `mesacli prompt-tune {run_dir} --what eos` first")
        frozen_eos = jnp.asarray(tuned["eos"])

    directory = stage_dir(run_dir, stage, replica)
    meta = checkpoint_meta(stage, n_s, dataclasses.asdict(cfg), at_step, layout)
    key = icl_key("init", cfg.seed, 0 if stage == "eos" else 1)
    init_tokens = jax.random.normal(key, (n_s,) if stage == "eos" else (prefix_len, n_s))
    tx, step_fn = make_tune_step(spec, layout, stage, cfg.lr, cfg.batch, cfg.x_dist, cfg.seed, cfg.micro_batch)
    state = tuning_state(init_tokens, tx.init(init_tokens), frozen_eos)

    directory.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(checkpoints_dir(run_dir, stage, replica), keep=2)
    resumed_from = ckpts.latest_step()
    if resumed_from is not None:
        state = _resume(ckpts, state, stage, cfg, n_s=n_s, at_step=at_step, frozen_eos=frozen_eos,
                        directory=directory, run_dir=run_dir, replica=replica)
        resumed_from = int(state["step"])
    # placed like the (restored, mesh-replicated) params, so the step's outputs have its inputs' types and the
    # second call does not retrace and recompile the whole frozen model
    state = jax.device_put(state, jax.tree_util.tree_leaves(params)[0].sharding)
    try:  # the step compiled once, here (the loop's first step reuses it), and refused if it cannot fit
        if hasattr(step_fn, "lower"):  # a jitted step (not a wrapper around one)
            check_fits(step_fn.lower(state, params).compile(), f"a prompt-tuning step ({stage})",
                       hint="use a smaller --batch or set --micro-batch")
    except BaseException:
        ckpts.close()
        raise
    start = int(state["step"])
    end = cfg.steps if stop_at_step is None else min(stop_at_step, cfg.steps)

    eval_loss = None
    if heldout:  # held-out prompts: the eval stream of another seed, never seen in tuning
        x_h, y_h = sample_regression(icl_key("eval", cfg.seed + 7919, 0), n_s, layout.n_examples, cfg.batch,
                                     cfg.x_dist)

        def eval_loss(tokens, eos):
            eos_S, prefix = (tokens, None) if stage == "eos" else (eos, tokens)
            return float(model_losses_BN(params, spec, layout, x_h, y_h, eos_S, prefix).mean())
    try:
        before = eval_loss(init_tokens, state.get("eos")) if eval_loss else None
    except BaseException:
        ckpts.close()
        raise

    def tune_step(state, step: int):
        state, loss = step_fn(state, params)
        return state, {"loss": loss}

    t0 = time.time()
    done = loop.run(state, ckpts=ckpts, run_dir=directory, log_path=directory / LOSS_FILE, end=end,
                    total=cfg.steps, step_fn=tune_step, every=loop.Every(cfg.log_every, None, cfg.checkpoint_every),
                    meta=meta, seeds=[cfg.seed], description=f"prompt-tune {stage}", progress=progress,
                    loss_label="label loss", hint="try a smaller --lr",
                    usable=None if eval_loss is None else
                    lambda state: bool(np.isfinite(eval_loss(state["tokens"], state.get("eos")))))
    state = done.state
    after = eval_loss(state["tokens"], state.get("eos")) if eval_loss else None
    rows = [json.loads(line) for line in (directory / LOSS_FILE).read_text().splitlines() if line.strip()] \
        if (directory / LOSS_FILE).exists() else []
    plot_path = directory / "loss.png"
    if rows:
        plots.loss_curve_plot([r["step"] for r in rows], [r["loss"] for r in rows], plot_path,
                              title=f"{spec.name}: prompt-tune {stage} (train label loss)")
    logged = [(r["step"], r["loss"]) for r in rows if r["step"] > start]  # the log was cut back to ``start``
    return StageResult(stage, int(state["step"]), np.asarray(state["tokens"]), logged, resumed_from,
                       time.time() - t0, before, after, directory / LOSS_FILE, plot_path, replica, done.interrupted)


def _check_single_model(spec, run_dir: Path) -> None:
    if spec.train.seeds > 1:
        raise MesaError(f"{run_dir} holds {spec.train.seeds} replicas (train.seeds): tune them with prompt_tune(), "
                        f"which tunes every replica, or pass loaded=(spec, replica params, step) and replica=seed")


def prompt_tune(run_dir: str | Path, what: str, cfg: TuneConfig, *, progress: bool = True,
                model_step: int | None = None, stop_at_step: int | None = None) -> list[StageResult]:
    """``what`` = eos, prefix (needs a tuned EOS) or both (EOS, then the prefix with that EOS frozen).

    Stops after a stage that ended early (``stop_at_step``, SIGTERM or Ctrl-C) and returns the results so far."""
    if what not in ("eos", "prefix", "both"):
        raise MesaError(f"--what: '{what}' is not one of eos, prefix, both")
    cfg.validate()
    stages = ["eos", "prefix"] if what == "both" else [what]
    run_dir = Path(run_dir)
    task = rundir.read_spec(run_dir, load_run_spec).task
    check_task_hosts_prompt(task)
    for stage in stages:  # a context too short for the prompt fails before any JAX work
        make_layout(task.seq_len, cfg.n_examples, True, cfg.prefix_len if stage == "prefix" else 0)
    spec, params, at_step = load_params(run_dir, model_step)
    members = rundir.replicas(spec, params)  # a multi-seed run: every replica gets its own tokens, prompt_tune/seed<k>/
    results = []
    for replica_seed, replica_params in members:
        for stage in stages:
            results.append(tune_stage(run_dir, stage, cfg, progress=progress, model_step=model_step,
                                      stop_at_step=stop_at_step, loaded=(spec, replica_params, at_step),
                                      replica=replica_seed if len(members) > 1 else None))
            if results[-1].interrupted or results[-1].step < cfg.steps:
                return results  # stopped before the stage finished
    return results
