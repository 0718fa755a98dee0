"""Attention-kernel benchmark: speed and compiled memory of softmax (block-causal and dense), chunked linear
attention, the mesa-layer and the MesaNet op (exact, CG to a tolerance, fixed CG steps).

Everything runs in one process, and the kernels at one T are timed in interleaved rounds, so that machine
noise affects every kernel alike and cancels in the ratios.  For each kernel and
sequence length T we compile a forward function (returns the output) and a forward+backward function
(gradients of sum(out * fixed cotangent) with respect to q, k, v and, for mesa, lambda; for MesaNet with respect
to every input: q, k, v, log gamma, beta and Lambda).  Memory is the compiled executable's own estimate
(arguments + outputs + temporaries - aliased), so a configuration that would not fit is skipped before it runs.
MesaNet kernels run on flash-linear-attention's test distribution (``make_mesanet_inputs``); the CG kernels'
rows also report the forward solve's CG steps per query (mean, max) and its largest relative residual.
``fwd_gflop`` / ``fwd_bwd_gflop``: matmul FLOPs of one call counted in its jaxpr (``flops.count_flops``), so a
time ratio can be read against the work ratio (the chunked mesa-layer's forward does 3.3x the matmul FLOPs of
chunked linear attention at D = C = 64).  Shapes: B batch, T time, H heads, D head size.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mesacli import runtime
from mesacli.errors import MesaError
from mesacli.flops import count_flops

MIB = 2**20
GIB = 2**30
DTYPES = ("float32", "float64")


class Kernel(NamedTuple):
    label: str
    fn: Callable  # (*inputs, chunk_size) -> out_BTHV; default inputs (q_BTHD, k_BTHD, v_BTHD, lam_H)
    uses_lam: bool  # gradients also with respect to the inputs after q, k, v (lambda; MesaNet's gates)
    inputs: Optional[Callable] = None  # (config, T, dtype) -> (inputs, cotangent); None = make_inputs
    stats: Optional[Callable] = None  # (inputs, chunk_size) -> extra numbers of the row (CG steps)


def _softmax(q_BTHD, k_BTHD, v_BTHD, lam_H, chunk_size):
    from mesacli import layers

    return layers.softmax_attention(q_BTHD, k_BTHD, v_BTHD, chunk_size)[0]


def _softmax_dense(q_BTHD, k_BTHD, v_BTHD, lam_H, chunk_size):
    from mesacli import layers

    return layers.softmax_attention(q_BTHD, k_BTHD, v_BTHD, None)[0]


def _linear_chunked(q_BTHD, k_BTHD, v_BTHD, lam_H, chunk_size):
    from mesacli import layers

    return layers.linear_attention_chunked(q_BTHD, k_BTHD, v_BTHD, chunk_size)


def _mesa_sequential(q_BTHD, k_BTHD, v_BTHD, lam_H, chunk_size):
    """The sequential mesa-layer without forgetting: Sherman-Morrison scan for q~, then chunked linear
    attention on (q~, k, v); identical to ``mesa_sequential(...)[0]`` but without its T x T weights."""
    from mesacli import layers
    from mesacli.mesa import mesa_preconditioned_queries

    return layers.linear_attention_chunked(mesa_preconditioned_queries(q_BTHD, k_BTHD, lam_H), k_BTHD, v_BTHD,
                                           chunk_size)


def _mesa_chunked(q_BTHD, k_BTHD, v_BTHD, lam_H, chunk_size):
    from mesacli.mesa import mesa_chunked

    return mesa_chunked(q_BTHD, k_BTHD, v_BTHD, lam_H, chunk_size=chunk_size)


def make_mesanet_inputs(config: BenchConfig, t: int, dtype):
    """flash-linear-attention's MesaNet test distribution: q, v ~ U(0, 1) / 10, k = L2-normalised N(0, 1),
    gamma ~ U(0.8, 0.99) (given as log gamma), beta ~ U(0, 1), Lambda ~ U(0.25, 1) [H, D]; cotangent N(0, 1)."""
    shape_BTHD = (config.batch, t, config.heads, config.d_head)
    kq, kk, kv, kg, kb, kl, kc = jax.random.split(jax.random.PRNGKey(config.seed), 7)
    q_BTHD = jax.random.uniform(kq, shape_BTHD, dtype) / 10
    k_BTHD = jax.random.normal(kk, shape_BTHD, dtype)
    k_BTHD = k_BTHD / jnp.linalg.norm(k_BTHD, axis=-1, keepdims=True)
    v_BTHD = jax.random.uniform(kv, shape_BTHD, dtype) / 10
    log_gamma_BTH = jnp.log(jax.random.uniform(kg, shape_BTHD[:3], dtype, 0.8, 0.99))
    beta_BTH = jax.random.uniform(kb, shape_BTHD[:3], dtype)
    lam_HD = jax.random.uniform(kl, (config.heads, config.d_head), dtype, 0.25, 1.0)
    cot_BTHD = jax.random.normal(kc, shape_BTHD, dtype)
    return (q_BTHD, k_BTHD, v_BTHD, log_gamma_BTH, beta_BTH, lam_HD), cot_BTHD


def _mesanet(solver: str) -> Callable:
    def fn(q_BTHD, k_BTHD, v_BTHD, log_gamma_BTH, beta_BTH, lam_HD, chunk_size):
        from mesacli.mesanet import mesanet

        return mesanet(q_BTHD, k_BTHD, v_BTHD, log_gamma_BTH, beta_BTH, lam_HD, solver=solver, chunk_size=chunk_size)

    return fn


def _mesanet_cg_stats(solver: str) -> Callable:
    def stats(inputs, chunk_size) -> dict:
        """CG steps per query of the forward solve (mean, max) and its largest relative residual."""
        from mesacli.mesanet import mesanet_cg_stats

        run = jax.jit(lambda *a: mesanet_cg_stats(*a, solver=solver, chunk_size=chunk_size))
        out = jax.device_get(run(*inputs))
        return {"cg_steps_mean": float(out.steps_BTH.mean()), "cg_steps_max": int(out.steps_BTH.max()),
                "cg_residual_max": float(out.residual_BTH.max())}

    return stats


KERNELS: dict[str, Kernel] = {
    "softmax": Kernel("softmax (block-causal)", _softmax, False),
    "softmax_dense": Kernel("softmax (dense T x T)", _softmax_dense, False),
    "linear_chunked": Kernel("linear (chunked)", _linear_chunked, False),
    "mesa_sequential": Kernel("mesa (sequential scan)", _mesa_sequential, True),
    "mesa_chunked": Kernel("mesa (chunked)", _mesa_chunked, True),
    "mesanet_exact": Kernel("MesaNet (exact, chunked Cholesky)", _mesanet("exact"), True, make_mesanet_inputs),
    "mesanet_cg": Kernel("MesaNet (CG, tol 1e-4)", _mesanet("cg"), True, make_mesanet_inputs,
                         _mesanet_cg_stats("cg")),
    "mesanet_cg_fixed": Kernel("MesaNet (CG, 30 fixed steps)", _mesanet("cg_fixed"), True, make_mesanet_inputs,
                               _mesanet_cg_stats("cg_fixed")),
}
STAT_KEYS = ("cg_steps_mean", "cg_steps_max", "cg_residual_max")
BASELINE = "linear_chunked"


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark; ``validate`` raises MesaError on bad values."""

    batch: int = 8
    heads: int = 4
    seq_lens: tuple[int, ...] = (512, 2048, 8192)
    d_head: int = 64
    chunk_size: int = 64
    repeats: int = 5
    kernels: tuple[str, ...] = tuple(KERNELS)
    dtype: str = "float32"
    max_memory_gb: float = 8.0
    max_call_seconds: float = 60.0  # a slower warm-up call is recorded as the only timing
    seed: int = 0

    def validate(self) -> BenchConfig:
        for name in ("batch", "heads", "d_head", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MesaError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise MesaError(f"--chunk-size must be an integer >= 1, got {self.chunk_size!r}")
        if not self.seq_lens:
            raise MesaError("--seq-lens must list at least one sequence length")
        bad = [t for t in self.seq_lens if isinstance(t, bool) or not isinstance(t, int) or t < 1]
        if bad:
            raise MesaError(f"--seq-lens must be positive integers, got {bad[0]!r}")
        if not self.kernels:
            raise MesaError("--kernels must name at least one kernel")
        unknown = [k for k in self.kernels if k not in KERNELS]
        if unknown:
            raise MesaError(f"unknown kernel {unknown[0]!r} (choose from {', '.join(KERNELS)})")
        if self.dtype not in DTYPES:
            raise MesaError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.max_memory_gb > 0 and math.isfinite(self.max_memory_gb)):
            raise MesaError(f"--max-memory-gb must be a positive number, got {self.max_memory_gb!r}")
        if not self.max_call_seconds >= 0:
            raise MesaError(f"max_call_seconds must be >= 0, got {self.max_call_seconds!r}")
        return self


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'512,2048' -> (512, 2048); MesaError naming ``option`` otherwise."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise MesaError(f"{option} must be a comma-separated list of positive integers, got {text!r}")
    try:
        values = tuple(int(s) for s in items)
    except ValueError:
        raise MesaError(f"{option} must be a comma-separated list of positive integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise MesaError(f"{option} must be positive integers, got {text!r}")
    return values


def parse_names(text: str) -> tuple[str, ...]:
    """'softmax, mesa_chunked' -> ('softmax', 'mesa_chunked'), without duplicates."""
    return tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))


