"""Seeds in one program against separate runs: training throughput of ``train.seeds = S``.

For one spec: compile time and steady-state step time of (a) the plain run (1 seed) and (b) S seeds in
one ``vmap``-ed program; S sequential runs cost S times (a) (separate runs do not interact: each is its
own compile and its own loop).  Timings are medians over ``repeats`` blocks of ``steps`` steps.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

import jax

from mesacli.errors import MesaError
from mesacli.spec import Spec
from mesacli.train_bench import compile_step, prepare_train_step, time_calls


def _time_program(spec: Spec, steps: int, repeats: int) -> tuple[float, float]:
    """(compile + first step seconds, median seconds per step) of ``spec``'s train step."""
    prepared = prepare_train_step(spec)
    compiled, compile_s = compile_step(prepared)
    first, blocks, _ = time_calls(compiled, prepared.state, steps, repeats)
    return compile_s + first, statistics.median(blocks)


def run_seeds_bench(spec: Spec, seeds: int = 8, steps: int = 10, repeats: int = 3,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Steps/s of 1 seed, of ``seeds`` seeds in one program, and of ``seeds`` sequential runs."""
    if seeds < 2 or steps < 1 or repeats < 1:
        raise MesaError("bench-seeds needs --seeds >= 2, --steps >= 1 and --repeats >= 1")
    say = progress or (lambda message: None)
    single = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seeds=1))
    stacked = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seeds=seeds))
    say(f"{spec.name}: 1 seed")
    compile_1, step_1 = _time_program(single, steps, repeats)
    say(f"{spec.name}: {seeds} seeds in one program")
    compile_s, step_s = _time_program(stacked, steps, repeats)
    return {
        "spec": spec.name, "seeds": seeds, "batch_size": spec.train.batch_size, "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "one_seed": {"compile_s": compile_1, "step_s": step_1, "steps_per_s": 1 / step_1},
        "one_program": {"compile_s": compile_s, "step_s": step_s, "steps_per_s": 1 / step_s,
                        "replica_steps_per_s": seeds / step_s},
        "sequential_runs": {"compile_s": seeds * compile_1, "step_s": seeds * step_1,
                            "replica_steps_per_s": 1 / step_1},
        "speedup_vs_sequential": seeds * step_1 / step_s,
    }
