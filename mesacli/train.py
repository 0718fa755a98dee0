"""Online training: one jitted ``train_step`` on a ("data",) mesh, Orbax checkpoints, resume.

Randomness: params from ``fold_in(PRNGKey(seed), 0)``; the batch of step s from
``fold_in(fold_in(PRNGKey(seed), 1), s)``, generated on device inside the step.  A run resumed
from a checkpoint therefore follows exactly the curve of an uninterrupted run.

Seeds in one program (``train.seeds = S > 1``): parameters and optimiser state carry a leading replica
axis, the step is ``vmap``-ed over it, and replica i uses seed ``train.seed + i`` for its init and its
data, so it equals the plain run with that seed.  The mesh is then ("replica", "data"): the replica
axis is sharded over gcd(S, devices) devices, the batch of every replica over the rest.  On a CPU whose
replica axis is one device the replicas' gradients are computed in a ``lax.scan`` over groups of
``step_replica_group`` replicas (vmapped within a group) rather than all at once (see ``auto_replica_group``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesacli import loop, model, rundir, tasks
from mesacli.checkpoint import dump_json
from mesacli.errors import warn_stderr
from mesacli.evaluate import make_evaluator
from mesacli.memory import check_fits
from mesacli.sharding import check_batch_divides, make_mesh
from mesacli.spec import Spec, load_spec
from mesacli.spec_loader import spec_to_dict
from mesacli.state import init_state, make_optimizer, make_schedule, state_sharding

# ----------------------------------------------------------------------------- the step


def loss_fn(params, batch: tasks.Batch, spec: Spec):
    pred, _ = model.apply(params, batch.tokens_BTI, spec)
    return tasks.sequence_loss(pred, batch.targets_BTS)


# On a CPU the one-pass step of the T=50 paper models is memory-bound (its [B, H, T, T] attention buffers and
# [B*T, H*D] projections of batch 256 do not stay in cache): micro-batches of 32 sequences (1,600 tokens) made
# every paper spec's step 1.5-1.8x faster (BENCHMARKS.md, issue 20).  Below 8 sequences per micro-batch the
# overhead of the many small matmuls wins.
AUTO_MICRO_BATCH_TOKENS = 1600
AUTO_MICRO_BATCH_MIN = 8


def auto_micro_batch(batch_size: int, seq_len: int, platform: str, data_devices: int = 1) -> int | None:
    """The micro-batch a step uses when ``train.micro_batch`` is unset: on a CPU the largest divisor of the batch
    that is a multiple of the data devices and holds at most max(8, 1600 // T) sequences; None (one pass) for a
    batch no larger than that, when no such divisor exists, and off a CPU (GPU, TPU: one pass keeps the device
    busiest)."""
    target = max(AUTO_MICRO_BATCH_MIN, AUTO_MICRO_BATCH_TOKENS // seq_len)
    if platform != "cpu" or batch_size <= target:
        return None
    fits = [m for m in range(data_devices, target + 1, data_devices) if batch_size % m == 0]
    return max(fits) if fits else None


def step_micro_batch(spec: Spec, mesh: Mesh) -> int | None:
    """The micro-batch of ``spec``'s training step on ``mesh``: ``train.micro_batch`` when set (a value >= the
    batch size means one pass), else ``auto_micro_batch``.  An execution setting, not part of the experiment:
    micro-batches change the update only by float rounding (``loop.accumulated_value_and_grad``), so it is not
    written into the spec and leaves run directories, checkpoints and the ledger's ``outdated`` check alone."""
    if spec.train.micro_batch is not None:
        return spec.train.micro_batch
    platform = mesh.devices.flat[0].platform
    return auto_micro_batch(spec.train.batch_size, spec.task.seq_len, platform, mesh.shape["data"])


