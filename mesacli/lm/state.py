"""The train state of a language-model run: optimiser, initial state, and loading a run's parameters."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mesacli import rundir
from mesacli.lm import data as lm_data
from mesacli.lm import model
from mesacli.lm.spec import LMSpec, LMTrainSpec, load_lm_run_spec
from mesacli.sharding import make_mesh


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


def init_state(spec: LMSpec, vocab_size: int, mesh) -> dict:
    def init_all():
        params = model.init(jax.random.PRNGKey(spec.train.seed), spec, vocab_size)
        return {"params": params, "opt_state": make_optimizer(spec.train).init(params),
                "step": jnp.array(0, jnp.int32)}

    return jax.jit(init_all, out_shardings=NamedSharding(mesh, PartitionSpec()))()


def load_lm(run_dir: str | Path, step: int | None = None) -> tuple[LMSpec, Any, int, lm_data.Tokenizer]:
    """(spec, params, step, tokenizer) of a language-model run directory's latest (or given) checkpoint."""
    spec = rundir.read_spec(run_dir, load_lm_run_spec)
    tokenizer = lm_data.load_tokenizer(spec.data.tokenizer)
    spec, state = rundir.restore(run_dir, load_lm_run_spec,
                                 lambda spec: init_state(spec, tokenizer.vocab_size, make_mesh()), step)
    return spec, state["params"], int(state["step"]), tokenizer
