"""Online training: one jitted ``train_step`` on a ("data",) mesh, Orbax checkpoints, resume.

Randomness: params from ``fold_in(PRNGKey(seed), 0)``; the batch of step s from
``fold_in(fold_in(PRNGKey(seed), 1), s)``, generated on device inside the step.  A run resumed
from a checkpoint therefore follows exactly the curve of an uninterrupted run.

Seeds in one program (``train.seeds = S > 1``): parameters and optimiser state carry a leading replica
axis, the step is ``vmap``-ed over it, and replica i uses seed ``train.seed + i`` for its init and its
data, so it equals the plain run with that seed.  The mesh is then ("replica", "data"): the replica
axis is sharded over gcd(S, devices) devices, the batch of every replica over the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesacli import model, runtime, tasks
from mesacli.checkpoint import Checkpoints, dump_json
from mesacli.errors import MesaError
from mesacli.spec import Spec, TrainSpec, load_spec, spec_diff, spec_to_dict, spec_to_yaml

SPEC_FILE = "spec.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval_curve.json"
CHECKPOINT_DIR = "checkpoints"


class TrainingDiverged(MesaError):
    """The loss or the parameters became non-finite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- optimiser, mesh


def make_schedule(train: TrainSpec) -> optax.Schedule:
    if train.schedule == "constant":
        return optax.constant_schedule(train.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps,
        decay_steps=train.decay_steps, end_value=train.end_lr,
    )


def make_optimizer(train: TrainSpec) -> optax.GradientTransformation:
    """clip (element-wise as the authors' code, or global norm) then AdamW."""
    parts = []
    if train.grad_clip is not None:
        clip = optax.clip(train.grad_clip) if train.grad_clip_kind == "elementwise" else optax.clip_by_global_norm(
            train.grad_clip
        )
        parts.append(clip)
    parts.append(optax.adamw(make_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                             weight_decay=train.weight_decay))
    return optax.chain(*parts)