# ----------------------------------------------------------------------------- measuring


@dataclass
class Compiled:
    run: Callable
    mem_bytes: Optional[int]


def _compile(fn: Callable, args) -> Compiled:
    """Ahead-of-time compile; memory = arguments + outputs + temporaries - aliased (None if unknown)."""
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    mem = None
    if stats is not None:
        mem = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)
    return Compiled(compiled, mem)


def _call_ms(run: Callable, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run(*args))
    return (time.perf_counter() - start) * 1e3


def _time_interleaved(jobs: dict, repeats: int, max_call_seconds: float) -> dict:
    """Median wall time (ms) of every job, timed in interleaved rounds.

    ``jobs`` maps a key to (compiled function, args).  After one warm-up call each, every round calls every
    job once, so slow drift of the machine's speed (other processes, thermal state) affects all kernels
    at one T alike and cancels in their ratios.  A job whose warm-up call took longer than
    ``max_call_seconds`` is not repeated: its warm-up time is its timing.  Returns {key: (ms, note)}."""
    warm = {key: _call_ms(run, args) for key, (run, args) in jobs.items()}
    slow = {key for key, ms in warm.items() if ms > max_call_seconds * 1e3}
    times: dict = {key: [] for key in jobs if key not in slow}
    for _ in range(repeats):
        for key in times:
            times[key].append(_call_ms(*jobs[key]))
    out = {key: (statistics.median(ms), None) for key, ms in times.items()}
    out.update({key: (warm[key], f"one call only (warm-up took {warm[key] / 1e3:.1f} s)") for key in slow})
    return out


