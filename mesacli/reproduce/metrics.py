"""Metric names of the ledger and how each is read from the records of a run directory.

A metric names one number (or one yes/no property) of the records that `mesacli eval`, `probe`, `icl-eval`
(and the model-free analyses of `reproduce run`, ``solver:<analysis>``) write into a run directory::

    eval.seq_avg  eval.t<N>  eval.<gd1|ridge>.<seq_avg|t<N>>                     eval_step<S>.json (latest S)
    eval_authors.<...>: as eval.<...>, on the authors' test sequences            eval_authors_step<S>.json
    probe.<target|precond|current>.layer<L|last>.t<N>   probe.target.t<N>.falls   probe/probes.json
    probe_authors.<as probe.<target|precond|current>...>: on the authors' data      probe/probes_authors.json
    probe.token.t<N>                                                             probe/binding.json
    probe.linearize.layer<L>                                                     probe/linearize.json
    probe.prop2.<model|chebyshev|gd1|ridge>.<seq_avg|t<N>>                       probe/prop2.json
    solver.prop2.<concat|mlp|naive>.<seq_avg|t<N>>                                solver/prop2.json (no model)
    probe.prop2_authors.<...>, solver.prop2_authors.<...>: as probe.prop2.<...>, solver.prop2.<...>, on the
        authors' test sequences                                        probe/prop2_authors.json, solver/...
    probe.prop2_best.<seq_avg|t<N>>: the best k-step solver in closed form  probe/prop2_best.json
    probe.prop2_best_authors.<...>: the same, on the authors' test sequences   (solver.<...>: solver/...)
    probe.compress.<model|compressed>.seq_avg                                    probe/compress.json
    icl.<plain|eos|tuned|ar_lsq|lsq|gd1>.i<N>   icl.<plain|eos|tuned>.falls      icl_eval_*.json
    icl_continual.<plain|eos|tuned>.i<N>   icl_continual.<...>.rebounds        icl_eval_*_continual.json

t<N> is the position (1-based), i<N> the example, layer 0 the input.  ``read`` returns a ``Reading``: the value and
the checkpoint step of the record it came from (None, None when the record is not there yet).

A check (a claim of the paper) compares operands: ``A < B``, ``A < 0.5 * B``, ``A ~ B`` (within the entry's
tolerance) or a boolean metric ``A``; an operand is ``[spec:]metric`` or a number.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mesacli.errors import MesaError
from mesacli.probe import prop2_best
from mesacli.probe.common import LSTSQ_CUTOFF
from mesacli.rundir import PROBE_DIR, SOLVER_DIR, eval_record_steps


@dataclasses.dataclass(frozen=True)
class MetricRef:
    spec: str | None  # None: the entry's spec
    metric: str

    def on(self, default_spec: str) -> MetricRef:
        return MetricRef(self.spec or default_spec, self.metric)

    def __str__(self) -> str:
        return f"{self.spec}:{self.metric}" if self.spec else self.metric


@dataclasses.dataclass(frozen=True)
class Reading:
    value: float | bool | None  # of a run of several seeds (train.seeds > 1): the value of their mean curve
    step: int | None  # checkpoint step of the record
    per_seed: tuple[float | None, ...] | None = None  # the value of every seed's own curve, when the record has them


@dataclasses.dataclass(frozen=True)
class Metric:
    text: str
    analysis: str  # eval | probe:<name> | icl | icl_continual: what writes its record
    read: Callable[[Path], Reading]


MISSING = Reading(None, None)


def fmt_value(value) -> str:
    """A metric value for a table: 3 significant digits (2 after the point below 1e-3), yes / no, '–' if none."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pick(mapping: dict, prefix: str) -> Any:
    """The value of the first key that starts with ``prefix`` (record keys carry parameters, e.g. 'GD-1 (eta=..)')."""
    for key, value in mapping.items():
        if key.startswith(prefix):
            return value
    return None


def _at(curve, position: str) -> float | None:
    """'seq_avg' -> the mean of the curve; 't20' / 'i20' -> its 20th value."""
    if curve is None:
        return None
    if position == "seq_avg":
        return float(np.mean(curve))
    index = int(position[1:]) - 1
    return float(curve[index]) if 0 <= index < len(curve) else None


# ----------------------------------------------------------------------------- eval records


