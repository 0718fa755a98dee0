"""The ledger of the paper's results (``ledger.yaml`` in this package), loaded strictly into frozen dataclasses.

An entry is either a number (``metric`` measured on the entry's ``spec``, the paper's value ``paper``, a relative
``tolerance``) or a claim (``checks``: comparisons of metrics, see ``metrics.parse_check``).  ``specs`` says, for
every experiment the entries need, which analyses produce its records and what one training step costs.  Every
analysis reads the trained model except ``solver:<analysis>`` (``needs_model``): a probe analysis run on the spec's
task alone (e.g. the Prop-2 solvers), so an entry that reads only such records does not wait for training.
``load_ledger`` rejects an unknown key (with a did-you-mean hint), a spec that is not shipped, a metric that does
not parse or whose analysis the spec does not run, and duplicate ids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mesacli.errors import MesaError
from mesacli.reproduce import metrics
from mesacli.rundir import EVAL_STEMS
from mesacli.spec_loader import EXPERIMENTS_DIR, build_spec, parse_yaml

LEDGER_FILE = Path(__file__).resolve().parent / "ledger.yaml"
ANALYSIS_KINDS = ("eval", "eval_authors", "probe", "tune", "icl", "icl_continual", "solver")
MODEL_FREE_KINDS = ("solver",)  # analyses run without a trained model (mesacli.probe.run_model_free)
# an eval analysis -> its `mesacli eval --test-set`: the analysis is named as its record (eval, eval_authors)
EVAL_TEST_SETS = {stem: test_set for test_set, stem in EVAL_STEMS.items()}


def needs_model(analysis: str) -> bool:
    """Whether an analysis of the ledger (or the analysis a metric names) reads the trained model."""
    return analysis.partition(":")[0] not in MODEL_FREE_KINDS


@dataclasses.dataclass(frozen=True)
class SpecPlan:
    """What one experiment of the ledger needs: its analyses (in run order) and the measured cost of a step."""

    step_seconds: float
    analyses: tuple[str, ...] = ("eval",)
    analysis_seconds: float = 120.0  # measured (or estimated) cost of the analyses other than prompt tuning
    solver_seconds: float = 300.0  # measured (or estimated) cost of the model-free analyses (solver:<analysis>)
    tune_step_seconds: float = 0.5  # one prompt-tuning step (tune:<stage> analyses)
    tune_steps: int = 5000  # Adam steps per tuning stage (prompt-tune --steps)
    tune_prefix_len: int = 20  # prompt-tune --prefix-len
    icl_seeds: int = 5  # icl-eval --seeds (data seeds) and --batch (prompts per seed)
    icl_batch: int = 128
    distil_steps: int = 2000  # probe --distil-steps (linearize; the paper: 15k)
    prop2_train_steps: int = 20000  # probe --prop2-steps: AdamW steps of [C]'s recipe (the paper: 20k; 80k for k = 2)
    note: str = ""  # where the spec deviates from the paper
    # a ledger spec whose finished run this one continues (train --start-from): the same recipe, fewer steps
    start_from: str | None = None
    # train --compact-checkpoints: AdamW's moments stored in bfloat16, for a model whose float32 resumable state
    # (parameters and two moments) would not fit the committed record's 5 MB per experiment
    compact_checkpoints: bool = False

    def probe_options(self) -> dict:
        return {"distil_steps": self.distil_steps, "prop2_train_steps": self.prop2_train_steps}

    def analysis_for(self, metric_analysis: str) -> str | None:
        """The analysis that produces a metric of kind ``metric_analysis`` (icl -> icl:plain,eos,tuned), if run."""
        return next((a for a in self.analyses if a == metric_analysis or a.startswith(metric_analysis + ":")), None)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One result of the paper: a number (metric, paper, tolerance) or a claim (checks)."""

    id: str
    figure: str
    spec: str
    priority: int
    metric: str | None = None
    paper: float | None = None
    tolerance: float = 0.10
    claim: str | None = None
    checks: tuple[str, ...] = ()
    note: str = ""
    source: str = ""  # default: paper-spec.md section 7 ([R] for a number, the paper's text for a claim)
    seeds: int = 1
    blocked: str = ""  # why mesacli cannot produce the entry yet (e.g. an analysis not implemented); run skips it

    @property
    def is_claim(self) -> bool:
        return bool(self.checks)

    def specs(self) -> list[str]:
        """Every spec the entry reads: its own and those named in its checks."""
        names = [self.spec]
        for check in self.checks:
            for ref in metrics.parse_check(check).refs():
                if ref.spec and ref.spec not in names:
                    names.append(ref.spec)
        return names

    def trained_specs(self) -> list[str]:
        """The specs whose trained model the entry reads (a spec it reads model-free records of only is not one)."""
        refs = self.metric_refs()
        return [name for name in self.specs()
                if any(ref.spec == name and needs_model(metrics.parse_metric(ref.metric).analysis) for ref in refs)]

    def metric_refs(self) -> list[metrics.MetricRef]:
        """Every metric the entry reads (the checks' operands, else its metric), with the spec filled in."""
        if self.checks:
            return [ref.on(self.spec) for check in self.checks for ref in metrics.parse_check(check).refs()]
        return [metrics.MetricRef(self.spec, self.metric)]


