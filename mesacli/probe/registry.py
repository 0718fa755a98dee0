"""The probe analyses: one registry line each, name -> module (run and summarised in this order).

An analysis module defines ``TITLE`` (its summary.md heading), ``DESCRIPTION`` (one line), ``run(ctx) -> dict``
(the JSON written to probe/<name>.json), ``summary(result) -> list[str]`` (its markdown lines),
``headline(result) -> str`` (its row of the `mesacli probe` table) and optionally ``check_applicable(spec)``
(raises MesaError when the analysis does not apply). Adding an analysis is one module and one line here.
An analysis in ``MODEL_FREE`` also runs without a trained model (``ctx.params`` None; ``probe.run_model_free``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

ANALYSES: dict[str, str] = {
    "prop1": "mesacli.probe.prop1",
    "probes": "mesacli.probe.linprobe",
    "probes_authors": "mesacli.probe.probes_authors",
    "binding": "mesacli.probe.binding",
    "sensitivity": "mesacli.probe.sensitivity",
    "prop2": "mesacli.probe.solvers",
    "prop2_authors": "mesacli.probe.prop2_authors",  # after prop2, whose record it reads
    "prop2_best": "mesacli.probe.prop2_best",  # after prop2, whose learned solver it sets beside its floor
    "compress": "mesacli.probe.compress",
    "linearize": "mesacli.probe.linearize",
}

MODEL_FREE: tuple[str, ...] = ("prop2", "prop2_authors", "prop2_best")  # the solvers run on the task's data alone


def module(name: str) -> ModuleType:
    """The module of analysis ``name`` (imported on first use: jax-heavy analyses load only when they run)."""
    return importlib.import_module(ANALYSES[name])


def headline(name: str, result: dict) -> str:
    """The one-line key numbers of analysis ``name`` for the probe table."""
    return module(name).headline(result)
