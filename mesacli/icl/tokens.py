"""Storage of prompt-tuned tokens: where ``prompt-tune`` keeps them and how ``icl-eval`` reads them back.

Each stage lives in RUN_DIR/prompt_tune/<stage>/ (RUN_DIR/prompt_tune/seed<k>/<stage>/ for replica k of a
``train.seeds > 1`` run): Orbax checkpoints of {tokens, opt_state (Adam), step} (plus, for the prefix stage, the
EOS frozen with it) with the metadata of ``checkpoint_meta``, loss.jsonl and loss.png.  This module owns that
layout and the metadata's keys; the tuning itself is ``mesacli.icl.tune``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from mesacli import rundir
from mesacli.checkpoint import restore_latest
from mesacli.errors import MesaError
from mesacli.icl.prompts import PromptLayout

STAGES = ("eos", "prefix")
LOSS_FILE = "loss.jsonl"


def stage_dir(run_dir: Path, stage: str, replica: int | None = None) -> Path:
    """RUN/prompt_tune/<stage>, or RUN/prompt_tune/seed<k>/<stage> for replica k of a multi-seed run."""
    return Path(run_dir) / rundir.TUNE_DIR / rundir.replica_folder(replica) / stage


def checkpoints_dir(run_dir: Path, stage: str, replica: int | None = None) -> Path:
    """The Orbax checkpoints of a stage: <stage_dir>/checkpoints."""
    return stage_dir(run_dir, stage, replica) / rundir.CHECKPOINT_DIR


def tuning_state(tokens, opt_state, eos=None) -> dict:
    """The saved state of a stage: {tokens, opt_state, step} and, for the prefix stage, the frozen ``eos``."""
    state = {"tokens": tokens, "opt_state": opt_state, "step": jnp.array(0, jnp.int32)}
    if eos is not None:
        state["eos"] = eos
    return state


def checkpoint_meta(stage: str, n_s: int, config: dict, model_step: int, layout: PromptLayout) -> dict:
    """The metadata of a stage's checkpoints: the stage, n_s, the tuning settings (``TuneConfig`` as a dict, with at
    least ``lr`` and ``prefix_len``), the model checkpoint step tuned on, and the prompt layout."""
    return {"stage": stage, "n_s": n_s, "config": config, "model_step": model_step,
            "layout": {"n_examples": layout.n_examples, "prefix_len": layout.prefix_len, "length": layout.length}}


def _state_template(meta: dict) -> dict:
    """A stage's state structure from its checkpoint metadata (the prefix length is only known from there)."""
    n_s, stage = meta["n_s"], meta["stage"]
    shape = (n_s,) if stage == "eos" else (meta["config"]["prefix_len"], n_s)
    tokens = jnp.zeros(shape, jnp.float32)
    eos = jnp.zeros((n_s,), jnp.float32) if stage == "prefix" else None
    return tuning_state(tokens, optax.adam(meta["config"]["lr"]).init(tokens), eos)


def load_tuned(run_dir: str | Path, n_s: int, replica: int | None = None) -> dict[str, Any]:
    """{"eos": vector or None, "prefix": [P, n_s] or None, "prefix_eos": the EOS frozen with that prefix,
    "<stage>_step" and "<stage>_model_step" (the model checkpoint step it was tuned on)} from the latest
    checkpoints of RUN_DIR/prompt_tune (of replica ``replica`` of a multi-seed run);
    a token of the wrong size is a MesaError."""
    out: dict[str, Any] = {"eos": None, "prefix": None, "prefix_eos": None}
    for stage in STAGES:
        found = restore_latest(checkpoints_dir(run_dir, stage, replica), _state_template)
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


def check_tuned_on_step(tuned: dict, stage: str, at_step: int, run_dir: Path) -> None:
    """MesaError unless the tuned ``stage`` tokens (from ``load_tuned``) were tuned on model checkpoint
    ``at_step``: tokens tuned on another checkpoint (e.g. before the run trained further) are not that model's."""
    tuned_on = tuned.get(f"{stage}_model_step")
    if tuned_on != at_step:
        what = "EOS" if stage == "eos" else "prefix"
        tune_dir = f"{run_dir}/{rundir.TUNE_DIR}"
        raise MesaError(f"the tuned {what} in {tune_dir} was tuned on model step {tuned_on}, "
                        f"but this evaluates step {at_step}: pass --step {tuned_on}, or delete {tune_dir} "
                        f"and run `mesacli prompt-tune {run_dir}` again")
