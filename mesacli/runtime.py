"""Process-wide runtime settings that every mesacli command applies before it starts JAX work.

Graceful stop on SIGTERM and Ctrl-C (``stop_on_signals``, used by the training and prompt-tuning loops).  A job
scheduler pre-empts a job, and ``kill PID`` stops one, with SIGTERM; a command started in the background
by a non-interactive shell (``nohup mesacli train ... &``) ignores SIGINT, so SIGTERM is the only polite way
to stop it.  Inside the loops SIGTERM, and a first Ctrl-C, only raise a flag: the loop finishes the step it is on,
then stops (metrics flushed, a checkpoint of that step saved, exit code 130); a second Ctrl-C stops at once, but
never inside a checkpoint save (``uninterruptible``).  Anywhere else both signals keep their default action.
Blocks nest (`mesacli reproduce run` wraps the loops: a SIGTERM between two loops stands), and
``deadline(seconds)`` makes ``stop_requested()`` turn True once a time budget has passed, so a budget stops a
loop exactly as SIGTERM does.  ``StallWatchdog`` ends a process whose loop stopped making progress (exit code
``EXIT_STALLED``).

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

_state = {"allocator": "glibc", "stop_requested": False, "sigterm_depth": 0, "deadline": None, "interrupts": 0,
          "uninterruptible": False, "interrupt_pending": False}


def allocator() -> str:
    """'tuned' once ``keep_large_allocations`` succeeded in this process, else 'glibc' (the default)."""
    return _state["allocator"]


def machine() -> dict:
    """The machine a measurement or a training session ran on, under the same keys wherever one is recorded
    (``loop.session_record``, ``bench``, ``bench-train``): platform, device (jax's name of device 0, e.g.
    "TFRT_CPU_0"), device_kind (e.g. "cpu", "NVIDIA H100 80GB HBM3"), devices, processes, host (architecture and CPU
    count), jax version and allocator."""
    import platform

    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "device": str(device), "device_kind": device.device_kind,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "jax": jax.__version__, "allocator": allocator()}


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
def stop_on_signals():
    """Within: SIGTERM, and a first Ctrl-C (SIGINT), set ``stop_requested()`` instead of ending the process (the loop
    then stops at a step boundary and saves); a second Ctrl-C raises KeyboardInterrupt at once, except inside
    ``uninterruptible()`` (a checkpoint save), which raises it when the save is complete.  A SIGINT that the process
    ignores (a background job of a non-interactive shell) stays ignored.  The previous handlers come back on exit.
    A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _state["sigterm_depth"] == 0
    if outermost:  # nested (a loop inside `reproduce run`): a stop request seen by the outer block is kept
        _state["stop_requested"] = False
        _state["interrupts"] = 0

    def request_stop(signum, frame):
        _state["stop_requested"] = True

    def interrupt(signum, frame):
        _state["stop_requested"] = True
        _state["interrupts"] += 1
        if _state["interrupts"] > 1:
            if _state["uninterruptible"]:
                _state["interrupt_pending"] = True
            else:
                raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, request_stop)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)
    _state["sigterm_depth"] += 1
    try:
        yield
    finally:
        _state["sigterm_depth"] -= 1
        signal.signal(signal.SIGTERM, previous_term)
        if previous_int is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous_int)
        if outermost:
            _state["stop_requested"] = False
            _state["interrupts"] = 0


@contextlib.contextmanager
def uninterruptible():
    """Within (a checkpoint save): a second Ctrl-C under ``stop_on_signals`` waits until the block is done, then
    raises KeyboardInterrupt, so that a save is never cut half-way."""
    outer = _state["uninterruptible"]
    _state["uninterruptible"] = True
    try:
        yield
    finally:
        _state["uninterruptible"] = outer
        if not outer and _state["interrupt_pending"]:
            _state["interrupt_pending"] = False
            raise KeyboardInterrupt


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
    """True once SIGTERM or Ctrl-C arrived inside ``stop_on_signals``, or once the ``deadline`` in force has passed."""
    left = seconds_left()
    return _state["stop_requested"] or (left is not None and left <= 0)


