"""Where every ledger entry stands: the paper's value, ours, the ratio, within tolerance (or the claim holds),
the state of the runs it needs, and the CPU time left to produce it.

States, the first that applies: ``blocked: <why>`` (the ledger says mesacli cannot produce it yet); for the specs
an entry reads (results/<spec>/): ``outdated`` (the run's spec.yaml is not the shipped spec), and for those whose
trained model it reads (``Entry.trained_specs``; not a spec it reads model-free ``solver:`` records of only):
``missing`` (no checkpoint), ``training N/M steps``, ``tuning N/M steps`` (prompt tuning of a few-shot run); then
``analysis pending`` (a record the entry reads is missing, made at an earlier step, with other ledger settings or
by an older probe definition) and ``done``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mesacli.errors import MesaError
from mesacli.probe import prop2_authors
from mesacli.reproduce import metrics
from mesacli.reproduce.ledger import EVAL_TEST_SETS, Entry, Ledger, needs_model
from mesacli.rundir import PROBE_DIR, SOLVER_DIR
from mesacli.spec_loader import EXPERIMENTS_DIR

RESULTS_DIR = Path("results")
TUNE_STAGES = {"eos": ("eos",), "prefix": ("prefix",), "both": ("eos", "prefix")}


@dataclasses.dataclass(frozen=True)
class RunState:
    """How far one experiment of the ledger is: trained steps, tuned steps, whether it follows the shipped spec."""

    name: str
    run_dir: Path
    total_steps: int
    trained_steps: int
    outdated: bool
    tune_total: int = 0  # steps of all tuning stages
    tune_done: int = 0
    start_step: int = 0  # the step its training starts at before it has a checkpoint (``start_from``)

    @property
    def trained(self) -> bool:
        return not self.outdated and self.trained_steps >= self.total_steps

    @property
    def tuned(self) -> bool:
        return self.tune_done >= self.tune_total

    def label(self) -> str:
        if self.outdated:
            return "outdated (spec changed)"
        if self.trained_steps == 0:
            return "missing"
        if not self.trained:
            return f"training {self.trained_steps}/{self.total_steps} steps"
        if not self.tuned:
            return f"tuning {self.tune_done}/{self.tune_total} steps"
        return "trained"


@dataclasses.dataclass(frozen=True)
class EntryStatus:
    entry: Entry
    paper: float | None
    ours: float | bool | None
    ours_step: int | None  # checkpoint step of the record that gave ``ours``
    ratio: float | None
    within: bool | None  # within tolerance / the claim holds; None: not measured yet
    state: str
    cpu_left_s: float
    values: dict[str, float | bool | None]  # every metric the entry reads ("spec:metric" -> value)
    cpu_by_spec: dict[str, float] = dataclasses.field(default_factory=dict)  # cpu_left_s, per spec it reads
    ours_per_seed: tuple[float | None, ...] | None = None  # a run of several seeds: ``ours`` of each (its mean)
    # the recorded training sessions of each run the entry reads the model of (``run_provenance``)
    provenance: dict[str, Provenance] = dataclasses.field(default_factory=dict)
    # an entry whose metric has a twin on the authors' test data (``metrics.authors_twin``: eval_authors,
    # prop2_authors, probes_authors) that its spec runs: that value (None until its record is current); the verdict
    # stays on the spec's own test batches
    ours_authors: float | None = None

    @property
    def within_on_authors(self) -> bool | None:
        """Whether ``ours_authors`` is within the entry's tolerance of the paper (None without either)."""
        if self.ours_authors is None or not self.paper:
            return None
        return bool(abs(self.ours_authors / self.paper - 1.0) <= self.entry.tolerance)

    @property
    def trained_on(self) -> dict[str, tuple[str, ...]]:
        """The machines that trained each run the entry reads the model of (() before sessions were recorded)."""
        return {name: p.machines for name, p in self.provenance.items()}

    def ours_text(self, at: str = " @ ") -> str:
        """``ours`` for a table: the value, each seed's after it ("0.030 (seeds 0.028 / 0.032)"), and the
        record's checkpoint step while the entry is not done."""
        text = metrics.fmt_value(self.ours)
        if self.ours_per_seed:
            text += " (seeds " + " / ".join(metrics.fmt_value(v) for v in self.ours_per_seed) + ")"
        if self.ours is not None and self.ours_step is not None and not self.done:
            text += f"{at}{self.ours_step}"
        return text

    @property
    def done(self) -> bool:
        return self.state == "done"

    def to_json(self) -> dict:
        e = self.entry
        return {"id": e.id, "figure": e.figure, "spec": e.spec, "seeds": e.seeds, "metric": e.metric,
                "claim": e.claim, "checks": list(e.checks), "paper": self.paper, "ours": self.ours,
                "ours_step": self.ours_step, "ours_per_seed": self.ours_per_seed, "ours_authors": self.ours_authors,
                "within_on_authors": self.within_on_authors, "ratio": self.ratio,
                "tolerance": e.tolerance, "within": self.within, "state": self.state,
                "cpu_left_s": round(self.cpu_left_s, 1), "source": e.source, "note": e.note, "values": self.values,
                "trained_on": {name: list(machines) for name, machines in self.trained_on.items()}}