def latest_eval_record(run_dir: Path, test_set: str = "ours") -> dict | None:
    """The eval record of the latest checkpoint step in ``run_dir`` (`mesacli eval [--test-set authors]`)."""
    found = eval_record_steps(run_dir, test_set)
    return load_record(found[max(found)]) if found else None


def _eval_reader(baseline: str | None, position: str, test_set: str = "ours") -> Callable[[Path], Reading]:
    def read(run_dir: Path) -> Reading:
        record = latest_eval_record(run_dir, test_set)
        if record is None:
            return MISSING
        if baseline is not None:
            curve = pick(record.get("baselines", {}), {"gd1": "GD-1", "ridge": "ridge"}[baseline])
            return Reading(_at(curve, position), record.get("step"))
        seeds = record.get("per_seed")  # train.seeds > 1: {seed: {"per_position_loss": ...}}
        per_seed = None if not seeds else tuple(_at(r["per_position_loss"], position) for r in seeds.values())
        return Reading(_at(record["per_position_loss"], position), record.get("step"), per_seed)
    return read


# ----------------------------------------------------------------------------- probe records

PROBE_TARGETS = {"target": "next", "precond": "precond", "current": "current"}
PROBES_RECORDS = {"probe": "probes", "probe_authors": "probes_authors"}  # metric prefix -> the linear probes' record
PROP2_KEYS = {"model": "model", "chebyshev": "Chebyshev", "gd1": "GD-1", "ridge": "exact ridge"}
COMPRESS_KEYS = {"model": "model", "compressed": "compressed"}


def probe_record(run_dir: Path, name: str, folder: str = PROBE_DIR) -> dict | None:
    """probe/<name>.json of a run, or with folder=SOLVER_DIR the record of the analysis run without a model."""
    return load_record(Path(run_dir) / folder / f"{name}.json")


def _probe_reader(name: str, value: Callable[[dict], Any], folder: str = PROBE_DIR) -> Callable[[Path], Reading]:
    def read(run_dir: Path) -> Reading:
        record = probe_record(run_dir, name, folder)
        if record is None:
            return MISSING
        if not probe_record_current(name, record):  # an older probe definition: not measured
            return Reading(None, record.get("step"))
        try:
            return Reading(value(record), record.get("step"))
        except (KeyError, IndexError, ValueError, TypeError):
            return Reading(None, record.get("step"))
    return read


def probe_record_current(name: str, record: dict) -> bool:
    """Whether a probe record follows the paper's definitions: least-squares probes that cut float32 round-off
    (probes, binding), the preconditioning probe's target through the paper's learned Chebyshev inverse
    (``--precond auto`` on the ledger's tasks, not the exact solve) with the coefficients [C] learned for the
    task's token format (``precond_coefficients``; before, the raw-token set on every task), and a PE layer
    linearised with its positional encodings.  Older records are made again."""
    if name in ("probes", "probes_authors", "binding") and record.get("lstsq_cutoff") != LSTSQ_CUTOFF:
        return False
    if name == "linearize" and record.get("pe_layer_replacement") != "linear_pe":
        return False  # before, a PE layer's replacement lost its positional encodings
    return name not in ("probes", "probes_authors") or (record.get("precond") == "chebyshev"
                                                        and bool(record.get("precond_coefficients")))


def variant_curve(record: dict, variant: str) -> list[float]:
    """The test-loss curve of one Prop-2 baseline of a partially observed / nonlinear task (probe.solvers)."""
    return record["per_position_loss"][record["variants"][variant]["curve"]]


def _layers_at(record: dict, target: str, position: int) -> list[float]:
    per_layer = pick(record["mse"], PROBE_TARGETS[target])
    return [float(curve[position - 1]) for curve in per_layer]


def _strictly_falling(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:], strict=False))


# ----------------------------------------------------------------------------- icl records

ICL_LABELS = {"plain": "model (plain)", "eos": "model (EOS)", "tuned": "model (EOS+prefix)",
              "ar_lsq": "AR ridge LSQ", "lsq": "ridge LSQ on (x, y)", "gd1": "GD-1 on (x, y)"}


def icl_record(run_dir: Path, label: str, continual: bool) -> dict | None:
    """The newest icl_eval_*.json of the latest model step (no --step) with a curve ``label``."""
    candidates = []
    for path in Path(run_dir).glob("icl_eval_*.json"):
        record = load_record(path)
        if not record or "meta" not in record:
            continue
        meta = record["meta"]
        if bool(meta.get("continual_switch_at")) != continual or meta.get("step_given"):
            continue
        if pick(record["curves"], label) is not None:
            candidates.append((path.stat().st_mtime, path.name, record))
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None