# ----------------------------------------------------------------------------- stall watchdog

EXIT_STALLED = 75  # EX_TEMPFAIL: a process the watchdog ended; run it again (`mesacli reproduce run` does)
STALL_ENV = "MESACLI_STALL_SECONDS"  # the allowed silence after the first step; 0 turns the watchdog off
STALL_FIRST_ENV = "MESACLI_STALL_FIRST_SECONDS"  # the allowed time of the first step (compilation included)


def stall_limits(environ=os.environ) -> tuple[float, float] | None:
    """(first, floor) seconds from MESACLI_STALL_FIRST_SECONDS (default 3600) and MESACLI_STALL_SECONDS (default
    900), or None if the watchdog is off (MESACLI_STALL_SECONDS=0).  ValueError for a value that is no number."""
    try:
        floor = float(environ.get(STALL_ENV, "900"))
        first = float(environ.get(STALL_FIRST_ENV, "3600"))
    except ValueError:
        raise ValueError(f"{STALL_ENV} and {STALL_FIRST_ENV} must be numbers of seconds "
                         f"(got {environ.get(STALL_ENV)!r}, {environ.get(STALL_FIRST_ENV)!r})") from None
    return None if floor <= 0 else (max(first, floor), floor)


class StallWatchdog:
    """Ends a process whose loop stopped making progress: XLA:CPU can deadlock in rare cases (a library kernel
    re-entering the intra-op thread pool), leaving every thread in a futex wait forever.  ``beat()`` after every
    step; a daemon thread checks that the silence since the last beat stays below ``first`` seconds before the
    first beat, and below max(``floor``, ``factor`` x the slowest interval seen) after it.  Past that it writes
    every thread's Python stack (faulthandler) and ``describe()`` to stderr and exits with EXIT_STALLED (no
    cleanup: checkpoints are atomic, the last one stands), so that an unattended job restarts from it."""

    def __init__(self, first: float, floor: float, describe, factor: float = 30.0, poll: float | None = None):
        self.first, self.floor, self.factor, self.describe = first, floor, factor, describe
        self.poll = poll if poll is not None else min(5.0, floor / 4)
        self.last = time.monotonic()
        self.slowest: float | None = None
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mesacli-stall-watchdog", daemon=True)

    def allowed(self) -> float:
        return self.first if self.slowest is None else max(self.floor, self.factor * self.slowest)

    def beat(self) -> None:
        now = time.monotonic()
        if self.beats > 0:  # the first interval (compilation) does not count towards the slowest step
            self.slowest = max(self.slowest or 0.0, now - self.last)
        self.beats += 1
        self.last = now

    def __enter__(self):
        self.last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=self.poll + 1)

    def _watch(self) -> None:
        import faulthandler
        import sys

        while not self._stop.wait(self.poll):
            silent, allowed = time.monotonic() - self.last, self.allowed()
            if silent <= allowed:
                continue
            slowest = "" if self.slowest is None else f", the slowest step so far took {self.slowest:.1f} s"
            sys.stderr.write(f"\nerror: no step finished in {silent:.0f} s (allowed {allowed:.0f} s{slowest}): the "
                             f"process is stalled; {self.describe()}. Every thread's stack follows; exiting with "
                             f"code {EXIT_STALLED} (set {STALL_ENV} to allow longer, 0 to turn this off)\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(EXIT_STALLED)


@contextlib.contextmanager
def stall_watchdog(describe):
    """Within: a ``StallWatchdog`` with the limits of ``stall_limits()`` (yields it, or None when it is off)."""
    limits = stall_limits()
    if limits is None:
        yield None
        return
    with StallWatchdog(*limits, describe=describe) as dog:
        yield dog


def die_with_parent(new_process_group: bool = False) -> None:
    """In a child process (a ``preexec_fn``): be killed if the supervising parent dies (Linux prctl
    PR_SET_PDEATHSIG), never orphaned; with ``new_process_group`` also leave the terminal's process group, so that
    a Ctrl-C reaches the parent alone, which passes it on once."""
    if new_process_group:
        os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