def shipped_spec(name: str, experiments_dir: Path = EXPERIMENTS_DIR):
    from mesacli.spec import load_spec

    return load_spec(Path(experiments_dir) / f"{name}.yaml")


def run_state(name: str, plan, results_dir: Path = RESULTS_DIR, experiments_dir: Path = EXPERIMENTS_DIR) -> RunState:
    """The state of results/<name> against the shipped spec ``name``."""
    from mesacli import rundir
    from mesacli.icl.tokens import checkpoints_dir
    from mesacli.spec import load_spec

    spec = shipped_spec(name, experiments_dir)
    run_dir = Path(results_dir) / name
    steps = rundir.saved_steps(run_dir)
    outdated = False
    if (run_dir / rundir.SPEC_FILE).is_file():
        try:
            outdated = rundir.read_spec(run_dir, load_spec) != spec
        except MesaError:  # an unreadable spec.yaml is as good as another spec
            outdated = True
    tune_total = tune_done = 0
    for analysis in plan.analyses:
        kind, _, what = analysis.partition(":")
        if kind == "tune":
            for stage in TUNE_STAGES[what]:
                tune_total += plan.tune_steps
                tuned = rundir.saved_steps(checkpoints_dir(run_dir, stage).parent)
                tune_done += min(max(tuned, default=0), plan.tune_steps)
    start = 0  # a run that starts from another one's checkpoint (plan.start_from) trains only the steps after it
    if plan.start_from is not None and not steps:
        start = min(max(rundir.saved_steps(Path(results_dir) / plan.start_from), default=0), spec.train.steps)
    return RunState(name, run_dir, spec.train.steps, max(steps, default=0), outdated, tune_total, tune_done, start)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a run's steps were trained, from its ``sessions.jsonl`` (``mesacli.loop.session_record``)."""

    name: str
    trained_steps: int  # the run's latest checkpoint
    sessions: int  # recorded training sessions (0: trained before sessions were recorded)
    recorded_steps: int  # steps trained in those sessions
    seconds: float  # their wall time, compilation included
    machines: tuple[str, ...]  # e.g. "cpu (x86_64, 2 CPUs)", "gpu: NVIDIA H100 80GB HBM3 x1"
    compact_resumes: int = 0  # sessions that went on from a checkpoint with bfloat16 moments


def machine_label(session: dict) -> str:
    if session.get("platform") == "cpu":
        return f"cpu ({session.get('host', '?')})"
    kind = session.get("device_kind", session.get("device", "?"))  # before runtime.machine: "device" was the kind
    return f"{session.get('platform', '?')}: {kind} x{session.get('devices', '?')}"


def run_provenance(run_dir: Path) -> Provenance:
    """The sessions that trained ``run_dir``: how many, how many steps, their time, the machines."""
    from mesacli import rundir

    sessions = rundir.read_sessions(run_dir)
    machines = tuple(dict.fromkeys(machine_label(s) for s in sessions))
    resumed = [s for prev, s in zip(sessions, sessions[1:], strict=False) if prev.get("moments_dtype")]
    return Provenance(Path(run_dir).name, max(rundir.saved_steps(run_dir), default=0), len(sessions),
                      sum(s.get("to_step", 0) - s.get("from_step", 0) for s in sessions),
                      sum(s.get("seconds", 0.0) for s in sessions),
                      machines, len(resumed))


PROBE_SETTINGS = {"linearize": ("distil_steps", "distil_steps"), "prop2": ("train_steps", "prop2_train_steps")}


def analysis_current(analysis: str, plan, state: RunState) -> bool:
    """Whether the record that ``analysis`` writes exists for the run's final step (any step for a model-free
    ``solver:`` record), with the ledger's settings (e.g. the linearize distillation steps) and the current probe
    definitions."""
    kind, _, arg = analysis.partition(":")
    run_dir, total = state.run_dir, state.total_steps
    if kind in EVAL_TEST_SETS:
        record = metrics.latest_eval_record(run_dir, EVAL_TEST_SETS[kind])
        return record is not None and record.get("step") == total
    if kind in ("probe", "solver"):
        record = metrics.probe_record(run_dir, arg, PROBE_DIR if kind == "probe" else SOLVER_DIR)
        if record is None or not metrics.probe_record_current(arg, record):
            return False
        if kind == "probe" and record.get("step") != total:
            return False
        if arg == prop2_authors.ANALYSIS:  # current while the prop2 record whose solvers it evaluated is there
            source = metrics.probe_record(run_dir, prop2_authors.SOURCE, PROBE_DIR if kind == "probe" else SOLVER_DIR)
            return prop2_authors.reads_current(record, source)
        if arg in PROBE_SETTINGS:
            field, setting = PROBE_SETTINGS[arg]
            return record.get(field) == getattr(plan, setting)
        return True
    if kind == "tune":
        return state.tuned
    from mesacli.icl.evaluate import prompt_names, report_stem

    record = metrics.load_record(Path(run_dir) / f"{report_stem(prompt_names(arg), kind == 'icl_continual')}.json")
    return record is not None and record.get("meta", {}).get("step") == total


