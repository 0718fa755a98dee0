"""`mesacli reproduce report`: results/REPORT.md and its figures, from the committed records alone.

Per paper figure: a table of every entry (paper, ours, ratio, within tolerance or the claim holds, state) and
plots of our curves with the paper's values as markers: per-position test loss (eval and Prop-2 entries), probe
error across layers (probe entries), label loss per example (few-shot entries).  A miss is written as a miss.
"""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

from mesacli.reproduce import metrics
from mesacli.reproduce.metrics import fmt_value
from mesacli.reproduce.status import RESULTS_DIR, EntryStatus
from mesacli.rundir import SOLVER_DIR

REPORT_FILE = "REPORT.md"
FIGURES_DIR = "figures"


def verdict(status: EntryStatus) -> str:
    """'within' / 'MISS' (numbers), 'holds' / 'FAILS' (claims), 'not measured' (no record yet)."""
    if status.within is None:
        return "not measured"
    if status.entry.is_claim:
        return "holds" if status.within else "**FAILS**"
    return "within" if status.within else "**MISS**"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _matching(rows: list[EntryStatus], pattern: str):
    """(entry, groups of ``pattern``) for every number entry whose metric matches it."""
    for row in rows:
        match = re.fullmatch(pattern, row.entry.metric or "")
        if match:
            yield row.entry, match.groups()


def _position_figure(rows: list[EntryStatus], results_dir: Path, path: Path, figure: str) -> Path | None:
    """Per-position test loss of every spec an eval/Prop-2 entry of the figure reads, paper values as markers."""
    from mesacli import plots

    curves, points, dashed = {}, {}, []
    pattern = (r"(eval|probe\.prop2|solver\.prop2|probe\.prop2_best)\."
               r"(?:(gd1|ridge|chebyshev|model|concat|mlp|naive)\.)?(t\d+|seq_avg)")
    for e, (source, variant, position) in _matching(rows, pattern):
        run_dir = Path(results_dir) / e.spec
        if source == "solver.prop2":  # a model-free record (solver/prop2.json)
            record = metrics.probe_record(run_dir, "prop2", SOLVER_DIR)
            name = f"Prop-2 {variant} ({e.spec})"
            curve = record and variant in record.get("variants", {}) and metrics.variant_curve(record, variant)
            dashed.append(name)
        elif source == "probe.prop2_best":  # the best k-step solver in closed form (probe/prop2_best.json)
            record = metrics.probe_record(run_dir, "prop2_best")
            name = f"best {record['k'] if record else 'k'}-step solver ({e.spec})"
            curve = record and record["per_position_loss"].get("ours")
            dashed.append(name)
        elif source == "eval":
            record = metrics.latest_eval_record(run_dir)
            if variant is None:
                name, curve = e.spec, record and record["per_position_loss"]
            else:
                name = f"{'GD-1' if variant == 'gd1' else 'ridge LSQ'} ({e.spec})"
                curve = record and metrics.pick(record["baselines"], "GD-1" if variant == "gd1" else "ridge")
                dashed.append(name)
        else:
            record = metrics.probe_record(run_dir, "prop2")
            name = f"Prop-2 {variant} ({e.spec})"
            curve = record and metrics.pick(record["per_position_loss"], metrics.PROP2_KEYS[variant])
            dashed.append(name)
        if curve:
            curves[name] = curve
        if position != "seq_avg":
            points.setdefault(name, []).append((int(position[1:]), e.paper))
    if not points:
        return None
    plots.ledger_plot(curves, points, path, title=f"{figure}: test loss per position, ours (lines) vs paper (o)",
                      xlabel="position t", ylabel="test loss", dashed=tuple(dashed))
    return path


