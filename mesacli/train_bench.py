"""Training-step throughput and model FLOP utilisation of experiment specs (`mesacli bench-train`).

Per spec, the spec's own jitted training step (``train.make_train_step`` on a ("data",) mesh over every visible
device, as `mesacli train` runs it) is compiled ahead of time, called once (warm-up), then timed:

- ``s_per_step``: median over ``repeats`` blocks of the mean wall time of ``steps`` consecutive steps;
  ``cpu_s_per_step``: the same for the process CPU time (all threads), steadier on a shared machine.  The step
  includes sampling its own batch on the device (data generation), as in training; ``data_s`` times that sampling
  alone (``tasks.sample_batch`` jitted by itself, same blocks), so ``data_share = data_s / s_per_step`` estimates
  its part of the step (inside the step XLA may fuse it differently).
- ``gflops`` (the FLOPs ``mfu`` uses): matmul FLOPs of one step, counted in the step's jaxpr: 2·M·N·K per
  ``dot_general`` (forward, backward and optimiser, as autodiff wrote them), the body of a ``lax.scan`` (gradient
  micro-batches, the mesa-layer scans, chunked attention, ``fori_loop``) counted once per iteration, the larger
  branch of a ``cond``.  The batch's data generation is excluded (its matmul FLOPs are ``data_gflops``).  A
  ``while_loop`` of unknown trip count would be counted once (``unknown_trip_loops`` says how many there are);
  LAPACK-style ops (QR of the random teachers) are not counted, only listed (``uncounted_ops``).
- ``forward_gflops``: the same count for the loss alone on the full batch (a training step costs about 3 of
  them: the analytic check); ``elementwise_gflops``: float element-wise and reduction ops of the
  step, 1 FLOP per element (not in ``mfu``); ``xla_gflops``: XLA's own ``cost_analysis()`` of the compiled step,
  all ops but every loop body counted once, so it undercounts scans (a micro-batched step by the number of
  micro-batches).
- ``mfu = gflops / s_per_step / matmul_gflops``, where ``matmul_gflops`` is the rate of an N x N float32 matmul
  (jitted, default precision) measured in the same process, ``repeats`` calls before and ``repeats`` after the
  specs (the median of all; both halves are reported, so drift of a shared machine shows).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mesacli.errors import MesaError
from mesacli.flops import count_flops
from mesacli.spec import Spec

FLOPS_METHOD = ("jaxpr matmul count: 2*M*N*K per dot_general of the jitted train step (forward + backward + "
                "optimiser), scan bodies once per iteration, data generation excluded")
MFU_DEFINITION = "gflops / s_per_step / matmul_gflops (model matmul FLOP/s over a measured N x N float32 matmul)"

# ----------------------------------------------------------------------------- timing


def time_calls(call: Callable[[Any], tuple[Any, Any]], carry: Any, steps: int, repeats: int,
               cpu_blocks: list[float] | None = None) -> tuple[float, list[float], Any]:
    """(seconds of one warm-up call, per block the mean seconds per call, final carry): ``call(carry) ->
    (carry, out)`` is called once, then ``repeats`` blocks of ``steps`` calls, each block waited for to the end.
    ``cpu_blocks``, if given, receives per block the mean process CPU seconds per call (all threads)."""
    t0 = time.perf_counter()
    carry, out = call(carry)
    jax.block_until_ready((carry, out))
    first = time.perf_counter() - t0
    blocks = []
    for _ in range(repeats):
        outs = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            carry, out = call(carry)
            outs.append(out)
        jax.block_until_ready((carry, outs))
        blocks.append((time.perf_counter() - t0) / steps)
        if cpu_blocks is not None:
            cpu_blocks.append((time.process_time() - cpu0) / steps)
    return first, blocks, carry


@dataclasses.dataclass
class PreparedStep:
    """A spec's jitted training step and the initial state it takes (not compiled yet)."""

    spec: Spec
    jitted: Callable  # train.make_train_step's jitted function: state -> (state, metrics)
    state: dict
    micro_batch: int | None = None  # the step's micro-batch (train.step_micro_batch: the spec's, else automatic)
    replica_group: int = 1  # replicas whose gradients are computed together (train.step_replica_group)


