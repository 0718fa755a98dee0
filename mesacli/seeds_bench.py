"""Seeds in one program against separate runs: training throughput of ``train.seeds = S``.

For one spec: compile time and steady-state step time of (a) the plain run (1 seed) and (b) S seeds in
one program; S sequential runs cost S times (a) (separate runs do not interact: each is its own compile and
its own loop).  After the compiles and a warm-up step each, the two programs are timed in ``repeats``
interleaved rounds of ``steps`` steps each (so that the drift of a shared machine hits both alike), in wall
time and in process CPU time (``time.process_time``, all threads: the steadier measure on a busy machine);
medians over the rounds.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax

from mesacli.errors import MesaError
from mesacli.spec import Spec
from mesacli.train_bench import compile_step, prepare_train_step


def _timed_steps(compiled, state, steps: int) -> tuple[float, float, dict]:
    """(wall s per step, CPU s per step, state) of ``steps`` consecutive steps, waited for to the end."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = compiled(state)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps, state


def run_seeds_bench(spec: Spec, seeds: int = 8, steps: int = 10, repeats: int = 3,
                    progress: Callable[[str], None] | None = None, replica_group: int | None = None) -> dict:
    """Steps/s (wall) and CPU s per step of 1 seed, of ``seeds`` seeds in one program, and of ``seeds`` sequential
    runs.  ``replica_group``: the S-seed program's (``train.make_train_step``; default automatic, as training uses;
    S vmaps every replica at once, the program before issue 20's CPU rule)."""
    if seeds < 2 or steps < 1 or repeats < 1:
        raise MesaError("bench-seeds needs --seeds >= 2, --steps >= 1 and --repeats >= 1")
    if replica_group is not None and (replica_group < 1 or seeds % replica_group):
        raise MesaError(f"bench-seeds: --replica-group ({replica_group}) must divide --seeds ({seeds})")
    say = progress or (lambda message: None)
    single = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seeds=1))
    stacked = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seeds=seeds))
    programs = []
    for label, variant, group in (("1 seed", single, None), (f"{seeds} seeds in one program", stacked, replica_group)):
        say(f"{spec.name}: compiling {label}")
        prepared = prepare_train_step(variant, group)
        compiled, compile_s = compile_step(prepared)
        t0 = time.perf_counter()
        state, _ = compiled(prepared.state)  # warm-up
        jax.block_until_ready(state)
        programs.append({"prepared": prepared, "compiled": compiled, "state": state, "wall": [], "cpu": [],
                         "compile_s": compile_s + time.perf_counter() - t0})
    say(f"{spec.name}: timing {repeats} interleaved rounds of {steps} steps")
    for _ in range(repeats):
        for p in programs:
            wall, cpu, p["state"] = _timed_steps(p["compiled"], p["state"], steps)
            p["wall"].append(wall)
            p["cpu"].append(cpu)
    one, many = ({"compile_s": p["compile_s"], "step_s": statistics.median(p["wall"]),
                  "cpu_s": statistics.median(p["cpu"]), "micro_batch": p["prepared"].micro_batch,
                  "round_cpu_s": p["cpu"]} for p in programs)
    one["steps_per_s"] = 1 / one["step_s"]
    many.update(steps_per_s=1 / many["step_s"], replica_steps_per_s=seeds / many["step_s"],
                cpu_s_per_replica=many["cpu_s"] / seeds, replica_group=programs[1]["prepared"].replica_group)
    return {
        "spec": spec.name, "seeds": seeds, "batch_size": spec.train.batch_size, "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "one_seed": one,
        "one_program": many,
        "sequential_runs": {"compile_s": seeds * one["compile_s"], "step_s": seeds * one["step_s"],
                            "replica_steps_per_s": 1 / one["step_s"]},
        "speedup_vs_sequential": seeds * one["step_s"] / many["step_s"],
        "speedup_vs_sequential_cpu": seeds * one["cpu_s"] / many["cpu_s"],
    }