def _layer_figure(rows: list[EntryStatus], results_dir: Path, path: Path, figure: str) -> Path | None:
    """Probe error across layers (0 = input) at the probed position, paper values as markers."""
    from mesacli import plots

    curves, points = {}, {}
    for e, (target, layer, position) in _matching(rows, r"probe\.(target|precond|current)\.layer(\d+|last)\.t(\d+)"):
        name = f"{target} probe, t={position} ({e.spec})"
        record = metrics.probe_record(Path(results_dir) / e.spec, "probes")
        per_layer = None
        if record:
            by_layer = metrics.pick(record["mse"], metrics.PROBE_TARGETS[target])
            per_layer = [curve[int(position) - 1] for curve in by_layer]
            curves[name] = per_layer
        if layer == "last" and per_layer is None:
            continue
        points.setdefault(name, []).append((len(per_layer) - 1 if layer == "last" else int(layer), e.paper))
    if not points:
        return None
    plots.ledger_plot(curves, points, path, title=f"{figure}: probe MSE per layer, ours (lines) vs paper (o)",
                      xlabel="layer (0 = input)", ylabel="probe MSE", x_start=0)
    return path


def icl_settings(entries) -> dict[str, set[bool]]:
    """Per spec, the few-shot settings the entries' checks read: False for icl.* (one task), True for
    icl_continual.* (the task switch), so that a figure shows only its own setting's curves."""
    settings: dict[str, set[bool]] = {}
    for entry in entries:
        for check in entry.checks:
            if "icl_continual." in check:
                settings.setdefault(entry.spec, set()).add(True)
            if re.search(r"(^|[^_\w])icl\.", check):
                settings.setdefault(entry.spec, set()).add(False)
    return settings


def _icl_figure(rows: list[EntryStatus], results_dir: Path, path: Path, figure: str) -> Path | None:
    """Label loss per example of the few-shot runs the figure's claims read (no paper numbers: claims)."""
    from mesacli import plots

    curves, dashed = {}, []
    for spec, wanted in icl_settings([r.entry for r in rows]).items():
        for continual in sorted(wanted):
            for kind, label in metrics.ICL_LABELS.items():
                record = metrics.icl_record(Path(results_dir) / spec, label, continual)
                if record is None:
                    continue
                name = f"{label} ({spec}{', continual' if continual else ''})"
                curves[name] = metrics.pick(record["curves"], label)["mean"]
                if kind in ("ar_lsq", "lsq", "gd1"):
                    dashed.append(name)
    if not curves:
        return None
    plots.ledger_plot(curves, {}, path, title=f"{figure}: label loss per example (the paper states claims)",
                      xlabel="example i", ylabel="label loss", dashed=tuple(dashed))
    return path


def note_lines(rows) -> list[str]:
    """One line per distinct note of ``rows`` (EntryStatus), naming every entry that carries it, in table order."""
    holders: dict[str, list[str]] = {}
    for s in rows:
        if s.entry.note:
            holders.setdefault(s.entry.note, []).append(f"`{s.entry.id}`")
    return [f"- {', '.join(ids)}: {note}" for note, ids in holders.items()]


def provenance_lines(statuses: list[EntryStatus]) -> list[str]:
    """The "how the record was made" table: for every run whose trained model an entry reads, its steps and the
    training sessions its ``sessions.jsonl`` records (how many, their steps, machines and hours)."""
    runs = {name: p for s in statuses for name, p in s.provenance.items()}
    rows = []
    for name, p in runs.items():
        if p.trained_steps == 0:  # not trained yet (its model-free records only)
            continue
        if p.sessions == 0:
            rows.append(f"| {name} | {p.trained_steps} | – | not recorded | – |")
            continue
        hours = f"{p.seconds / 3600:.2f}"
        recorded = f"{p.sessions} ({p.recorded_steps} steps" + \
            (f"; {p.compact_resumes} resumed from bfloat16 moments" if p.compact_resumes else "") + ")"
        rows.append(f"| {name} | {p.trained_steps} | {recorded} | {', '.join(p.machines)} | {hours} |")
    if not rows:
        return []
    return ["## How the record was made", "",
            "Per trained run: its steps, and the training sessions its `sessions.jsonl` records (steps, machine, "
            "wall time with compilation). Runs trained before sessions were recorded (2026-12-06) say "
            "\"not recorded\"; the README says how the ledger was made.", "",
            "| run | steps | recorded sessions | machines | recorded hours |", "|---|---|---|---|---|", *rows, ""]