def _entry_status(entry: Entry, ledger: Ledger, states: dict[str, RunState],
                  provenance: dict[str, Provenance]) -> EntryStatus:
    readings, pending = {}, []
    for ref in entry.metric_refs():
        state = states[ref.spec]
        metric = metrics.parse_metric(ref.metric)
        reading = readings[str(ref)] = metric.read(state.run_dir)
        produced_by = ledger.specs[ref.spec].analysis_for(metric.analysis)
        stale = produced_by is not None and not analysis_current(produced_by, ledger.specs[ref.spec], state)
        old_step = needs_model(metric.analysis) and reading.step != state.total_steps
        if reading.value is None or old_step or stale:
            pending.append(ref)
    runs = [states[name] for name in entry.specs()]
    trained = entry.trained_specs()
    not_ready = [s for s in runs if s.outdated or (s.name in trained and not (s.trained and s.tuned))]
    if entry.blocked:
        state = f"blocked: {entry.blocked}"
    elif not_ready:
        state = "; ".join(f"{s.name}: {s.label()}" if len(runs) > 1 else s.label() for s in not_ready)
    elif pending:
        state = "analysis pending"
    else:
        state = "done"
    cpu_by_spec = {}
    for run in runs:
        plan = ledger.specs[run.name]
        cpu = 0.0
        if run.name in trained:
            left = run.total_steps if run.outdated else \
                max(0, run.total_steps - max(run.trained_steps, run.start_step))
            cpu = left * plan.step_seconds + (run.tune_total - run.tune_done) * plan.tune_step_seconds
        if not entry.blocked:
            waiting = [metrics.parse_metric(ref.metric).analysis for ref in pending if ref.spec == run.name]
            if any(needs_model(a) for a in waiting):
                cpu += plan.analysis_seconds
            if not all(needs_model(a) for a in waiting):
                cpu += plan.solver_seconds
        cpu_by_spec[run.name] = cpu
    values = {ref: reading.value for ref, reading in readings.items()}
    main, ratio = metrics.MISSING, None
    if entry.metric is not None:
        main = readings.get(str(metrics.MetricRef(entry.spec, entry.metric)))
        if main is None:  # a claim with a headline number that its checks do not read
            main = metrics.parse_metric(entry.metric).read(states[entry.spec].run_dir)
        if isinstance(main.value, float) and entry.paper:
            ratio = main.value / entry.paper
    if entry.checks:
        results = [metrics.evaluate_check(metrics.parse_check(c), lambda ref: values[str(ref.on(entry.spec))],
                                          entry.tolerance) for c in entry.checks]
        within = None if any(r is None for r in results) else all(results)
    else:
        within = None if ratio is None else bool(abs(ratio - 1.0) <= entry.tolerance)
    return EntryStatus(entry, entry.paper, main.value, main.step, ratio, within, state, sum(cpu_by_spec.values()),
                       values, cpu_by_spec, main.per_seed, {name: provenance[name] for name in trained},
                       _on_authors_test_set(entry, ledger, states[entry.spec]))


def _on_authors_test_set(entry: Entry, ledger: Ledger, state: RunState) -> float | None:
    """The entry's metric on the authors' test sequences (``metrics.authors_twin``: eval.<...> read from the
    eval_authors record, probe.prop2.<...> / solver.prop2.<...> from prop2_authors), when the entry's spec runs
    the analysis that makes it and its record is current (of the run's final step; of the present prop2 record)."""
    twin = metrics.authors_twin(entry.metric or "")
    if twin is None:
        return None
    metric, plan = metrics.parse_metric(twin), ledger.specs[entry.spec]
    produced_by = plan.analysis_for(metric.analysis)
    if produced_by is None or not analysis_current(produced_by, plan, state):
        return None
    return metric.read(state.run_dir).value


def ledger_status(ledger: Ledger, ids: list[str] | None = None, results_dir: Path = RESULTS_DIR,
                  experiments_dir: Path = EXPERIMENTS_DIR) -> list[EntryStatus]:
    """The status of the named entries (all by default), in priority order."""
    entries = ledger.select(ids)
    states = {name: run_state(name, ledger.specs[name], results_dir, experiments_dir)
              for name in ledger.spec_order(entries)}
    provenance = {name: run_provenance(state.run_dir) for name, state in states.items()}  # read once per run
    return [_entry_status(entry, ledger, states, provenance) for entry in entries]


def total_cpu_left(statuses: list[EntryStatus]) -> float:
    """CPU seconds left for all the entries together: a run that several entries share is counted once."""
    per_spec: dict[str, float] = {}
    for status in statuses:
        for name, seconds in status.cpu_by_spec.items():
            per_spec[name] = max(per_spec.get(name, 0.0), seconds)
    return sum(per_spec.values())