def make_inputs(config: BenchConfig, t: int, dtype):
    """Random q, v, cotangent ~ N(0, 1), keys ~ N(0, 1/D) (a well-conditioned mesa problem), lambda = 1."""
    shape_BTHD = (config.batch, t, config.heads, config.d_head)
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    q_BTHD = jax.random.normal(kq, shape_BTHD, dtype)
    k_BTHD = jax.random.normal(kk, shape_BTHD, dtype) / math.sqrt(config.d_head)
    v_BTHD = jax.random.normal(kv, shape_BTHD, dtype)
    cot_BTHD = jax.random.normal(kc, shape_BTHD, dtype)
    lam_H = jnp.ones((config.heads,), dtype)
    return (q_BTHD, k_BTHD, v_BTHD, lam_H), cot_BTHD


def kernel_functions(name: str, chunk_size: int):
    """(forward(*inputs) -> out, forward_backward(*inputs, cot) -> grads) for one kernel; inputs (q, k, v, lam)
    or, for MesaNet, (q, k, v, log_gamma, beta, lam)."""
    kernel = KERNELS[name]

    def forward(*inputs):
        return kernel.fn(*inputs, chunk_size)

    def loss(*inputs_and_cot):
        *inputs, cot_BTHV = inputs_and_cot
        return jnp.sum(forward(*inputs) * cot_BTHV)

    def forward_backward(*inputs_and_cot):
        n = len(inputs_and_cot) - 1
        return jax.grad(loss, argnums=tuple(range(n)) if kernel.uses_lam else (0, 1, 2))(*inputs_and_cot)

    return forward, forward_backward


def _mib(n_bytes: Optional[int]) -> Optional[float]:
    return None if n_bytes is None else n_bytes / MIB


PARTS = ("fwd", "fwd_bwd")