def prepare_train_step(spec: Spec, replica_group: int | None = None) -> PreparedStep:
    """``spec``'s training step as `mesacli train` builds it: a mesh over every device (replicas for
    ``train.seeds``), the initial state, the jitted step (``replica_group``: see ``train.make_train_step``; default
    automatic, as training uses)."""
    from mesacli.sharding import check_batch_divides, make_mesh
    from mesacli.state import init_state
    from mesacli.train import make_train_step, step_micro_batch, step_replica_group

    mesh = make_mesh(replicas=spec.train.seeds)
    check_batch_divides(spec.train.batch_size, mesh)
    if spec.train.micro_batch is not None:
        check_batch_divides(spec.train.micro_batch, mesh, "train.micro_batch")
    group = min(replica_group or step_replica_group(spec, mesh), spec.train.seeds)
    return PreparedStep(spec, make_train_step(spec, mesh, group), init_state(spec, mesh),
                        step_micro_batch(spec, mesh), group)


def compile_step(prepared: PreparedStep) -> tuple[Any, float]:
    """(the step compiled ahead of time, seconds of lowering + XLA compile)."""
    t0 = time.perf_counter()
    compiled = prepared.jitted.lower(prepared.state).compile()
    return compiled, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the parts of one spec


def _sampler(spec: Spec) -> Callable:
    """step -> the batches of every replica of that step, exactly as the train step samples them."""
    from mesacli import rundir, tasks

    seeds = jnp.array(rundir.replica_seeds(spec.train))

    def sample(step):
        return jax.vmap(lambda s: tasks.sample_batch(tasks.data_key(s, step), spec, spec.train.batch_size))(seeds)

    return sample


def step_flops(prepared: PreparedStep) -> dict:
    """The FLOP counts of one training step (GFLOP; see the module docstring), from jaxprs only (no compile):
    ``gflops`` (matmul, data generation excluded), ``forward_gflops``, ``data_gflops``, ``elementwise_gflops``,
    ``unknown_trip_loops``, ``uncounted_ops``."""
    from mesacli.train import loss_fn

    spec = prepared.spec
    step = count_flops(jax.make_jaxpr(prepared.jitted)(prepared.state))
    sample = _sampler(spec)
    data = count_flops(jax.make_jaxpr(sample)(jnp.int32(0)))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),  # one replica's batch
                         jax.eval_shape(sample, jnp.int32(0)))
    params = prepared.state["params"]
    if spec.train.seeds > 1:
        params = jax.tree.map(lambda x: x[0], params)
    forward = count_flops(jax.make_jaxpr(lambda p, b: loss_fn(p, b, spec))(params, batch)).matmul * spec.train.seeds
    return {"gflops": (step.matmul - data.matmul) / 1e9, "forward_gflops": forward / 1e9,
            "data_gflops": data.matmul / 1e9, "elementwise_gflops": step.elementwise / 1e9,
            "unknown_trip_loops": step.unknown_trip_loops,
            "uncounted_ops": {k: round(v) for k, v in sorted(step.uncounted.items())}}


def _xla_flops(compiled: Any) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # one dict per device program in some jax versions
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return None if flops is None or flops < 0 else float(flops)


