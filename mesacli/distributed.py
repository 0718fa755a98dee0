"""Several processes (hosts) training one run: ``jax.distributed`` set-up, checks and fault messages.

A multi-process run is N copies of the same command, one per process, that meet at a coordinator:

    mesacli train SPEC --coordinator HOST:PORT --num-processes N --process-id I     (or MESACLI_* variables)
    mesacli train SPEC --cluster auto                        (SLURM, Open MPI, TPU pods: detected by JAX)

Each process then sees every device of every process: one global mesh, the batch of step s defined by
the seed and s alone (so the curve does not depend on the number of processes), Orbax saving and
restoring cooperatively, and files written by process 0 only.

The JAX distributed runtime ends a process with a C++ abort when the coordinator cannot be reached or a
peer dies, which no Python code can catch.  So the command the user started is a *supervisor*: it runs
the same command as a child process (``MESACLI_WORKER=1``), keeps the child's stderr in a log file and,
if the child dies that way, prints one line saying what happened and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mesacli import runtime
from mesacli.errors import MesaError

ENV_COORDINATOR = "MESACLI_COORDINATOR"
ENV_NUM_PROCESSES = "MESACLI_NUM_PROCESSES"
ENV_PROCESS_ID = "MESACLI_PROCESS_ID"
ENV_WORKER = "MESACLI_WORKER"
EXIT_DISTRIBUTED = 3  # the exit code of a run stopped by a distributed fault


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins a multi-process run; ``auto``: let JAX read SLURM / MPI / TPU variables."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    init_timeout_s: int = 60  # bounded wait for the coordinator and all peers
    heartbeat_s: int = 10  # a dead peer is noticed within about this long

    def describe(self) -> str:
        if self.auto:
            return "cluster detected by JAX"
        return f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator}"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise MesaError(f"{name} must be an integer, got {value!r}") from None


def resolve_cluster(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                    cluster: str | None = None, init_timeout_s: int = 60, heartbeat_s: int = 10) -> Cluster | None:
    """The multi-process set-up from flags (first) and MESACLI_* variables; None for a single-process run."""
    if cluster not in (None, "auto"):
        raise MesaError(f"--cluster: only 'auto' is supported, got {cluster!r}")
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if init_timeout_s < 1 or heartbeat_s < 1:
        raise MesaError("--init-timeout and --heartbeat must be at least 1 second")
    if cluster == "auto":
        return Cluster(coordinator, num_processes, process_id, True, init_timeout_s, heartbeat_s)
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()) or num_processes == 1:
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise MesaError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                        f"(or MESACLI_* variables); missing {', '.join(missing)}")
    if not re.fullmatch(r"[\w.\-\[\]:]+:\d+", coordinator):
        raise MesaError(f"--coordinator must look like HOST:PORT, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise MesaError(f"--process-id must lie in [0, {num_processes}), got {process_id}")
    return Cluster(coordinator, num_processes, process_id, False, init_timeout_s, heartbeat_s)


def initialize(cluster: Cluster) -> None:
    """``jax.distributed.initialize`` (before any other JAX call); CPU collectives over gloo."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=cluster.init_timeout_s, heartbeat_timeout_seconds=cluster.heartbeat_s)
    if not cluster.auto:
        kwargs.update(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                      process_id=cluster.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as err:
        raise MesaError(f"could not start the multi-process run ({cluster.describe()}): "
                        f"{' '.join(str(err).split())[:300]}") from None


def is_primary() -> bool:
    """Process 0 writes the run directory's files, metrics, plots and progress bars."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_same_spec(spec_yaml: str) -> None:
    """Every process must run the same resolved spec: compare a hash of it across processes."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = int(hashlib.sha256(spec_yaml.encode()).hexdigest()[:7], 16)
    hashes = np.asarray(multihost_utils.process_allgather(np.array([digest], np.int32))).reshape(-1)
    if len(set(hashes.tolist())) > 1:
        differing = [i for i, h in enumerate(hashes.tolist()) if h != hashes[0]]
        raise MesaError(f"the processes were started with different specs (process 0 differs from "
                        f"process {', '.join(map(str, differing))}); start every process with the same spec and --set")


# ----------------------------------------------------------------------------- supervisor


def is_worker() -> bool:
    return os.environ.get(ENV_WORKER) == "1"


def explain_failure(log_text: str, cluster: Cluster, returncode: int) -> str:
    """One line for a worker that died: our own error line if it printed one, else the runtime's cause."""
    for line in reversed(log_text.splitlines()):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    if "RegisterTask" in log_text or "Barrier" in log_text and "DEADLINE_EXCEEDED" in log_text:
        return (f"could not reach the coordinator {cluster.coordinator or '(auto)'} or not all "
                f"{cluster.num_processes or ''} processes joined within {cluster.init_timeout_s} s")
    if any(s in log_text for s in ("another task died", "tasks have crashed", "PollForError", "heartbeat",
                                   "Gloo", "Connection closed by peer", "UNAVAILABLE")):
        return ("another process of this run stopped, so this one stopped too; "
                "the last checkpoint in the run directory is kept (run the same commands again to resume)")
    return f"the training process ended with exit code {returncode}"


def supervise(argv: list[str], cluster: Cluster) -> int:
    """Run ``mesacli <argv>`` as the worker child; returns the exit code to use, printing one line on failure."""
    log = tempfile.NamedTemporaryFile("w+", prefix=f"mesacli-process{cluster.process_id or 0}-", suffix=".log",
                                      delete=False)
    env = dict(os.environ, **{ENV_WORKER: "1"})
    child = subprocess.Popen([sys.executable, "-m", "mesacli.cli", *argv], stderr=log, env=env,
                             preexec_fn=runtime.die_with_parent)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    try:
        returncode = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        returncode = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.flush()
    text = Path(log.name).read_text(errors="replace")
    log.close()
    if returncode == 0:
        os.unlink(log.name)
        sys.stderr.write(_our_lines(text))
        return 0
    if returncode == 130:
        return 130
    message = explain_failure(text, cluster, returncode)
    sys.stderr.write(f"error: {message} (process {cluster.process_id}; full log: {log.name})\n")
    ours = any(line.startswith("error:") for line in text.splitlines())
    return returncode if ours and returncode in (1, 2) else EXIT_DISTRIBUTED


def _our_lines(text: str) -> str:
    """The child's stderr without the runtime's log noise (absl/glog lines, stack frames)."""
    keep = []
    for line in text.splitlines():
        if re.match(r"^[IWEF]\d{4} |^\s+@\s|^\*\*\* |^\[Gloo\]|^RPC:|^$", line):
            continue
        keep.append(line)
    return "".join(line + "\n" for line in keep)