def curve_falls(curve: list[float]) -> bool:
    """The loss falls with the examples: the last example below half the first, and the last quarter's mean
    below the first quarter's (an early-ascent bump is allowed)."""
    quarter = max(1, len(curve) // 4)
    return curve[-1] < 0.5 * curve[0] and float(np.mean(curve[-quarter:])) < float(np.mean(curve[:quarter]))


def curve_rebounds(curve: list[float], switch_at: int) -> bool:
    """Continual task: the loss falls until the switch (example ``switch_at`` below half of example 1), jumps
    after it (example switch_at + 1 above twice example switch_at), then falls again (the last below half the
    jump)."""
    before, after = curve[switch_at - 1], curve[switch_at]
    return before < 0.5 * curve[0] and after > 2 * before and curve[-1] < 0.5 * after


def _icl_reader(kind: str, what: str, continual: bool) -> Callable[[Path], Reading]:
    label = ICL_LABELS[kind]

    def read(run_dir: Path) -> Reading:
        record = icl_record(run_dir, label, continual)
        if record is None:
            return MISSING
        curve = pick(record["curves"], label)["mean"]
        if what == "falls":
            value = curve_falls(curve)
        elif what == "rebounds":
            value = curve_rebounds(curve, int(record["meta"]["continual_switch_at"]))
        else:
            value = _at(curve, what)
        return Reading(value, record["meta"].get("step"))
    return read


# ----------------------------------------------------------------------------- the grammar

_POS = r"(seq_avg|t\d+)"
_RULES: list[tuple[str, Callable[[re.Match], tuple[str, Callable[[Path], Reading]]]]] = [
    (r"eval\.(seq_avg|t\d+)", lambda m: ("eval", _eval_reader(None, m[1]))),
    (rf"eval\.(gd1|ridge)\.{_POS}", lambda m: ("eval", _eval_reader(m[1], m[2]))),
    (rf"eval_authors\.(?:(gd1|ridge)\.)?{_POS}", lambda m: ("eval_authors", _eval_reader(m[1], m[2], "authors"))),
    (r"(probe|probe_authors)\.(target|precond|current)\.layer(\d+|last)\.t(\d+)", lambda m: (
        f"probe:{PROBES_RECORDS[m[1]]}", _probe_reader(
            PROBES_RECORDS[m[1]], lambda r: _layers_at(r, m[2], int(m[4]))[-1 if m[3] == "last" else int(m[3])]))),
    (r"(probe|probe_authors)\.target\.t(\d+)\.falls", lambda m: (f"probe:{PROBES_RECORDS[m[1]]}", _probe_reader(
        PROBES_RECORDS[m[1]], lambda r: _strictly_falling(_layers_at(r, "target", int(m[2])))))),
    (r"probe\.token\.t(\d+)", lambda m: ("probe:binding", _probe_reader(
        "binding", lambda r: float(r["token_probe_mse"][r["t_prime"].index(int(m[1]))])))),
    (r"probe\.linearize\.layer(\d+)", lambda m: ("probe:linearize", _probe_reader(
        "linearize", lambda r: float(r["ratio"][int(m[1]) - 1]) if int(m[1]) >= 1 else None))),
    (rf"probe\.(prop2|prop2_authors)\.(model|chebyshev|gd1|ridge)\.{_POS}", lambda m: (f"probe:{m[1]}", _probe_reader(
        m[1], lambda r: _at(pick(r["per_position_loss"], PROP2_KEYS[m[2]]), m[3])))),
    (rf"solver\.(prop2|prop2_authors)\.(concat|mlp|naive)\.{_POS}", lambda m: (f"solver:{m[1]}", _probe_reader(
        m[1], lambda r: _at(variant_curve(r, m[2]), m[3]), SOLVER_DIR))),
    (rf"(probe|solver)\.prop2_best(_authors)?\.{_POS}", lambda m: (f"{m[1]}:prop2_best", _probe_reader(
        "prop2_best", lambda r: _at(r["per_position_loss"][prop2_best.AUTHORS if m[2] else prop2_best.OURS], m[3]),
        PROBE_DIR if m[1] == "probe" else SOLVER_DIR))),
    (r"probe\.compress\.(model|compressed)\.seq_avg", lambda m: ("probe:compress", _probe_reader(
        "compress", lambda r: _at(pick(r["per_position_loss"], COMPRESS_KEYS[m[1]]), "seq_avg")))),
    (r"icl\.(plain|eos|tuned|ar_lsq|lsq|gd1)\.(i\d+)", lambda m: ("icl", _icl_reader(m[1], m[2], False))),
    (r"icl\.(plain|eos|tuned)\.falls", lambda m: ("icl", _icl_reader(m[1], "falls", False))),
    (r"icl_continual\.(plain|eos|tuned)\.(i\d+)", lambda m: ("icl_continual", _icl_reader(m[1], m[2], True))),
    (r"icl_continual\.(plain|eos|tuned)\.rebounds",
     lambda m: ("icl_continual", _icl_reader(m[1], "rebounds", True))),
]
BOOLEAN_SUFFIXES = (".falls", ".rebounds")
# a metric -> the same metric on the authors' test sequences (``tasks.authors_test_batches``), by name prefix
AUTHORS_TWINS = {"eval.": "eval_authors.", "probe.prop2.": "probe.prop2_authors.",
                 "solver.prop2.": "solver.prop2_authors.", "probe.prop2_best.": "probe.prop2_best_authors.",
                 "solver.prop2_best.": "solver.prop2_best_authors.", "probe.target.": "probe_authors.target.",
                 "probe.precond.": "probe_authors.precond.", "probe.current.": "probe_authors.current."}


def authors_twin(text: str) -> str | None:
    """The name of metric ``text`` measured on the authors' test sequences (eval.t50 -> eval_authors.t50,
    probe.prop2.chebyshev.t50 -> probe.prop2_authors.chebyshev.t50), or None where there is no such metric."""
    return next((twin + text.removeprefix(prefix) for prefix, twin in AUTHORS_TWINS.items()
                 if text.startswith(prefix)), None)


def parse_metric(text: str, where: str = "") -> Metric:
    """The metric named ``text``; a MesaError names the grammar when it does not parse."""
    for pattern, build in _RULES:
        match = re.fullmatch(pattern, text or "")
        if match:
            analysis, read = build(match)
            return Metric(text, analysis, read)
    prefix = f"{where}: " if where else ""
    raise MesaError(f"{prefix}unknown metric '{text}' (see mesacli/reproduce/metrics.py for the names)")


def is_boolean(text: str) -> bool:
    return text.endswith(BOOLEAN_SUFFIXES)


# ----------------------------------------------------------------------------- checks


@dataclasses.dataclass(frozen=True)
class Check:
    """``left op factor * right``; op None: ``left`` is a boolean metric."""

    text: str
    left: MetricRef | float
    op: str | None = None
    factor: float = 1.0
    right: MetricRef | float | None = None

    def refs(self) -> list[MetricRef]:
        return [x for x in (self.left, self.right) if isinstance(x, MetricRef)]


def _operand(text: str, check: str) -> MetricRef | float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    spec, _, metric = text.rpartition(":")
    parse_metric(metric, f"check '{check}'")
    return MetricRef(spec or None, metric)


def parse_check(text: str) -> Check:
    """``A < B``, ``A < 0.5 * B``, ``A ~ B`` or a boolean metric ``A``."""
    match = re.fullmatch(r"\s*(\S+)\s*(<|>|~)\s*(?:([0-9.eE+-]+)\s*\*\s*)?(\S+)\s*", text)
    if match:
        left, op, factor, right = match.groups()
        return Check(text, _operand(left, text), op, float(factor) if factor else 1.0, _operand(right, text))
    left = _operand(text, text)
    if not isinstance(left, MetricRef) or not is_boolean(left.metric):
        raise MesaError(f"check '{text}': expected 'A < B', 'A < 0.5 * B', 'A ~ B' or a yes/no metric "
                        f"(ending in {' or '.join(BOOLEAN_SUFFIXES)})")
    return Check(text, left)


def evaluate_check(check: Check, value_of: Callable[[MetricRef], float | bool | None],
                   tolerance: float) -> bool | None:
    """True / False, or None while an operand has no record yet."""
    def value(operand):
        return operand if isinstance(operand, float) else value_of(operand)

    left = value(check.left)
    if check.op is None:
        return None if left is None else bool(left)
    right = value(check.right)
    if left is None or right is None:
        return None
    right = check.factor * right
    if check.op == "<":
        return bool(left < right)
    if check.op == ">":
        return bool(left > right)
    return bool(abs(left - right) <= tolerance * abs(right))
