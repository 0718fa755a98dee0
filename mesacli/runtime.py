"""Process-wide runtime settings that every mesacli command applies before it starts JAX work.

Graceful stop on SIGTERM (``stop_on_sigterm``, used by the training and prompt-tuning loops).  A job
scheduler pre-empts a job, and ``kill PID`` stops one, with SIGTERM; a command started in the background
by a non-interactive shell (``nohup mesacli train ... &``) ignores SIGINT, so SIGTERM is the only polite way
to stop it.  Inside the loops SIGTERM only raises a flag: the loop finishes the step it is on, then stops as
on Ctrl-C (metrics flushed, a checkpoint of that step saved, exit code 130).  Anywhere else SIGTERM keeps
its default action.  Blocks nest (`mesacli reproduce run` wraps the loops: a SIGTERM between two loops stands),
and ``deadline(seconds)`` makes ``stop_requested()`` turn True once a time budget has passed, so a budget
stops a loop exactly as SIGTERM does.

Host memory allocator.  glibc's malloc serves every request of 32 MiB or more (the ceiling of its
dynamic mmap threshold) with a fresh ``mmap`` and gives it back to the kernel on ``free``; smaller
freed blocks at the top of the heap are trimmed away as well.  XLA:CPU allocates an executable's large
temporaries with malloc on every call, so a long-sequence kernel whose [chunks, B, H, C, D] buffers
reach 32 MiB page-faults through all of them again on each call (the kernel zeroes every page: system
time).  Measured with ``mesacli bench`` on a 2-core CPU (B=8, H=4, D=64, T=4096): the chunked
mesa-layer's forward+backward took 1.41 s with glibc's defaults and 1.02 s with large blocks kept in
the heap, while chunked linear attention and the sequential mesa scan were unchanged (see BENCHMARKS.md).

``keep_large_allocations`` raises the mmap and trim thresholds with ``mallopt`` so that freed large
blocks are reused instead of returned.  The price: the process keeps its peak host memory (RSS) until
it exits instead of shrinking after a large step.  Set ``MESACLI_ALLOCATOR=glibc`` to keep glibc's
defaults; on anything but glibc this is a no-op.  Library users who want the same effect in their own
programs call ``keep_large_allocations()`` once at start-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import threading
import time

ENV_VAR = "MESACLI_ALLOCATOR"
CHOICES = ("tuned", "glibc")
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int

_state = {"allocator": "glibc", "stop_requested": False, "sigterm_depth": 0, "deadline": None}


def allocator() -> str:
    """'tuned' once ``keep_large_allocations`` succeeded in this process, else 'glibc' (the default)."""
    return _state["allocator"]


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_large_allocations() -> bool:
    """Keep freed large blocks in the heap (glibc only): mmap threshold and trim threshold = 2 GiB.

    Returns True if glibc accepted both settings; False (and nothing changed) elsewhere."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_LARGEST)) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_LARGEST)) == 1
    if ok:
        _state["allocator"] = "tuned"
    return ok


def configure_from_env(environ=os.environ) -> str:
    """Apply the allocator setting named by MESACLI_ALLOCATOR (default 'tuned'); returns what is in effect.

    Raises ValueError for a value other than 'tuned' or 'glibc'."""
    choice = environ.get(ENV_VAR, "tuned").strip().lower() or "tuned"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(CHOICES)}, got {environ.get(ENV_VAR)!r}")
    if choice == "tuned":
        keep_large_allocations()
    return allocator()


@contextlib.contextmanager
def stop_on_sigterm():
    """Within: SIGTERM sets ``stop_requested()`` instead of ending the process (the loop then stops at a step
    boundary and saves); the previous handler comes back on exit.  A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _state["sigterm_depth"] == 0
    if outermost:  # nested (a loop inside `reproduce run`): a SIGTERM seen by the outer block is kept
        _state["stop_requested"] = False

    def request_stop(signum, frame):
        _state["stop_requested"] = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    _state["sigterm_depth"] += 1
    try:
        yield
    finally:
        _state["sigterm_depth"] -= 1
        signal.signal(signal.SIGTERM, previous)
        if outermost:
            _state["stop_requested"] = False


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Within: ``stop_requested()`` also turns True once ``seconds`` have passed (a time budget that stops the
    loops exactly as SIGTERM does: the step under way is finished and saved).  ``None``: no deadline."""
    previous = _state["deadline"]
    _state["deadline"] = None if seconds is None else time.monotonic() + seconds
    try:
        yield
    finally:
        _state["deadline"] = previous


def seconds_left() -> float | None:
    """Seconds until the ``deadline`` in force (may be negative), or None without one."""
    return None if _state["deadline"] is None else _state["deadline"] - time.monotonic()


def stop_requested() -> bool:
    """True once SIGTERM arrived inside ``stop_on_sigterm``, or once the ``deadline`` in force has passed."""
    left = seconds_left()
    return _state["stop_requested"] or (left is not None and left <= 0)
