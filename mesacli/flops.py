"""Counting a function's FLOPs from its jaxpr (what `bench` and `bench-train` report as GFLOP).

``count_flops(jax.make_jaxpr(f)(*args))``: 2·M·N·K per ``dot_general`` (matmuls, einsums, batched products),
1 per element of a float element-wise or reduction op; a ``scan`` body counted once per iteration (XLA's own
``cost_analysis`` counts loop bodies once), the costlier branch of a ``cond``, a ``while`` body once (listed in
``unknown_trip_loops``); LAPACK-style ops are listed in ``uncounted``, not counted.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

# float element-wise and reduction primitives, 1 FLOP per element of their largest operand or result
ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "exp", "exp2", "expm1", "log", "log1p", "tanh",
    "logistic", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "square", "sin", "cos", "erf", "erfc", "erf_inv",
    "atan2", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "cumsum", "cumprod", "cummax", "cummin",
    "cumlogsumexp", "add_any",
})
UNCOUNTED = frozenset({"qr", "geqrf", "householder_product", "lu", "cholesky", "triangular_solve", "eigh", "eig",
                       "svd", "schur", "hessenberg", "tridiagonal", "tridiagonal_solve", "custom_linear_solve"})


@dataclasses.dataclass
class FlopCount:
    """FLOPs of one call of a jaxpr: matmul (dot_general), float element-wise, and what was not counted."""

    matmul: float = 0.0
    elementwise: float = 0.0
    unknown_trip_loops: int = 0  # while_loop bodies counted once (trip count unknown when tracing)
    uncounted: dict = dataclasses.field(default_factory=dict)  # primitive name -> calls per step

    def add(self, other: FlopCount, times: float = 1) -> None:
        self.matmul += times * other.matmul
        self.elementwise += times * other.elementwise
        self.unknown_trip_loops += other.unknown_trip_loops
        for name, calls in other.uncounted.items():
            self.uncounted[name] = self.uncounted.get(name, 0) + times * calls


def _size(var) -> int:
    return math.prod(getattr(var.aval, "shape", ()) or (1,))


def _is_float(var) -> bool:
    dtype = getattr(var.aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def count_flops(jaxpr) -> FlopCount:
    """FLOPs of one call of ``jaxpr`` (a Jaxpr or ClosedJaxpr, e.g. ``jax.make_jaxpr(f)(*args)``): 2·M·N·K per
    ``dot_general``, 1 per element of a float element-wise or reduction op; sub-jaxprs (jit, custom_jvp/vjp,
    remat, shard_map) once, a ``scan`` body ``length`` times, a ``cond`` its costliest branch, a ``while`` body
    once (counted in ``unknown_trip_loops``)."""
    from jax.extend.core import jaxprs_in_params

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = FlopCount()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total.matmul += 2.0 * _size(eqn.outvars[0]) * math.prod(lhs_shape[d] for d in lhs_contract)
        elif name in ELEMENTWISE:
            if any(_is_float(v) for v in eqn.outvars):
                total.elementwise += max(_size(v) for v in [*eqn.invars, *eqn.outvars])
        elif name in UNCOUNTED:
            total.uncounted[name] = total.uncounted.get(name, 0) + 1
        subs = list(jaxprs_in_params(eqn.params))
        if name == "cond":
            counts = [count_flops(sub) for sub in subs]
            total.add(max(counts, key=lambda c: (c.matmul, c.elementwise)))
            continue
        if name == "while":
            total.unknown_trip_loops += 1
        times = eqn.params["length"] if name == "scan" else 1
        for sub in subs:
            total.add(count_flops(sub), times)
    return total
