"""All Orbax use lives here (current API: ``args=ocp.args...``).

A checkpoint at step s holds two items: ``state`` (params, optimiser state, step) and ``meta``
(JSON: the resolved spec and the metrics at that step).  Orbax writes each step into a temporary
directory and renames it when complete, so a crash never leaves a half-written "latest" step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mesacli.errors import MesaError


class Checkpoints:
    """Save every N steps (the caller decides), keep the last K, restore the latest or a given step."""

    def __init__(self, directory: Path, keep: int = 3, read_only: bool = False):
        self.directory = Path(directory).absolute()
        # read_only only stops us creating the directory; Orbax's own read_only mode logs warnings.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore_meta(self, step: int | None = None) -> dict:
        step = self._resolve_step(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - any Orbax/IO failure means an unreadable checkpoint
            raise MesaError(f"checkpoint {self.directory}/{step} is corrupted or unreadable: {_short(err)}") from None
        return restored["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore (state, meta); ``abstract_state`` gives the structure, shapes, dtypes and shardings."""
        step = self._resolve_step(step)
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
            )
        except Exception as err:  # noqa: BLE001
            raise MesaError(f"checkpoint {self.directory}/{step} is corrupted or unreadable: {_short(err)}") from None
        return restored["state"], restored["meta"]

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise MesaError(f"no checkpoint found in {self.directory}")
        elif step not in self.all_steps():
            raise MesaError(f"no checkpoint for step {step} in {self.directory} (have: {self.all_steps()})")
        return step

    def close(self) -> None:
        self._manager.close()


def _short(err: Exception) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(err).__name__


def dump_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def check_output_path(path: Path) -> None:
    """MesaError if a user-named output file (--out) is a directory: checked before long work starts."""
    if Path(path).is_dir():
        raise MesaError(f"--out {path} is a directory; give a file name such as {Path(path) / 'results.json'}")


def write_output_json(path: Path, data: Any, indent: int = 1) -> None:
    """Write a user-named JSON output (--out) atomically, creating its folder; MesaError if it cannot be written."""
    path = Path(path)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=indent) + "\n")
        tmp.replace(path)
    except OSError as err:
        raise MesaError(f"cannot write {path}: {err.strerror or err}") from None


def restore_latest(directory: Path, make_template: Any) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the latest checkpoint in ``directory``, or None if there is none.

    ``make_template(meta)`` gives the abstract state (structure, shapes, dtypes) from the stored meta, so a caller
    can restore arrays whose shapes it only learns from the checkpoint (e.g. a tuned prompt prefix).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    ckpts = Checkpoints(directory, read_only=True)
    try:
        step = ckpts.latest_step()
        if step is None:
            return None
        meta = ckpts.restore_meta(step)
        state, meta = ckpts.restore(make_template(meta), step)
    finally:
        ckpts.close()
    return state, meta, step