def write_report(statuses: list[EntryStatus], results_dir: Path = RESULTS_DIR, *, about: str = "") -> Path:
    """Write results_dir/REPORT.md and results_dir/figures/*.png; returns the report's path."""
    results_dir = Path(results_dir)
    figures_dir = results_dir / FIGURES_DIR
    groups: dict[str, list[EntryStatus]] = {}
    for status in statuses:
        groups.setdefault(status.entry.figure, []).append(status)
    done = sum(s.done for s in statuses)
    measured = [s for s in statuses if s.within is not None]
    misses = [s for s in measured if not s.within]
    lines = ["# mesacli: the paper's results, reproduced",
             "",
             f"Generated by `mesacli reproduce report` on {datetime.date.today().isoformat()} ({platform.machine()}, "
             f"Python {platform.python_version()}) from the records in `{results_dir}/`. Paper values: "
             "`../shared/paper-spec.md` section 7 ([R] = the authors' stored results). Ours: one seed of the shipped "
             "specs at their full step count, unless the state says otherwise.",
             ""]
    if about:
        lines += [about, ""]
    lines += [f"**{len(statuses)} entries: {done} done, {len(measured)} measured, "
              f"{len(measured) - len(misses)} within tolerance or holding, {len(misses)} missed.**", ""]
    if misses:
        lines += ["Misses: " + ", ".join(f"`{s.entry.id}`" for s in misses) + ".", ""]
        drawn = [s for s in misses if s.within_on_authors]
        if drawn:
            lines += ["Of these, within tolerance on the authors' own test data (column \"ours, authors' test "
                      "seqs\"), so that the draw of our test sequences accounts for the miss: "
                      + ", ".join(f"`{s.entry.id}`" for s in drawn) + ".", ""]
    for figure, rows in groups.items():
        authors = any(s.ours_authors is not None for s in rows)  # a column only where a record has such a value
        lines += [f"## {figure}", "", "| id | spec | metric / claim | paper | ours | " +
                  ("ours, authors' test seqs | " if authors else "") + "ratio | verdict | state |",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if authors else "")]
        for s in rows:
            e = s.entry
            what = e.claim or e.metric
            if e.checks:
                what += " (" + "; ".join(f"`{c}`" for c in e.checks) + ")"
            ours = s.ours_text() + (f" | {fmt_value(s.ours_authors)}" if authors else "")
            ratio = "–" if s.ratio is None else f"{s.ratio:.2f}"
            lines.append(f"| `{e.id}` | {e.spec} | {what} | {fmt_value(s.paper)} | {ours} | {ratio} | "
                         f"{verdict(s)} | {s.state} |")
        notes = note_lines(rows)
        if authors:
            notes.append("- *ours, authors' test seqs*: the same metric on the test sequences behind the paper's "
                         "curves (the authors' generator, seeds and batch size: `mesacli eval RUN --test-set "
                         "authors` for a model, `mesacli probe RUN --analysis prop2_authors` for the Prop-2 solvers, "
                         "their coefficients as learned on ours, `--analysis probes_authors` for the linear probes); "
                         "ratio and verdict are on the spec's own test batches")
        if notes:
            lines += [""] + notes
        for kind, make in (("position", _position_figure), ("layers", _layer_figure), ("icl", _icl_figure)):
            path = make(rows, results_dir, figures_dir / f"{_slug(figure)}-{kind}.png", figure)
            if path is not None:
                lines += ["", f"![{figure} ({kind})]({FIGURES_DIR}/{path.name})"]
        lines.append("")
    lines += provenance_lines(statuses)
    report = results_dir / REPORT_FILE
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = report.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    return report