def bench_spec(spec: Spec, steps: int, repeats: int, report: Callable[[str], None]) -> dict:
    """One row of `bench-train` (see the module docstring); ``mfu`` is None until the matmul rate is known."""
    from mesacli.memory import compiled_bytes
    from mesacli.model import count_params

    report(f"{spec.name}: compiling the train step")
    prepared = prepare_train_step(spec)
    compiled, compile_s = compile_step(prepared)
    flops = step_flops(prepared)
    report(f"{spec.name}: timing {repeats} x {steps} steps")
    cpu_blocks: list[float] = []
    first_s, blocks, _ = time_calls(compiled, prepared.state, steps, repeats, cpu_blocks)
    report(f"{spec.name}: timing its data generation alone")
    step0 = jnp.int32(0)
    sample = jax.jit(_sampler(spec)).lower(step0).compile()
    _, data_blocks, _ = time_calls(lambda c: (c, sample(c)), step0, steps, repeats)
    s_per_step, data_s = statistics.median(blocks), statistics.median(data_blocks)
    mem, xla, t = compiled_bytes(compiled), _xla_flops(compiled), spec.train
    return {
        "spec": spec.name, "batch_size": t.batch_size, "seq_len": spec.task.seq_len,
        "micro_batch": prepared.micro_batch,
        "micro_batch_auto": t.micro_batch is None and prepared.micro_batch is not None,
        "seeds": t.seeds, "replica_group": prepared.replica_group,
        "params": count_params(prepared.state["params"]) // t.seeds,
        "layers": spec.model.layers, "attention": spec.model.attention,
        "compile_s": compile_s, "first_step_s": first_s,
        "s_per_step": s_per_step, "steps_per_s": 1 / s_per_step, "block_s_per_step": blocks,
        "cpu_s_per_step": statistics.median(cpu_blocks),
        "data_s": data_s, "data_share": data_s / s_per_step,
        **flops,
        "xla_gflops": None if xla is None else xla / 1e9,
        "gflops_per_s": flops["gflops"] / s_per_step, "mfu": None,
        "memory_mib": None if mem is None else mem / 2**20,
        "flops_method": "jaxpr matmul count",
    }


# ----------------------------------------------------------------------------- the matmul yardstick


def matmul_seconds(n: int, calls: int) -> list[float]:
    """Seconds of each of ``calls`` timed calls (after one warm-up) of a jitted N x N float32 matmul."""
    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.float32)
    run = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(run(a, b))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(run(a, b))
        times.append(time.perf_counter() - t0)
    return times


def _gflops_of(n: int, seconds: Sequence[float]) -> float:
    return 2.0 * n**3 / statistics.median(seconds) / 1e9


# ----------------------------------------------------------------------------- the command


def _environment() -> dict:
    import jaxlib

    from mesacli import runtime

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **runtime.machine(),
        "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jaxlib": jaxlib.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
    }


def bench_train(specs: Sequence[Spec], *, steps: int = 5, repeats: int = 3, matmul_size: int = 2048,
                progress: Callable[[str], None] | None = None) -> dict:
    """Seconds per training step, model FLOPs per step and mfu of every spec (see the module docstring); returns
    {"matmul_gflops", "matmul", "rows", "flops_method", "mfu_definition", environment...} (JSON-serialisable)."""
    if steps < 1 or repeats < 1 or matmul_size < 1:
        raise MesaError("bench-train needs --steps >= 1, --repeats >= 1 and --matmul-size >= 1")
    if not specs:
        raise MesaError("bench-train needs at least one spec")
    report = progress or (lambda message: None)
    env = _environment()
    report(f"float32 matmul {matmul_size} x {matmul_size}: timing {repeats} call(s)")
    before = matmul_seconds(matmul_size, repeats)
    rows = [bench_spec(spec, steps, repeats, report) for spec in specs]
    report(f"float32 matmul {matmul_size} x {matmul_size}: timing {repeats} call(s) again")
    after = matmul_seconds(matmul_size, repeats)
    rate = _gflops_of(matmul_size, before + after)
    for row in rows:
        row["mfu"] = row["gflops_per_s"] / rate
    return {
        "matmul_gflops": rate,
        "matmul": {"n": matmul_size, "dtype": "float32", "calls": 2 * repeats,
                   "gflops_before": _gflops_of(matmul_size, before), "gflops_after": _gflops_of(matmul_size, after)},
        "steps": steps, "repeats": repeats,
        "flops_method": FLOPS_METHOD, "mfu_definition": MFU_DEFINITION,
        **env,
        "rows": rows,
    }