def bench_length(config: BenchConfig, t: int, dtype, report: Callable[[str], None]) -> list[dict]:
    """The rows of one sequence length: compile every kernel's two functions, skip those whose memory
    estimate is over the limit, then time the rest in interleaved rounds (``_time_interleaved``).  The CG
    statistics of the MesaNet CG kernels are computed before the timing."""
    limit = config.max_memory_gb * GIB
    rows, jobs, inputs = {}, {}, {}
    for name in config.kernels:
        row = rows[name] = {"kernel": name, "T": t, "fwd_ms": None, "fwd_bwd_ms": None, "fwd_mem_mib": None,
                            "fwd_bwd_mem_mib": None, "fwd_gflop": None, "fwd_bwd_gflop": None, "skipped": None,
                            "note": None, **dict.fromkeys(STAT_KEYS)}
        kernel = KERNELS[name]
        make = kernel.inputs or make_inputs
        if make not in inputs:
            inputs[make] = make(config, t, dtype)
        args, cot_BTHD = inputs[make]
        functions = dict(zip(PARTS, kernel_functions(name, config.chunk_size), strict=True))
        skipped = []
        for part, part_args in zip(PARTS, (args, (*args, cot_BTHD)), strict=True):
            report(f"T={t}: compiling {name} {part.replace('_', '+')}")
            compiled = _compile(functions[part], part_args)
            row[f"{part}_mem_mib"] = _mib(compiled.mem_bytes)
            row[f"{part}_gflop"] = count_flops(jax.make_jaxpr(functions[part])(*part_args)).matmul / 1e9
            if compiled.mem_bytes is not None and compiled.mem_bytes > limit:
                skipped.append(f"{part.replace('_', '+')} needs {compiled.mem_bytes / GIB:.1f} GiB")
            else:
                jobs[(name, part)] = (compiled.run, part_args)
        if skipped:
            row["skipped"] = f"skipped: {', '.join(skipped)} (limit {config.max_memory_gb:g} GiB)"
        elif kernel.stats is not None:
            report(f"T={t}: CG statistics of {name}")
            row.update(kernel.stats(args, config.chunk_size))
    report(f"T={t}: timing {len(jobs)} functions, {config.repeats} interleaved rounds")
    notes: dict = {name: [] for name in rows}
    for (name, part), (ms, note) in _time_interleaved(jobs, config.repeats, config.max_call_seconds).items():
        rows[name][f"{part}_ms"] = ms
        if note:
            notes[name].append(f"{part.replace('_', '+')}: {note}")
    for name, row in rows.items():
        row["note"] = "; ".join(notes[name]) or None
    return list(rows.values())


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def ratios(rows: list[dict]) -> list[dict]:
    """Per row: time, memory and matmul FLOPs relative to chunked linear attention at the same T, and for mesa_chunked
    the speed-up over mesa_sequential (sequential time / chunked time); None where a number is missing."""
    by_key = {(r["kernel"], r["T"]): r for r in rows}
    out = []
    for r in rows:
        base = by_key.get((BASELINE, r["T"]), {})
        seq = by_key.get(("mesa_sequential", r["T"]), {}) if r["kernel"] == "mesa_chunked" else {}
        out.append({
            "kernel": r["kernel"],
            "T": r["T"],
            **{f"{k}_vs_linear": _ratio(r[k], base.get(k))
               for k in ("fwd_ms", "fwd_bwd_ms", "fwd_mem_mib", "fwd_bwd_mem_mib", "fwd_gflop", "fwd_bwd_gflop")},
            "seq_over_chunked_fwd": _ratio(seq.get("fwd_ms"), r["fwd_ms"]),
            "seq_over_chunked_fwd_bwd": _ratio(seq.get("fwd_bwd_ms"), r["fwd_bwd_ms"]),
        })
    return out


def run_bench(config: BenchConfig, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Benchmark every kernel at every T; returns {"config", "rows", "ratios"} (JSON-serialisable).

    ``progress`` (optional) receives a short status message before each compile and timing step."""
    config.validate()
    x64 = jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext()
    with x64:
        dtype = jnp.dtype(config.dtype)
        report = progress or (lambda message: None)
        rows = []
        for t in config.seq_lens:
            rows.extend(bench_length(config, t, dtype, report))
    return {
        "config": {**asdict(config), "seq_lens": list(config.seq_lens), "kernels": list(config.kernels),
                   "labels": {k: KERNELS[k].label for k in config.kernels},
                   **runtime.machine()},
        "rows": rows,
        "ratios": ratios(rows),
    }
