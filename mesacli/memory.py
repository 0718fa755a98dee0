"""Will a compiled computation fit in memory?  Checked before the first step runs, so that a spec too large for
the machine (``--set task.seq_len=1000000``) is a one-line error instead of an allocation failure deep in XLA.

The estimate is the compiled executable's own (``memory_analysis()``: arguments + outputs + temporaries - aliased
buffers, as `mesacli bench` reports it), per device.  What is available: on a CPU, MemAvailable of /proc/meminfo
for all the devices of the computation together (they share the host's memory); on an accelerator, the first
device's ``bytes_limit - bytes_in_use`` from ``memory_stats()``.  Where either number is unknown the check passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesacli.errors import MesaError

GIB = 2**30
TRAIN_HINT = "reduce task.seq_len or train.batch_size (or set train.micro_batch)"


def compiled_bytes(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries - aliased bytes of a compiled computation, per device (None: unknown)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis: no estimate
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def host_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable of the host in bytes (None where /proc/meminfo does not say, e.g. not on Linux)."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                value, unit = line.split()[1:3]
                return int(value) * {"kB": 2**10, "mB": 2**20, "gB": 2**30}.get(unit, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _devices(compiled: Any) -> list:
    """The devices a compiled computation runs on (from its input shardings; all local devices if unknown)."""
    import jax

    try:
        shardings = jax.tree_util.tree_leaves(compiled.input_shardings)
        devices = {d for s in shardings for d in s.device_set}
    except Exception:  # noqa: BLE001
        devices = set()
    return sorted(devices, key=lambda d: d.id) or jax.local_devices()


def available_bytes(devices: list) -> tuple[int | None, int]:
    """(bytes available to a computation on ``devices``, how many devices share them): the host's MemAvailable
    shared by CPU devices, or one accelerator's free memory (None if it does not report it)."""
    first = devices[0]
    if first.platform == "cpu":
        return host_available_bytes(), len(devices)
    try:
        stats = first.memory_stats() or {}
    except Exception:  # noqa: BLE001
        stats = {}
    if "bytes_limit" not in stats:
        return None, 1
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), 1


def check_fits(compiled: Any, what: str, *, hint: str = TRAIN_HINT, extra_bytes: int = 0) -> None:
    """MesaError if ``compiled`` (a ``jax.jit(f).lower(...).compile()``; calling the jitted function with the same
    argument types afterwards reuses it) plus ``extra_bytes`` per device needs more memory than is available:
    "WHAT needs about X GiB, Y GiB available; HINT"."""
    per_device = compiled_bytes(compiled)
    if per_device is None:
        return
    available, sharing = available_bytes(_devices(compiled))
    if available is None:
        return
    need = (per_device + extra_bytes) * sharing
    if need > available:
        where = f" on {sharing} devices" if sharing > 1 else ""
        raise MesaError(f"{what} needs about {_gib(need)} GiB{where}, {_gib(available)} GiB available; {hint}")


def _gib(n_bytes: int) -> str:
    gib = n_bytes / GIB
    return f"{gib:,.0f}" if gib >= 100 else f"{gib:.1f}" if gib >= 0.1 else f"{gib:.2g}"
