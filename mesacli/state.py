"""The train state of a synthetic-task run: optimiser, initial state, sharding, and loading a run's parameters.

Params come from ``fold_in(PRNGKey(seed), 0)``.  With ``train.seeds = S > 1`` params and optimiser state carry a
leading replica axis (replica i: seed ``train.seed + i``), sharded over the mesh's "replica" axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesacli import model, rundir
from mesacli.sharding import make_mesh
from mesacli.spec import Spec, TrainSpec, load_run_spec


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


def state_sharding(spec: Spec, mesh: Mesh) -> dict:
    replicated = NamedSharding(mesh, PartitionSpec())
    per_replica = replicated if spec.train.seeds == 1 else NamedSharding(mesh, PartitionSpec("replica"))
    return {"params": per_replica, "opt_state": per_replica, "step": replicated}


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
            params, opt_state = jax.vmap(init_replica)(jnp.array(rundir.replica_seeds(spec.train)))
        return {"params": params, "opt_state": opt_state, "step": jnp.array(0, jnp.int32)}

    # created by a jitted function with the target sharding: works on a mesh spanning several processes
    return jax.jit(init_all, out_shardings=state_sharding(spec, mesh))()


def load_params(run_dir: str | Path, step: int | None = None) -> tuple[Spec, Any, int]:
    """(spec, params, step) of a synthetic-task run directory's latest (or given) checkpoint."""
    spec, state = rundir.restore(run_dir, load_run_spec,
                                 lambda spec: init_state(spec, make_mesh(replicas=spec.train.seeds)), step)
    return spec, state["params"], int(state["step"])
