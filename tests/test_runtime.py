"""The host-allocator setting (mesacli.runtime): where glibc puts a large block, the env switch and the CLI error."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mesacli import runtime
from mesacli.cli import app

glibc_only = pytest.mark.skipif(runtime._libc() is None, reason="needs glibc")

# Allocate a 64 MiB block, read glibc's mallinfo2 (bytes in mmapped blocks; free bytes kept in the heap),
# free the block and read it again.
MALLINFO_SCRIPT = """
import ctypes, sys
import numpy as np
from mesacli import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = runtime._libc()
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert runtime.keep_large_allocations()
x = np.ones(2**24, np.float32)
live = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(live.hblkhd, freed.fordblks)
"""
MIB64 = 64 * 2**20


def _mallinfo(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", MALLINFO_SCRIPT, mode], capture_output=True, text=True, check=True)
    mmapped_while_live, heap_free_after = (int(x) for x in out.stdout.split())
    return mmapped_while_live, heap_free_after


@glibc_only
def test_tuned_allocator_keeps_a_freed_large_block_in_the_heap():
    """glibc's default maps a 64 MiB block with mmap and unmaps it on free (the next one is faulted in
    afresh); tuned, the block comes from the heap and stays there for reuse after free."""
    mmapped, heap_free = _mallinfo("glibc")
    assert mmapped >= MIB64 and heap_free < MIB64
    mmapped, heap_free = _mallinfo("tuned")
    assert mmapped < MIB64 and heap_free >= MIB64


def test_configure_from_env_choices():
    assert runtime.configure_from_env({"MESACLI_ALLOCATOR": "glibc"}) == runtime.allocator()
    with pytest.raises(ValueError, match="MESACLI_ALLOCATOR must be one of tuned, glibc"):
        runtime.configure_from_env({"MESACLI_ALLOCATOR": "jemalloc"})


@glibc_only
def test_configure_from_env_tunes_by_default():
    assert runtime.configure_from_env({}) == "tuned"


def test_cli_rejects_an_unknown_allocator_in_one_line():
    result = CliRunner().invoke(app, ["bench", "--help"], env={"MESACLI_ALLOCATOR": "jemalloc"})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MESACLI_ALLOCATOR"), result.output


def test_nested_sigterm_blocks_keep_a_stop_seen_by_the_outer_one():
    """`reproduce run` wraps the training loops: a SIGTERM between two loops must not be forgotten by the next."""
    import os
    import signal

    from mesacli import runtime

    with runtime.stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        assert runtime.stop_requested()
        with runtime.stop_on_signals():  # the next loop starts: the request stands
            assert runtime.stop_requested()
        assert runtime.stop_requested()
    assert not runtime.stop_requested()  # the outermost block ends: reset


def test_deadline_requests_a_stop_once_it_has_passed():
    import time

    from mesacli import runtime

    assert runtime.seconds_left() is None and not runtime.stop_requested()
    with runtime.deadline(0.2):
        assert not runtime.stop_requested() and 0 < runtime.seconds_left() <= 0.2
        time.sleep(0.25)
        assert runtime.stop_requested() and runtime.seconds_left() < 0
        with runtime.deadline(None):  # an inner block without a budget
            assert not runtime.stop_requested()
        assert runtime.stop_requested()
    assert runtime.seconds_left() is None and not runtime.stop_requested()