def auto_replica_group(seeds: int, batch_size: int, micro_batch: int | None, seq_len: int, platform: str,
                       replica_devices: int = 1) -> int:
    """How many of a ``train.seeds = S`` step's replicas compute their gradients together (vmapped), the groups
    taking turns in a ``lax.scan``: on a CPU whose replica axis is one device, the largest divisor g of S whose g
    replicas' passes hold at most max(8, 1600 // T) sequences together (g x the replica's micro-batch, or its
    batch when it takes one pass), at least 1; all S elsewhere (an accelerator, or replicas spread over devices).

    Why: on a CPU the step is fastest when one pass over the model holds about 1,600 tokens (``auto_micro_batch``);
    vmapping all S replicas multiplies that working set by S.  With 8 replicas of the T=50 paper specs (micro-batch
    32) vmapped, a replica-step cost 1.2-1.3x the CPU time of the plain step; a scan over single replicas costs
    what the plain step does (BENCHMARKS.md, issue 20).  Each replica's update is unchanged (same batch, same
    micro-batches), so replica i still equals the plain run with seed + i."""
    if seeds <= 1 or platform != "cpu" or replica_devices > 1:
        return seeds
    budget = max(AUTO_MICRO_BATCH_MIN, AUTO_MICRO_BATCH_TOKENS // seq_len)
    per_replica = batch_size if micro_batch is None else min(micro_batch, batch_size)
    return max((g for g in range(1, seeds + 1) if seeds % g == 0 and g * per_replica <= budget), default=1)


def step_replica_group(spec: Spec, mesh: Mesh) -> int:
    """The replica group of ``spec``'s training step on ``mesh`` (``auto_replica_group``; 1 without seeds).  Like the
    micro-batch, an execution setting: not written into the spec."""
    platform = mesh.devices.flat[0].platform
    replica_devices = mesh.shape.get("replica", 1)
    return auto_replica_group(spec.train.seeds, spec.train.batch_size, step_micro_batch(spec, mesh),
                              spec.task.seq_len, platform, replica_devices)


def make_train_step(spec: Spec, mesh: Mesh, replica_group: int | None = None) -> Callable[[dict], tuple[dict, dict]]:
    """The one jitted step: sample the step's batch on device (sharded over "data"), AdamW update
    (gradients accumulated over micro-batches of ``step_micro_batch(spec, mesh)`` sequences: ``train.micro_batch``
    when set, else chosen for the platform by ``auto_micro_batch``).

    With ``train.seeds`` > 1 the replica step is ``vmap``-ed over the stacked params, optimiser states
    and seeds (metrics then have a leading replica axis); with a ``replica_group`` g below the number of replicas
    (default ``step_replica_group``: on a CPU) the gradients are computed g replicas at a time in a ``lax.scan``,
    then the optimiser updates all replicas at once."""
    tx = make_optimizer(spec.train)
    schedule = make_schedule(spec.train)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    micro_batch = step_micro_batch(spec, mesh)

    def replica_grads(params, step, seed):
        batch = tasks.sample_batch(tasks.data_key(seed, step), spec, spec.train.batch_size)
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return loop.accumulated_value_and_grad(lambda p, b: loss_fn(p, b, spec), params, batch,
                                               micro_batch, batch_sharding)

    def replica_update(params, opt_state, loss, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": finite}

    def replica_step(params, opt_state, step, seed):
        return replica_update(params, opt_state, *replica_grads(params, step, seed))

    stacked = spec.train.seeds > 1
    group = (replica_group or step_replica_group(spec, mesh)) if stacked else 1
    if stacked and group >= spec.train.seeds:
        replica_step = jax.vmap(replica_step, in_axes=(0, 0, None, 0), spmd_axis_name="replica")
    elif stacked:
        replica_step = partial(_grouped_replica_step, replica_grads, replica_update, spec.train.seeds, group)
    seeds = jnp.array(rundir.replica_seeds(spec.train)) if stacked else spec.train.seed
    shardings = state_sharding(spec, mesh)
    # metrics replicated on every device: the loop reads them in every process, also when the replicas of a
    # seeds > 1 run are spread over the devices of several processes (per-replica sharded, they were not readable)
    replicated = NamedSharding(mesh, PartitionSpec())
    metric_sharding = {"loss": replicated, "grad_norm": replicated, "params_finite": replicated, "lr": replicated}

    @partial(jax.jit, in_shardings=(shardings,), out_shardings=(shardings, metric_sharding))
    def train_step(state):
        params, opt_state, metrics = replica_step(state["params"], state["opt_state"], state["step"], seeds)
        metrics["lr"] = schedule(state["step"])
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def _grouped_replica_step(replica_grads: Callable, replica_update: Callable, seeds: int, group: int,
                          params, opt_state, step, seed_array):
    """The stacked step with the gradients of ``group`` replicas at a time (vmapped within a group, one replica
    unvmapped) in a ``lax.scan`` over the ``seeds // group`` groups, then one vmapped optimiser update."""
    if seeds % group:
        raise ValueError(f"the replica group ({group}) must divide the number of seeds ({seeds})")
    grads_of = (lambda p, s: replica_grads(p, step, s)) if group == 1 else jax.vmap(
        lambda p, s: replica_grads(p, step, s))
    split = (lambda x: x) if group == 1 else (lambda x: x.reshape(seeds // group, group, *x.shape[1:]))
    merge = (lambda x: x) if group == 1 else (lambda x: x.reshape(seeds, *x.shape[2:]))

    def body(_, xs):
        return None, grads_of(*xs)

    _, (loss, grads) = jax.lax.scan(body, None, (jax.tree.map(split, params), split(seed_array)))
    return jax.vmap(replica_update)(params, opt_state, merge(loss), jax.tree.map(merge, grads))


# ----------------------------------------------------------------------------- train


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


def train(
    spec: Spec,
    run_dir: str | Path,
    *,
    stop_at_step: int | None = None,
    progress: bool = True,
    devices: list | None = None,
    on_log: Callable[[int, float], None] | None = None,
    warn: Callable[[str], None] = warn_stderr,
    start_from: str | Path | None = None,
    moments_dtype: str | None = None,
) -> TrainResult:
    """Train ``spec`` in ``run_dir``, resuming from its latest checkpoint if there is one.

    ``start_from``: a finished shorter run of the same recipe (``rundir.start_from_run``) whose latest checkpoint
    a run directory without checkpoints starts from, e.g. a 20k-step run from a 10k-step one (ignored once
    ``run_dir`` has its own checkpoints).

    ``moments_dtype`` ("bfloat16"): compact checkpoints, AdamW's moments stored in that dtype (a third smaller; a
    resume from one continues from rounded moments).

    ``stop_at_step`` ends the session early (as an interruption would) after saving a checkpoint.
    Raises TrainingDiverged on a non-finite loss, keeping the last good checkpoint.  An unreadable newest
    checkpoint is set aside with a ``warn``-ing and training resumes from the newest readable one.
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
        rundir.prepare(spec, run_dir, load_spec)
    barrier("prepare_run_dir")
    if not primary:
        rundir.prepare(spec, run_dir, load_spec)  # checks the spec process 0 wrote
    meta = {"spec": spec_to_dict(spec), "mesacli": "0.1.0"}
    state = init_state(spec, mesh)
    if start_from is not None and not rundir.saved_steps(run_dir):
        rundir.start_from_run(start_from, run_dir, spec, load_spec, state, meta, write=primary)
    ckpts = rundir.open_checkpoints(run_dir, spec, moments_dtype=moments_dtype)
    resumed, resumed_from = rundir.resume_state(spec, ckpts, state, warn), None
    if resumed is not None:
        state, resumed_from = resumed
    train_step = make_train_step(spec, mesh)
    try:  # compiled once, here (the loop's first step reuses it), and refused if it cannot fit in memory
        check_fits(train_step.lower(state).compile(), "a training step")
    except BaseException:
        ckpts.close()
        raise
    stacked, seeds = spec.train.seeds > 1, rundir.replica_seeds(spec.train)
    evaluate_replicas = make_evaluator(spec, mesh, stacked=stacked)

    def evaluate(params) -> np.ndarray:  # [S, T]
        return np.atleast_2d(evaluate_replicas(params))

    def eval_record(state, step: int) -> dict:
        per_seed = evaluate(state["params"]).mean(axis=1)
        record = {"step": step, "eval_loss": float(per_seed.mean())}
        if stacked:
            record.update(eval_loss_std=float(per_seed.std()), eval_loss_per_seed=[float(x) for x in per_seed])
        return record

    t = spec.train
    done = loop.run(state, ckpts=ckpts, run_dir=run_dir, log_path=run_dir / rundir.METRICS_FILE,
                    end=t.steps if stop_at_step is None else min(stop_at_step, t.steps), total=t.steps,
                    step_fn=lambda state, step: train_step(state),
                    every=loop.Every(t.log_every, t.eval_every, t.checkpoint_every),
                    meta=meta, seeds=seeds, description=spec.name,
                    eval_record=eval_record, progress=progress and primary, write=primary, on_log=on_log,
                    usable=lambda state: bool(np.isfinite(evaluate(state["params"])).all()))
    state = done.state
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
        dump_json(run_dir / rundir.EVAL_CURVE_FILE, record)
        label = spec.name if not stacked else f"{spec.name} ({len(seeds)} seeds, mean ± std)"
        plots.per_position_plot({label: curve}, run_dir / "loss_per_position.png",
                                title=f"{spec.name}: test loss per position (step {final_step})",
                                bands={label: curves.std(axis=0)} if stacked else None)
        plots.training_plot(run_dir / rundir.METRICS_FILE, run_dir / "training_curve.png", title=spec.name)
    return TrainResult(run_dir, spec, final_step, curve, state["params"], done.seconds, resumed_from,
                       done.interrupted, eval_curves=curves)
