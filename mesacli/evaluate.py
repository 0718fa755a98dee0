"""Test loss on a spec's fixed test batches: ``make_evaluator`` (used during training) and ``evaluate_run``
(a run directory's checkpoint next to the baselines), on our test batches or on the authors' own
(``tasks.authors_test_batch``: the test sequences of the paper's figures)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesacli import baselines, model, plots, rundir, tasks
from mesacli.checkpoint import dump_json
from mesacli.errors import MesaError
from mesacli.rundir import replica_seeds
from mesacli.sharding import make_mesh
from mesacli.spec import Spec
from mesacli.state import load_params

TEST_SETS = tuple(rundir.EVAL_STEMS)  # ("ours", "authors")


def make_evaluator(spec: Spec, mesh: Mesh, stacked: bool = False, batches: list[tasks.Batch] | None = None
                   ) -> Callable[[Any], np.ndarray]:
    """params -> per-position test loss [T], the mean over the spec's fixed test batches (or ``batches``, e.g. the
    authors' ``tasks.authors_test_batch``); with ``stacked``, params with a leading replica axis -> [S, T].
    MesaError if the spec's test batches and their evaluation do not fit in memory (checked on the compiled
    evaluation, before a batch is made)."""
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    def curve(params, batch):
        pred, _ = model.apply(params, batch.tokens_BTI, spec)
        return tasks.per_position_loss(pred, batch.targets_BTS)

    curve = jax.jit(jax.vmap(curve, in_axes=(0, None)) if stacked else curve,
                    out_shardings=NamedSharding(mesh, PartitionSpec()))
    if batches is None:
        _check_fits(spec, mesh, curve, batch_sharding, stacked)
        batches = tasks.eval_batches(spec, sharding=batch_sharding)
    else:
        batches = [jax.device_put(b, batch_sharding) for b in batches]

    def evaluate(params) -> np.ndarray:
        return np.mean([np.asarray(curve(params, b)) for b in batches], axis=0)

    return evaluate


def _check_fits(spec: Spec, mesh: Mesh, curve, batch_sharding: NamedSharding, stacked: bool) -> None:
    """The compiled evaluation of one test batch plus the other stored test batches must fit in memory (compiled
    on abstract arguments placed like the real ones, so that the first real call reuses the executable; the params
    of one replica unless ``stacked``)."""
    from mesacli.memory import check_fits
    from mesacli.state import init_state, state_sharding

    def placed(tree, sharding):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    one = spec if stacked else dataclasses.replace(spec, train=dataclasses.replace(spec.train, seeds=1))
    params = placed(jax.eval_shape(lambda: init_state(one, mesh))["params"], state_sharding(one, mesh)["params"])
    batch = placed(jax.eval_shape(lambda key: tasks.sample_batch(key, spec, spec.train.batch_size),
                                  tasks.eval_batch_key(spec, 0)), batch_sharding)
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(batch)) // mesh.shape["data"]
    check_fits(curve.lower(params, batch).compile(), f"evaluating the {spec.train.eval_batches} fixed test batches",
               extra_bytes=(spec.train.eval_batches - 1) * batch_bytes,
               hint="reduce task.seq_len, train.batch_size or train.eval_batches (train.micro_batch does not apply "
                    "to the evaluation)")


@dataclasses.dataclass
class EvalReport:
    spec: Spec
    step: int
    curves: dict[str, np.ndarray]  # the model first, then the baselines
    gd1_eta: float | None
    json_path: Path
    plot_path: Path
    per_seed: np.ndarray  # [S, T] per-position loss of every replica (S = 1 for a plain run)
    test_set: str = "ours"  # TEST_SETS


def evaluate_run(run_dir: str | Path, step: int | None = None, with_baselines: bool = True,
                 test_set: str = "ours") -> EvalReport:
    """Per-position test loss of the checkpoint (latest or ``step``) and, optionally, of GD-1 (eta
    line-searched) and ridge LSQ, on ``test_set``: "ours" (the spec's fixed test batches) or "authors"
    (``tasks.authors_test_batch``: 5 batches from seeds 1 .. 11111, of 256 sequences (linear task) or 512
    (nonlinear, partially observed)); writes RUN_DIR/eval_step<N>.json and .png (eval_authors_step<N>.* for the
    authors' batches)."""
    if test_set not in TEST_SETS:
        raise MesaError(f"unknown test set {test_set!r}: choose one of {', '.join(TEST_SETS)}")
    run_dir = Path(run_dir)
    spec, params, at_step = load_params(run_dir, step)
    rundir.check_writable(run_dir)
    batches = None  # the spec's own
    if test_set == "authors":  # drawn once, for the model and the baselines (MesaError for a task without them)
        batches = tasks.authors_test_batches(spec.task)
    stacked = spec.train.seeds > 1
    per_seed = np.atleast_2d(make_evaluator(spec, make_mesh(replicas=spec.train.seeds), stacked=stacked,
                                            batches=batches)(params))
    label = f"{spec.name} @ {at_step}" + (f" ({spec.train.seeds} seeds, mean ± std)" if stacked else "")
    curves = {label: per_seed.mean(axis=0)}
    eta = None
    if with_baselines:
        baseline_curves, eta = baselines.baseline_curves(spec, test_batches=batches)
        curves.update(baseline_curves)
    stem = rundir.eval_record_stem(test_set, at_step)
    json_path, plot_path = run_dir / f"{stem}.json", run_dir / f"{stem}.png"
    model_curve = next(iter(curves.values()))
    record = {
        "step": at_step, "seq_avg_loss": float(np.mean(model_curve)),
        "per_position_loss": [float(x) for x in model_curve], "gd1_eta": eta,
        "baselines": {name: [float(x) for x in c] for name, c in list(curves.items())[1:]},
        "test_set": test_set,
    }
    if stacked:
        seeds = replica_seeds(spec.train)
        record.update(seq_avg_loss_std=float(per_seed.mean(axis=1).std()), seeds=seeds,
                      per_seed={str(s): {"seq_avg_loss": float(c.mean()), "per_position_loss": c.tolist()}
                                for s, c in zip(seeds, per_seed, strict=True)})
    dump_json(json_path, record)
    where = "" if test_set == "ours" else ", the authors' test batches"
    plots.per_position_plot(curves, plot_path, title=f"{spec.name}: test loss per position (step {at_step}{where})",
                            dashed=tuple(list(curves)[1:]), bands={label: per_seed.std(axis=0)} if stacked else None)
    return EvalReport(spec, at_step, curves, eta, json_path, plot_path, per_seed, test_set)