@dataclasses.dataclass(frozen=True)
class Ledger:
    specs: dict[str, SpecPlan]
    entries: tuple[Entry, ...]

    def entry(self, entry_id: str) -> Entry:
        for entry in self.entries:
            if entry.id == entry_id:
                return entry
        import difflib

        close = difflib.get_close_matches(entry_id, [e.id for e in self.entries], n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise MesaError(f"no ledger entry '{entry_id}'{hint}; `mesacli reproduce status` lists them")

    def select(self, ids: list[str] | None) -> list[Entry]:
        """The named entries (all without names), in priority order, ledger order within a priority."""
        chosen = [self.entry(i) for i in ids] if ids else list(self.entries)
        order = {e.id: n for n, e in enumerate(self.entries)}
        return sorted(dict.fromkeys(chosen), key=lambda e: (e.priority, order[e.id]))

    def spec_order(self, entries: list[Entry]) -> list[str]:
        """The specs the entries need, each once, in the order of the entries (priority order)."""
        names: list[str] = []
        for entry in entries:
            names += [name for name in entry.specs() if name not in names]
        return names


def _check_analysis(name: str, analysis: str) -> None:
    kind, _, arg = analysis.partition(":")
    if kind not in ANALYSIS_KINDS:
        raise MesaError(f"specs.{name}: unknown analysis '{analysis}' (kinds: {', '.join(ANALYSIS_KINDS)})")
    if kind in EVAL_TEST_SETS and arg:
        raise MesaError(f"specs.{name}: {analysis}: {kind} takes no argument")
    if kind == "probe":
        from mesacli.probe.registry import ANALYSES

        if arg not in ANALYSES:
            raise MesaError(f"specs.{name}: unknown probe analysis '{arg}' (choose from {', '.join(ANALYSES)})")
    if kind == "tune" and arg not in ("eos", "prefix", "both"):
        raise MesaError(f"specs.{name}: tune:{arg}: expected tune:eos, tune:prefix or tune:both")
    if kind in ("icl", "icl_continual"):
        from mesacli.icl.evaluate import prompt_names

        prompt_names(arg)
    if kind == "solver":
        from mesacli.probe.registry import MODEL_FREE

        if arg not in MODEL_FREE:
            raise MesaError(f"specs.{name}: solver:{arg}: only {', '.join(MODEL_FREE)} run without a trained model")


def validate(ledger: Ledger, experiments_dir: Path = EXPERIMENTS_DIR) -> Ledger:
    """Every spec shipped, every analysis known, every metric parsed and produced by an analysis its spec runs."""
    for name, plan in ledger.specs.items():
        if not (Path(experiments_dir) / f"{name}.yaml").is_file():
            raise MesaError(f"specs.{name}: no shipped spec {name}.yaml in {experiments_dir}")
        if plan.step_seconds <= 0:
            raise MesaError(f"specs.{name}.step_seconds must be positive, got {plan.step_seconds}")
        for analysis in plan.analyses:
            _check_analysis(name, analysis)
        if plan.start_from is not None:
            if plan.start_from not in ledger.specs or plan.start_from == name:
                raise MesaError(f"specs.{name}.start_from: '{plan.start_from}' is not another spec of the ledger")
            from mesacli.rundir import longer_run_differences
            from mesacli.spec import load_spec

            source, spec = (load_spec(Path(experiments_dir) / f"{n}.yaml") for n in (plan.start_from, name))
            if differs := longer_run_differences(source, spec):
                raise MesaError(f"specs.{name}.start_from: {name} is not a longer run of {plan.start_from} "
                                f"({'; '.join(differs[:3])})")
    seen = set()
    for entry in ledger.entries:
        where = f"entry {entry.id}"
        if entry.id in seen:
            raise MesaError(f"{where}: duplicate id")
        seen.add(entry.id)
        if entry.priority < 1:
            raise MesaError(f"{where}: priority must be at least 1")
        if entry.tolerance <= 0:
            raise MesaError(f"{where}: tolerance must be positive")
        if not entry.checks and (entry.metric is None or entry.paper is None):
            raise MesaError(f"{where}: give either metric and paper (a number) or checks (a claim)")
        try:
            headline = [metrics.MetricRef(entry.spec, entry.metric)] if entry.metric else []
            refs = list(dict.fromkeys(entry.metric_refs() + headline))
        except MesaError as err:
            raise MesaError(f"{where}: {err}") from None
        for ref in refs:
            if ref.spec not in ledger.specs:
                raise MesaError(f"{where}: spec '{ref.spec}' is not in the ledger's specs section")
            needed = metrics.parse_metric(ref.metric, where).analysis
            if entry.blocked:
                continue
            if ledger.specs[ref.spec].analysis_for(needed) is None:
                raise MesaError(f"{where}: {ref.spec}:{ref.metric} needs the analysis '{needed}', "
                                f"which specs.{ref.spec}.analyses does not run")
    return ledger


def load_ledger(path: str | Path = LEDGER_FILE, experiments_dir: Path = EXPERIMENTS_DIR) -> Ledger:
    """The ledger at ``path`` (default: the shipped one), strictly loaded and validated."""
    path = Path(path)
    if not path.is_file():
        raise MesaError(f"ledger file {path} not found")
    data = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict) or set(data) - {"specs", "entries"}:
        extra = sorted(set(data) - {"specs", "entries"}) if isinstance(data, dict) else data
        raise MesaError(f"{path}: expected the sections specs and entries, got {extra}")
    specs = {}
    for name, plan in (data.get("specs") or {}).items():
        try:
            specs[str(name)] = build_spec(SpecPlan, plan, [], lambda _: None)
        except MesaError as err:
            raise MesaError(f"{path}: specs.{name}: {err}") from None
    entries = []
    for n, raw in enumerate(data.get("entries") or []):
        where = f"entry {raw.get('id', n) if isinstance(raw, dict) else n}"
        try:
            entry = build_spec(Entry, raw, [], lambda _: None)
        except (MesaError, TypeError) as err:
            raise MesaError(f"{path}: {where}: {err}") from None
        if not entry.source:
            entry = dataclasses.replace(entry, source="paper-spec 7 (claim)" if entry.checks else "paper-spec 7 [R]")
        entries.append(entry)
    return validate(Ledger(specs, tuple(entries)), experiments_dir)
