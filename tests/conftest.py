"""Shared tiny specs: small enough that a train step compiles and runs in about a second on a CPU."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile

# A test run started in the background by a non-interactive shell (`nohup pytest ... &`) inherits an ignored
# SIGINT; the Ctrl-C tests (tests/test_faults.py) need it delivered, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Tests are dominated by XLA compile time on a 2-core CPU; unoptimised code generation compiles
# several times faster and computes the same values.  Set before JAX is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# Many tests compile the same tiny programs again (a fresh run, a resume, a CLI child process): JAX's persistent
# compilation cache, in a folder of this test session only (so every session starts cold, as CI does), serves
# the repeats; it cut tests/test_train.py + tests/test_reproduce.py from 280 s to 170 s.  Environment
# variables, so the subprocesses of the CLI tests share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="mesacli-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pytest  # noqa: E402
import yaml  # noqa: E402

from mesacli.spec import Spec, spec_from_dict  # noqa: E402

TINY = {
    "name": "tiny",
    "task": {"kind": "linear", "state_dim": 4, "obs_dim": 4, "seq_len": 8, "token_format": "raw"},
    "model": {"layers": 2, "attention": "linear", "num_heads": 2, "key_size": 4, "embed_dim": 8,
              "input_proj": True, "output_proj": True, "init_std": 0.1},
    "train": {"steps": 6, "batch_size": 8, "lr": 1e-2, "eval_batches": 2, "eval_every": 3,
              "checkpoint_every": 2, "log_every": 1, "keep_checkpoints": 5},
}


def merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def tiny_spec(**sections) -> Spec:
    """The tiny spec with sections merged in, e.g. tiny_spec(model={"attention": "mesa"})."""
    return spec_from_dict(merge(TINY, sections))


@pytest.fixture
def tiny_spec_file(tmp_path):
    def write(**sections):
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(merge(TINY, sections)))
        return path

    return write


def invoke(*args):
    """The CLI in this process (typer's CliRunner), arguments stringified."""
    from typer.testing import CliRunner

    from mesacli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment, code=2):
    """A user mistake: exit ``code``, no traceback, exactly one line, ``error: ...`` containing ``fragment``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert fragment in lines[0], lines[0]
