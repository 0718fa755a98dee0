"""All Orbax use lives here (current API: ``args=ocp.args...``).

A checkpoint at step s holds two items: ``state`` (params, optimiser state, step) and ``meta``
(JSON: the resolved spec and the metrics at that step).  Orbax writes each step into a temporary
directory and renames it when complete, so a crash never leaves a half-written "latest" step.

Compact checkpoints (``moments_dtype="bfloat16"``) store the optimiser state's floating arrays (AdamW's moments)
in bfloat16: a third smaller than float32 for AdamW, the parameters exact, and a resume from one is no longer
bit-identical to an uninterrupted run (the moments come back rounded to 8 significant bits).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mesacli.errors import MesaError


class CheckpointUnreadable(MesaError):
    """A checkpoint's files cannot be read (truncated, corrupted); ``step`` names it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Checkpoints:
    """Save every N steps (the caller decides), keep the last K, restore the latest or a given step."""

    def __init__(self, directory: Path, keep: int = 3, read_only: bool = False, moments_dtype: str | None = None):
        """``moments_dtype``: store the optimiser state's floating arrays in this dtype (compact checkpoints)."""
        if moments_dtype not in MOMENTS_DTYPES:
            raise MesaError(f"moments dtype must be one of {', '.join(map(str, MOMENTS_DTYPES))}, not {moments_dtype}")
        self.directory = Path(directory).absolute()
        self.moments_dtype = moments_dtype
        check_checkpoint_path(self.directory)
        # read_only only stops us creating the directory; Orbax's own read_only mode logs warnings.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save ``state`` (its ``opt_state`` in ``moments_dtype`` when set: ``meta`` then says so)."""
        save_args = None
        if self.moments_dtype is not None:
            save_args = moments_save_args(state, jnp.dtype(self.moments_dtype))
            meta = dict(meta, moments_dtype=self.moments_dtype)
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state, save_args=save_args),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore_meta(self, step: int | None = None) -> dict:
        step = self._resolve_step(step)
        return self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore (state, meta); ``abstract_state`` gives the structure, shapes, dtypes and shardings."""
        step = self._resolve_step(step)
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._restore(step, ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def _restore(self, step: int, args) -> dict:
        """Orbax's restore; any failure (a truncated or corrupted file) is one CheckpointUnreadable, and Orbax's
        abandoned read coroutines, collected afterwards, print nothing."""
        reason = None
        with _quiet_unraisable():
            try:
                return self._manager.restore(step, args=args)
            except Exception as err:  # noqa: BLE001 - any Orbax/IO failure means an unreadable checkpoint
                reason = _short(err)
        raise CheckpointUnreadable(f"checkpoint step {step} in {self.directory} is corrupted or unreadable "
                                   f"({reason})", step)

    def readable_steps(self, make_template: Callable[[dict], Any], below: int | None = None):
        """Yield (step, state, meta) of the readable checkpoints, newest first (below ``below`` if given), and
        (step, None, reason) for each unreadable one on the way; ``make_template(meta)`` gives the abstract state."""
        for step in sorted(self.all_steps(), reverse=True):
            if below is not None and step >= below:
                continue
            try:
                meta = self.restore_meta(step)
                state, meta = self.restore(make_template(meta), step)
            except CheckpointUnreadable as err:
                yield step, None, str(err)
                continue
            yield step, state, meta

    def newest_readable(self, make_template: Callable[[dict], Any],
                        below: int | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint (below ``below`` if given), or None."""
        for step, state, meta in self.readable_steps(make_template, below):
            if state is not None:
                return step, state, meta
        return None

    def resume_newest_readable(self, make_template: Callable[[dict], Any], warn: Callable[[str], None],
                               hint: str) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint to resume from (None: there is no checkpoint);
        the unreadable newer ones are set aside with a ``warn``-ing.  Every checkpoint unreadable: MesaError
        ending in ``hint`` (nothing is overwritten silently)."""
        broken = []
        for step, state, meta in self.readable_steps(make_template):
            if state is None:
                broken.append((step, meta))
                continue
            for bad, reason in broken:
                moved = self.set_aside(bad)
                warn(f"warning: {reason}; moved to {moved.name}, resuming from step {step}")
            return step, state, meta
        if broken:
            raise MesaError(f"no checkpoint in {self.directory} is readable ({broken[0][1]}); {hint}")
        return None

    def set_aside(self, step: int) -> Path:
        """Rename an unreadable checkpoint to ``<step>.unreadable`` (kept for inspection, no longer a step)."""
        source = self.directory / str(step)
        target = self.directory / f"{step}.unreadable"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.unreadable{n}"
        source.rename(target)
        self._manager.reload()
        return target

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise MesaError(f"no checkpoint found in {self.directory}")
        elif step not in self.all_steps():
            raise MesaError(f"no checkpoint for step {step} in {self.directory} (have: {self.all_steps()})")
        return step

    def delete(self, step: int) -> None:
        """Remove the checkpoint of ``step`` (a diverged run's condemned parameters)."""
        self._manager.delete(step)

    def close(self) -> None:
        self._manager.close()


MOMENTS_DTYPES = (None, "bfloat16")


def moments_save_args(state: Any, dtype: jnp.dtype) -> Any:
    """Orbax save arguments for a train state: the float32 arrays under its ``opt_state`` saved as ``dtype``
    (restoring into a float32 template casts them back), everything else as it is."""

    def args_for(path, leaf) -> ocp.SaveArgs:
        top = path[0].key if path and isinstance(path[0], jax.tree_util.DictKey) else None
        if top == "opt_state" and getattr(leaf, "dtype", None) == jnp.float32 and getattr(leaf, "ndim", 0) > 0:
            return ocp.SaveArgs(dtype=dtype)
        return ocp.SaveArgs()

    return jax.tree_util.tree_map_with_path(args_for, state)


def check_checkpoint_path(path: Path) -> None:
    """MesaError for a folder whose path has '[' or ']': TensorStore (under Orbax) writes checkpoints there that it
    cannot read back (it takes the brackets for a pattern), so such a run would be lost at its first resume."""
    if any(c in str(Path(path).absolute()) for c in "[]"):
        raise MesaError(f"{path}: checkpoints cannot live under a path with '[' or ']' (Orbax cannot read them "
                        f"back); choose another --run-dir")


def _short(err: Exception) -> str:
    """The gist of an Orbax / TensorStore error: its first sentence, without the dump of the TensorStore spec."""
    text = " ".join(str(err).split())
    text = text.split(" See full TensorStore details")[0].split(" <bound method")[0]
    return (text[:160] + "...") if len(text) > 160 else text or type(err).__name__


@contextlib.contextmanager
def _quiet_unraisable():
    """Within: "Exception ignored in <coroutine ...>" reports and asyncio's "Task exception was never retrieved"
    log records (Orbax's asyncio reads of a corrupted file, abandoned when the first one failed) are dropped; they
    are collected before the block ends."""
    import logging

    previous, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")
    level = asyncio_log.level
    sys.unraisablehook = lambda unraisable: None
    asyncio_log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous
        asyncio_log.setLevel(level)


def finite_or_none(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None (JSON's null): no bare ``NaN`` in our JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


def write_text_atomic(path: Path, text: str) -> None:
    """Replace the file ``path`` by ``text`` atomically (temp file + rename): a crash leaves the old or the new."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def dump_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename); non-finite numbers become null."""
    write_text_atomic(path, json.dumps(finite_or_none(data), indent=1, allow_nan=False))


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
        tmp.write_text(json.dumps(finite_or_none(data), indent=indent, allow_nan=False) + "\n")
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
        newest = ckpts.latest_step()
        if newest is None:
            return None
        found = ckpts.newest_readable(make_template)
        if found is None or found[0] != newest:
            older = f"the newest readable one is step {found[0]}" if found else "no older one is readable"
            raise MesaError(f"checkpoint step {newest} in {directory} is corrupted or unreadable; {older} "
                            f"(the command that wrote them resumes from it, setting the broken ones aside)")
    finally:
        ckpts.close()
    step, state, meta = found
    return state, meta, step