def make_mesh(devices: list | None = None, replicas: int = 1) -> Mesh:
    """One ("data",) axis over all devices: params replicated, batch sharded.  With ``replicas`` > 1
    (seeds in one program): ("replica", "data") with gcd(replicas, devices) devices on the replica axis."""
    devices = jax.devices() if devices is None else devices
    if replicas == 1:
        return Mesh(np.array(devices), ("data",))
    r = math.gcd(replicas, len(devices))
    return Mesh(np.array(devices).reshape(r, len(devices) // r), ("replica", "data"))


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    n = mesh.shape["data"]
    if batch_size % n:
        raise MesaError(f"{what} ({batch_size}) must be a multiple of the number of devices ({n})")


def replica_seeds(train: TrainSpec) -> list[int]:
    """Replica i of a ``train.seeds = S`` run is the plain run with seed ``train.seed + i``."""
    return [train.seed + i for i in range(train.seeds)]


def replicas(spec: Spec, params) -> list[tuple[int, Any]]:
    """[(seed, params)] for every replica of a run's (possibly stacked) parameters."""
    if spec.train.seeds == 1:
        return [(spec.train.seed, params)]
    return [(seed, jax.tree_util.tree_map(lambda x, i=i: x[i], params))
            for i, seed in enumerate(replica_seeds(spec.train))]


def _state_sharding(spec: Spec, mesh: Mesh) -> dict:
    replicated = NamedSharding(mesh, PartitionSpec())
    per_replica = replicated if spec.train.seeds == 1 else NamedSharding(mesh, PartitionSpec("replica"))
    return {"params": per_replica, "opt_state": per_replica, "step": replicated}


# ----------------------------------------------------------------------------- state and step


def init_state(spec: Spec, mesh: Mesh) -> dict:
    """Params from fold_in(PRNGKey(seed), 0) and a fresh optimiser state (stacked over replicas)."""
    tx = make_optimizer(spec.train)

    def init_replica(seed):
        params = model.init(jax.random.fold_in(jax.random.PRNGKey(seed), 0), spec)
        return params, tx.init(params)

    def init_all():
        if spec.train.seeds == 1:
            params, opt_state = init_replica(spec.train.seed)
        else:
            params, opt_state = jax.vmap(init_replica)(jnp.array(replica_seeds(spec.train)))
        return {"params": params, "opt_state": opt_state, "step": jnp.array(0, jnp.int32)}

    # created by a jitted function with the target sharding: works on a mesh spanning several processes
    return jax.jit(init_all, out_shardings=_state_sharding(spec, mesh))()


def loss_fn(params, batch: tasks.Batch, spec: Spec):
    pred, _ = model.apply(params, batch.tokens_BTI, spec)
    return tasks.sequence_loss(pred, batch.targets_BTS)


def accumulated_value_and_grad(loss: Callable, params, batch: tasks.Batch, micro_batch: int | None,
                               sharding: NamedSharding | None = None):
    """(L, dL/dparams) of the batch-mean loss L = (1/M) sum_m L_m over M equal micro-batches of
    ``micro_batch`` sequences (micro-batch m holds rows m, m + M, m + 2M, ...), accumulated in a
    ``lax.scan``: the full batch's value and gradient up to float rounding, with 1/M of the working set.
    ``micro_batch=None`` (or the whole batch) takes one pass."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if micro_batch is None or micro_batch >= size:
        return jax.value_and_grad(loss)(params, batch)
    count = size // micro_batch
    # [B, ...] -> [M, B/M, ...] with row i*M + m in micro-batch m: each micro-batch keeps the batch's
    # split over the "data" devices (every device's rows stay on it)
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(micro_batch, count, *x.shape[1:]), 0, 1), batch)

    def accumulate(carry, micro_batch_data):
        if sharding is not None:
            micro_batch_data = jax.lax.with_sharding_constraint(micro_batch_data, sharding)
        value, grads = jax.value_and_grad(loss)(params, micro_batch_data)
        return jax.tree.map(jnp.add, carry, (value, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (value, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    return value / count, jax.tree.map(lambda g: g / count, grads)


def make_train_step(spec: Spec, mesh: Mesh) -> Callable[[dict], tuple[dict, dict]]:
    """The one jitted step: sample the step's batch on device (sharded over "data"), AdamW update
    (gradients accumulated over micro-batches of ``train.micro_batch`` sequences when it is set).

    With ``train.seeds`` > 1 the replica step is ``vmap``-ed over the stacked params, optimiser states
    and seeds (metrics then have a leading replica axis)."""
    tx = make_optimizer(spec.train)
    schedule = make_schedule(spec.train)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    def replica_step(params, opt_state, step, seed):
        batch = tasks.sample_batch(tasks.data_key(seed, step), spec, spec.train.batch_size)
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        loss, grads = accumulated_value_and_grad(lambda p, b: loss_fn(p, b, spec), params, batch,
                                                 spec.train.micro_batch, batch_sharding)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": finite}

    stacked = spec.train.seeds > 1
    if stacked:
        replica_step = jax.vmap(replica_step, in_axes=(0, 0, None, 0), spmd_axis_name="replica")
    seeds = jnp.array(replica_seeds(spec.train)) if stacked else spec.train.seed
    state_sharding = _state_sharding(spec, mesh)
    per_replica = state_sharding["params"]
    metric_sharding = {"loss": per_replica, "grad_norm": per_replica, "params_finite": per_replica,
                       "lr": NamedSharding(mesh, PartitionSpec())}

    @partial(jax.jit, in_shardings=(state_sharding,), out_shardings=(state_sharding, metric_sharding))
    def train_step(state):
        params, opt_state, metrics = replica_step(state["params"], state["opt_state"], state["step"], seeds)
        metrics["lr"] = schedule(state["step"])
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def eval_batches(spec: Spec, batch_size: int | None = None, sharding: NamedSharding | None = None
                 ) -> list[tasks.Batch]:
    """The fixed test batches: keys fold_in(PRNGKey(eval_seed), i), i < eval_batches (placed with
    ``sharding`` if given, e.g. over a mesh spanning several processes)."""
    size = batch_size or spec.train.batch_size
    sample = jax.jit(lambda key: tasks.sample_batch(key, spec, size), out_shardings=sharding)
    return [sample(tasks.eval_batch_key(spec, i)) for i in range(spec.train.eval_batches)]


def make_evaluator(spec: Spec, mesh: Mesh, stacked: bool = False) -> Callable[[Any], np.ndarray]:
    """params -> per-position test loss [T], the mean over the fixed test batches; with ``stacked``,
    params with a leading replica axis -> [S, T]."""
    batches = eval_batches(spec, sharding=NamedSharding(mesh, PartitionSpec("data")))

    def curve(params, batch):
        pred, _ = model.apply(params, batch.tokens_BTI, spec)
        return tasks.per_position_loss(pred, batch.targets_BTS)

    curve = jax.jit(jax.vmap(curve, in_axes=(0, None)) if stacked else curve,
                    out_shardings=NamedSharding(mesh, PartitionSpec()))

    def evaluate(params) -> np.ndarray:
        return np.mean([np.asarray(curve(params, b)) for b in batches], axis=0)

    return evaluate


# ----------------------------------------------------------------------------- run directory


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    spec: Spec
    step: int
    eval_curve: np.ndarray  # per-position test loss [T] of the final parameters (mean over replicas)
    params: Any  # with a leading replica axis when spec.train.seeds > 1
    seconds: float
    resumed_from: int | None
    interrupted: bool = False
    eval_curves: np.ndarray | None = None  # [S, T], one row per replica (seed + i)

    @property
    def eval_loss(self) -> float:
        return float(np.mean(self.eval_curve))


def prepare_run_dir(spec: Any, run_dir: Path, load: Callable[[Path], Any] = load_spec) -> None:
    """Create a run directory, or check that an existing one was made with this exact spec (read by ``load``)."""
    spec_path = run_dir / SPEC_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise MesaError(f"run directory {run_dir} exists and is not a directory")
    if spec_path.exists():
        try:
            stored = load(spec_path)
        except MesaError as err:
            raise MesaError(f"run directory {run_dir} has an unreadable spec: {err}") from None
        if stored != spec:
            diff = "; ".join(spec_diff(stored, spec)[:4])
            raise MesaError(
                f"run directory {run_dir} was made with a different spec ({diff}); "
                f"use another --run-dir or the same spec"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise MesaError(f"{run_dir} is not empty and is not a mesacli run directory (no {SPEC_FILE})")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not spec_path.exists():
        tmp = spec_path.with_suffix(".tmp")
        tmp.write_text(f"# resolved spec written by mesacli\n{spec_to_yaml(spec)}")
        tmp.replace(spec_path)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so the log has no duplicates."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(k + "\n" for k in keep))


def restore_state(spec: Any, ckpts: Checkpoints, template: dict, step: int | None = None) -> dict:
    """Restore a train state, refusing a checkpoint written for a different spec (any spec dataclass)."""
    meta = ckpts.restore_meta(step)
    if meta.get("spec") != spec_to_dict(spec):
        raise MesaError(f"checkpoint in {ckpts.directory} was written for a different spec")
    state, _ = ckpts.restore(template, step)
    return state


def load_params(run_dir: Path, step: int | None = None) -> tuple[Spec, Any, int]:
    """(spec, params, step) of a run directory's latest (or given) checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / SPEC_FILE).exists():
        raise MesaError(f"{run_dir} is not a mesacli run directory (no {SPEC_FILE})")
    spec = load_spec(run_dir / SPEC_FILE)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise MesaError(f"no checkpoint found in {ckpt_dir}")
    ckpts = Checkpoints(ckpt_dir, keep=spec.train.keep_checkpoints, read_only=True)
    try:
        state = restore_state(spec, ckpts, init_state(spec, make_mesh(replicas=spec.train.seeds)), step)
    finally:
        ckpts.close()
    return spec, state["params"], int(state["step"])


# ----------------------------------------------------------------------------- the loop


class _MetricLog:
    """Buffers per-step device metrics; flushing syncs, checks finiteness and appends JSONL lines."""

    def __init__(self, path: Path, log_every: int, seeds: list[int], write: bool = True):
        self.path, self.log_every, self.seeds, self.write = path, log_every, seeds, write
        self.pending: list[tuple[int, dict]] = []
        self.last_loss = float("nan")

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, extra: dict | None = None) -> None:
        pending, self.pending = jax.device_get(self.pending), []
        lines = []
        for step, m in pending:
            loss = np.atleast_1d(np.asarray(m["loss"], np.float64))
            bad = ~(np.isfinite(loss) & np.atleast_1d(np.asarray(m["params_finite"])))
            if bad.any():
                self._write(lines)
                bad_seeds = ", ".join(str(s) for s in np.array(self.seeds)[bad])
                which = "" if len(self.seeds) == 1 else f" (seed {bad_seeds})"
                raise TrainingDiverged(f"non-finite loss or parameters at step {step + 1}{which}")
            self.last_loss = float(loss.mean())
            if (step + 1) % self.log_every == 0 or step == pending[-1][0]:
                line = {"step": step + 1, "loss": self.last_loss, "grad_norm": float(np.mean(m["grad_norm"])),
                        "lr": float(m["lr"])}
                if len(self.seeds) > 1:
                    line.update(loss_std=float(loss.std()), loss_per_seed=[float(x) for x in loss])
                lines.append(line)
        if extra is not None:
            if lines and lines[-1]["step"] == extra["step"]:
                lines[-1].update(extra)
            else:
                lines.append(extra)
        self._write(lines)

    def _write(self, lines: list[dict]) -> None:
        if lines and self.write:
            with self.path.open("a") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")


def run_steps(state, start: int, end: int, total: int, *, step_fn: Callable, log: _MetricLog, save: Callable,
              ckpts: Checkpoints, run_dir: Path, every: tuple[int, int, int], eval_record: Callable,
              on_flush: Callable[[int, float], None]) -> tuple[Any, int, bool]:
    """The guarded loop of `train` and `lm`: steps start..end-1 with ``step_fn(state, step) -> (state, metrics)``.

    every = (log, eval, checkpoint) intervals.  Metrics are flushed every log interval and at evaluations and
    checkpoints (a non-finite loss raises TrainingDiverged there); ``eval_record(state, step)`` is logged every
    eval interval and at step ``total``; ``save(state, step)`` every checkpoint interval and at ``end``.
    Ctrl-C, or SIGTERM (which stops after the step under way), flushes and saves the last finished step and
    returns interrupted = True; divergence closes the checkpoints and names the last good one.
    Returns (state, step, interrupted)."""
    log_every, eval_every, checkpoint_every = every
    step, interrupted = start, False
    try:
        with runtime.stop_on_sigterm():
            while step < end:
                state, metrics = step_fn(state, step)
                log.add(step, metrics)
                step += 1
                do_eval = step % eval_every == 0 or step == total
                do_ckpt = step % checkpoint_every == 0 or step == end
                if step % log_every == 0 or do_eval or do_ckpt:
                    log.flush(eval_record(state, step) if do_eval else None)
                    on_flush(step, log.last_loss)
                if do_ckpt:
                    save(state, step)
                if runtime.stop_requested() and step < end:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        try:
            log.flush()
            save(state, step)
        except TrainingDiverged:
            pass
    except TrainingDiverged as err:
        last = ckpts.latest_step()
        ckpts.close()
        kept = f"last good checkpoint: step {last}" if last is not None else "no checkpoint was saved"
        raise TrainingDiverged(f"{err}; training stopped ({kept} in {run_dir / CHECKPOINT_DIR})") from None
    return state, step, interrupted


def train(
    spec: Spec,
    run_dir: str | Path,
    *,
    stop_at_step: int | None = None,
    progress: bool = True,
    devices: list | None = None,
    on_log: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``spec`` in ``run_dir``, resuming from its latest checkpoint if there is one.

    ``stop_at_step`` ends the session early (as an interruption would) after saving a checkpoint.
    Raises TrainingDiverged on a non-finite loss, keeping the last good checkpoint.
    """
    from mesacli import plots  # matplotlib only when a run writes figures
    from mesacli.distributed import barrier, is_primary

    run_dir = Path(run_dir)
    mesh = make_mesh(devices, spec.train.seeds)
    check_batch_divides(spec.train.batch_size, mesh)
    if spec.train.micro_batch is not None:
        check_batch_divides(spec.train.micro_batch, mesh, "train.micro_batch")
    primary = is_primary()  # several processes: process 0 writes the files, all save checkpoints together
    if primary:
        prepare_run_dir(spec, run_dir)
    barrier("prepare_run_dir")
    if not primary:
        prepare_run_dir(spec, run_dir)  # checks the spec process 0 wrote
    ckpts = Checkpoints(run_dir / CHECKPOINT_DIR, keep=spec.train.keep_checkpoints)
    state = init_state(spec, mesh)
    resumed_from = ckpts.latest_step()
    if resumed_from is not None:
        state = restore_state(spec, ckpts, state)
    start = int(state["step"])
    if primary:
        _truncate_metrics(run_dir / METRICS_FILE, start)
    meta = {"spec": spec_to_dict(spec), "mesacli": "0.1.0"}
    train_step = make_train_step(spec, mesh)
    stacked, seeds = spec.train.seeds > 1, replica_seeds(spec.train)
    evaluate_replicas = make_evaluator(spec, mesh, stacked=stacked)

    def evaluate(params) -> np.ndarray:  # [S, T]
        return np.atleast_2d(evaluate_replicas(params))

    log = _MetricLog(run_dir / METRICS_FILE, spec.train.log_every, seeds, write=primary)
    end = spec.train.steps if stop_at_step is None else min(stop_at_step, spec.train.steps)
    t0 = time.time()

    def save(state, step: int) -> None:
        if ckpts.latest_step() != step:
            ckpts.save(step, state, dict(meta, step=step, loss=log.last_loss))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not (progress and primary), transient=False) as bar:
        task_id = bar.add_task(spec.name, total=spec.train.steps, completed=start, loss="-")

        def eval_record(state, step: int) -> dict:
            per_seed = evaluate(state["params"]).mean(axis=1)
            record = {"step": step, "eval_loss": float(per_seed.mean())}
            if stacked:
                record.update(eval_loss_std=float(per_seed.std()), eval_loss_per_seed=[float(x) for x in per_seed])
            return record

        def on_flush(step: int, loss: float) -> None:
            bar.update(task_id, completed=step, loss=f"{loss:.4f}")
            if on_log is not None:
                on_log(step, loss)

        state, step, interrupted = run_steps(
            state, start, end, spec.train.steps, step_fn=lambda state, step: train_step(state), log=log, save=save,
            ckpts=ckpts, run_dir=run_dir, every=(spec.train.log_every, spec.train.eval_every,
                                                 spec.train.checkpoint_every),
            eval_record=eval_record, on_flush=on_flush)
    ckpts.close()
    curves = evaluate(state["params"])
    curve = curves.mean(axis=0)
    final_step = int(state["step"])
    if final_step == spec.train.steps and primary:
        record = {"step": final_step, "seq_avg_loss": float(np.mean(curve)),
                  "per_position_loss": [float(x) for x in curve]}
        if stacked:
            record.update(seq_avg_loss_std=float(curves.mean(axis=1).std()), seeds=seeds,
                          per_seed={str(s): {"seq_avg_loss": float(c.mean()), "per_position_loss": c.tolist()}
                                    for s, c in zip(seeds, curves, strict=True)})
        dump_json(run_dir / EVAL_FILE, record)
        label = spec.name if not stacked else f"{spec.name} ({len(seeds)} seeds, mean ± std)"
        plots.per_position_plot({label: curve}, run_dir / "loss_per_position.png",
                                title=f"{spec.name}: test loss per position (step {final_step})",
                                bands={label: curves.std(axis=0)} if stacked else None)
        plots.training_plot(run_dir / METRICS_FILE, run_dir / "training_curve.png", title=spec.name)
    return TrainResult(run_dir, spec, final_step, curve, state["params"], time.time() - t0, resumed_from, interrupted,
                       eval_curves=curves)
