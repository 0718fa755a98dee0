"""The ledger (mesacli reproduce): registry, metrics, status, report, budgeted runs, and the committed results/."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, merge
from rich.console import Console

from mesacli import render, runtime
from mesacli.errors import MesaError
from mesacli.reproduce import metrics
from mesacli.reproduce.ledger import load_ledger
from mesacli.reproduce.report import write_report
from mesacli.reproduce.run import parse_budget, reproduce_run, run_jobs, specs_with_work
from mesacli.reproduce.status import ledger_status, machine_label, run_provenance
from mesacli.rundir import read_sessions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
MB = 1024 * 1024

# ----------------------------------------------------------------------------- the shipped registry


def test_shipped_ledger_resolves_every_entry_to_a_spec_and_a_metric():
    ledger = load_ledger()  # validates: shipped spec, known analyses, metrics that parse and are produced
    figures = {e.figure for e in ledger.entries}
    for figure in ("Fig. 4C/D", "Fig. 4E/F", "Fig. 6C", "Fig. 7A", "Fig. 6A/B", "Fig. 3A", "Fig. 5", "Fig. 8A",
                   "Fig. 8B", "Fig. 18", "App. E", "Fig. 7B", "Fig. 7C"):
        assert figure in figures, figure  # every group of paper-spec section 7
    for entry in ledger.entries:
        for ref in entry.metric_refs():
            assert ref.spec in ledger.specs
            assert metrics.parse_metric(ref.metric).analysis
    ids = [e.id for e in ledger.entries]
    assert len(ids) == len(set(ids))
    numbers = [e for e in ledger.entries if not e.checks]
    assert all(e.paper is not None and e.metric for e in numbers)
    preconds = [e for e in ledger.entries if e.metric and ".precond." in e.metric]
    assert len(preconds) >= 4  # the preconditioning probes are covered


def _write_ledger(tmp_path, text: str) -> Path:
    path = tmp_path / "ledger.yaml"
    path.write_text(text)
    return path


def _tiny_experiments(tmp_path, **sections) -> Path:
    experiments = tmp_path / "experiments"
    experiments.mkdir(exist_ok=True)
    (experiments / "tiny.yaml").write_text(yaml.safe_dump(merge(TINY, sections)))
    return experiments


@pytest.mark.parametrize("text, message", [
    ("specs: {tiny: {step_seconds: 1, analyses: [eval]}}\nentries:\n"
     "  - {id: a, figure: F, spec: tiny, metric: eval.seq_avg, paper: 1, priority: 1, tolerence: 0.2}",
     "did you mean 'tolerance'"),
    ("specs: {tiny: {step_seconds: 1, analyses: [eval]}}\nentries:\n"
     "  - {id: a, figure: F, spec: tiny, metric: eval.sequence, paper: 1, priority: 1}", "unknown metric"),
    ("specs: {tiny: {step_seconds: 1, analyses: [eval]}}\nentries:\n"
     "  - {id: a, figure: F, spec: tiny, metric: probe.token.t3, paper: 1, priority: 1}",
     "needs the analysis 'probe:binding'"),
    ("specs: {nothere: {step_seconds: 1}}\nentries: []", "no shipped spec nothere.yaml"),
    ("specs: {tiny: {step_seconds: 1, analyses: [probe:nope]}}\nentries: []", "unknown probe analysis"),
    ("specs: {tiny: {step_seconds: 1, analyses: ['eval:authors']}}\nentries: []", "eval takes no argument"),
    ("specs: {tiny: {step_seconds: 1}}\nentries:\n"
     "  - {id: a, figure: F, spec: tiny, metric: eval.t1, paper: 1, priority: 1}\n"
     "  - {id: a, figure: F, spec: tiny, metric: eval.t2, paper: 1, priority: 1}", "duplicate id"),
    ("specs: {tiny: {step_seconds: 1}}\nentries:\n"
     "  - {id: a, figure: F, spec: tiny, claim: c, checks: ['eval.t1 <= eval.t2'], priority: 1}", "unknown metric"),
    ("specs: {tiny: {step_seconds: 1}}\nentries:\n"
     "  - {id: a, figure: F, spec: tiny, claim: c, checks: ['other:eval.t1 < eval.t2'], priority: 1}",
     "spec 'other' is not in the ledger"),
])
def test_ledger_rejects_a_bad_entry_in_one_line(tmp_path, text, message):
    experiments = _tiny_experiments(tmp_path)
    with pytest.raises(MesaError, match=message) as err:
        load_ledger(_write_ledger(tmp_path, text), experiments)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- metrics and checks


def test_metrics_read_the_records_that_eval_probe_and_icl_eval_write(tmp_path):
    run = tmp_path / "run"
    (run / "probe").mkdir(parents=True)
    curve = [1.0, 0.5, 0.25, 0.2]
    (run / "eval_step3.json").write_text(json.dumps({"step": 3, "per_position_loss": [9, 9, 9, 9]}))
    (run / "eval_step10.json").write_text(json.dumps({  # the latest step wins (10 > 3, not text order)
        "step": 10, "seq_avg_loss": float(np.mean(curve)), "per_position_loss": curve,
        "baselines": {"GD-1 (eta=0.03)": [2.0, 1.5, 1.0, 0.9], "ridge LSQ (lam=0.001)": [1.0, 0.1, 0.01, 0.001]}}))
    probes = {"step": 10, "precond": "chebyshev", "precond_coefficients": "raw", "lstsq_cutoff": "float32", "mse": {
        "next s_{t+1}": [[3, 3, 3, 3], [2, 2, 1, 2], [1, 1, 0.5, 2.5]],
        "precond (SS^T+lam I)^{-1} s_t": [[5, 5, 5, 5], [4, 4, 4, 4], [6, 6, 6, 6]],
        "current s_t": [[0, 0, 0, 0]] * 3}}
    (run / "probe" / "probes.json").write_text(json.dumps(probes))
    (run / "probe" / "binding.json").write_text(json.dumps({"step": 10, "t_prime": [2, 3, 4], "lstsq_cutoff": "float32",
                                                            "token_probe_mse": [0.3, 0.2, 0.0]}))
    icl_curves = {"model (plain)": {"mean": [1.0, 1.2, 0.6, 0.3, 0.2, 0.1]},
                  "AR ridge LSQ, all token pairs (lam=0.001)": {"mean": [1.0, 0.5, 0.2, 0.1, 0.05, 0.02]}}
    (run / "icl_eval_plain.json").write_text(json.dumps({"meta": {"step": 10, "continual_switch_at": None},
                                                          "curves": icl_curves}))
    continual = {"model (plain)": {"mean": [1.0, 0.4, 0.2, 1.5, 0.8, 0.3]}}
    (run / "icl_eval_plain_continual.json").write_text(json.dumps({"meta": {"step": 10, "continual_switch_at": 3},
                                                                    "curves": continual}))

    def read(name):
        reading = metrics.parse_metric(name).read(run)
        return reading.value

    assert read("eval.seq_avg") == pytest.approx(np.mean(curve))
    assert metrics.parse_metric("eval.t2").read(run) == metrics.Reading(0.5, 10)
    assert read("eval.gd1.t4") == 0.9 and read("eval.ridge.seq_avg") == pytest.approx(0.27775)
    (run / "eval_authors_step10.json").write_text(json.dumps({"step": 10, "per_position_loss": [4, 3, 2, 1],
                                                               "baselines": {"GD-1 (eta=0.03)": [5, 5, 5, 5]}}))
    assert metrics.parse_metric("eval_authors.t2").read(run) == metrics.Reading(3, 10)
    assert read("eval_authors.gd1.t4") == 5 and read("eval.t2") == 0.5  # each test set reads its own record
    assert metrics.parse_metric("eval_authors.seq_avg").analysis == "eval_authors"
    assert read("probe.target.layer0.t3") == 3 and read("probe.target.layerlast.t3") == 0.5
    assert read("probe.precond.layer1.t1") == 4
    assert read("probe.target.t3.falls") is True and read("probe.target.t4.falls") is False
    assert read("probe.token.t3") == 0.2
    assert read("icl.plain.i3") == 0.6 and read("icl.ar_lsq.i6") == 0.02
    assert read("icl.plain.falls") is True  # an early bump (i = 2) is allowed
    assert read("icl_continual.plain.rebounds") is True
    assert read("icl.tuned.i3") is None  # no tuned curve: not measured
    assert metrics.parse_metric("probe.prop2.chebyshev.t50").read(run) == metrics.MISSING
    # the twins on the authors' data read their own records
    assert read("probe_authors.target.layer0.t3") is None  # no probes_authors.json yet
    probes = json.loads((run / "probe" / "probes.json").read_text())
    halved = {name: [[x / 2 for x in row] for row in rows] for name, rows in probes["mse"].items()}
    (run / "probe" / "probes_authors.json").write_text(json.dumps(probes | {"mse": halved}))
    assert read("probe_authors.target.layer0.t3") == 1.5 and read("probe.target.layer0.t3") == 3
    assert metrics.parse_metric("probe_authors.precond.layerlast.t1").analysis == "probe:probes_authors"
    assert metrics.authors_twin("probe.precond.layer6.t20") == "probe_authors.precond.layer6.t20"
    assert metrics.authors_twin("solver.prop2.naive.t50") == "solver.prop2_authors.naive.t50"
    assert metrics.authors_twin("eval.gd1.t5") == "eval_authors.gd1.t5" and metrics.authors_twin("icl.eos.i3") is None
    exact = json.loads((run / "probe" / "probes.json").read_text()) | {"precond": "exact"}
    (run / "probe" / "probes.json").write_text(json.dumps(exact))
    assert read("probe.precond.layer1.t1") is None  # the exact solve is not the paper's target: not measured
    unnamed = exact | {"precond": "chebyshev"}
    del unnamed["precond_coefficients"]  # a record from before the coefficient set followed the token format
    (run / "probe" / "probes.json").write_text(json.dumps(unnamed))
    assert read("probe.precond.layer1.t1") is None
    old = json.loads((run / "probe" / "binding.json").read_text())
    del old["lstsq_cutoff"]  # a record of the probe before round-off directions were cut: made again
    (run / "probe" / "binding.json").write_text(json.dumps(old))
    assert read("probe.token.t3") is None


def test_a_probe_record_made_with_other_settings_or_an_older_definition_is_not_current(tmp_path):
    from mesacli.reproduce.ledger import SpecPlan
    from mesacli.reproduce.status import RunState, analysis_current

    run = tmp_path / "run"
    (run / "probe").mkdir(parents=True)
    state = RunState("x", run, total_steps=10, trained_steps=10, outdated=False)
    plan = SpecPlan(step_seconds=1.0, analyses=("probe:linearize",), distil_steps=15000)
    record = {"step": 10, "distil_steps": 2000, "pe_layer_replacement": "linear_pe", "ratio": [2.0]}
    (run / "probe" / "linearize.json").write_text(json.dumps(record))
    assert not analysis_current("probe:linearize", plan, state)  # distilled for 2,000 steps, the ledger asks 15k
    (run / "probe" / "linearize.json").write_text(json.dumps(record | {"distil_steps": 15000}))
    assert analysis_current("probe:linearize", plan, state)
    del record["pe_layer_replacement"]  # the replacement of a PE layer lost its positions then
    (run / "probe" / "linearize.json").write_text(json.dumps(record | {"distil_steps": 15000}))
    assert not analysis_current("probe:linearize", plan, state)
    assert not analysis_current("probe:linearize", plan, dataclasses.replace(state, total_steps=20))  # older step


def test_checks_compare_with_factors_tolerances_and_missing_values():
    values = {"eval.t1": 1.0, "eval.t2": 3.0, "eval.t3": None, "x:eval.t1": 2.9}

    def check(text, tolerance=0.1):
        parsed = metrics.parse_check(text)
        return metrics.evaluate_check(parsed, lambda ref: values[str(ref)], tolerance)

    assert check("eval.t1 < 0.5 * eval.t2") is True
    assert check("eval.t1 < 0.3 * eval.t2") is False
    assert check("x:eval.t1 ~ eval.t2") is True and check("x:eval.t1 ~ eval.t2", tolerance=0.01) is False
    assert check("eval.t1 < 0.9") is False
    assert check("eval.t3 < eval.t2") is None
    with pytest.raises(MesaError, match="yes/no metric"):
        metrics.parse_check("eval.t1")


def test_budget_parsing():
    assert parse_budget("150m") == 9000 and parse_budget("2h") == 7200 and parse_budget("1h30m") == 5400
    assert parse_budget("90s") == 90 and parse_budget("10") == 600
    for bad in ("soon", "5x", "1h then 3m"):
        with pytest.raises(MesaError, match="--budget"):
            parse_budget(bad)


def test_progress_lines_say_the_step_and_pace_at_most_every_interval():
    from mesacli.reproduce.run import progress_lines

    now, said = [100.0], []
    on_log = progress_lines(said.append, "tiny", 1000, lambda: ", budget left 1h00m", every_s=60.0,
                            clock=lambda: now[0])
    for t, step in [(130.0, 10), (150.0, 20), (185.0, 50), (200.0, 60), (260.0, 110)]:
        now[0] = t
        on_log(step, 0.5)
    # the first flush (after compilation) only starts the clock; 55 s later is too soon; 50 steps in 70 s, then
    # 50 steps in 60 s
    assert said == ["tiny: step 60/1,000, loss 0.5, 1.40 s/step, budget left 1h00m",
                    "tiny: step 110/1,000, loss 0.5, 1.20 s/step, budget left 1h00m"]


def test_report_notes_name_every_entry_of_a_shared_note_once():
    from types import SimpleNamespace

    from mesacli.reproduce.report import note_lines

    rows = [SimpleNamespace(entry=SimpleNamespace(id=i, note=n))
            for i, n in [("a", "longer run"), ("b", ""), ("c", "another seed"), ("d", "longer run")]]
    assert note_lines(rows) == ["- `a`, `d`: longer run", "- `c`: another seed"]


# ----------------------------------------------------------------------------- status, run, report on tiny runs

TINY_LEDGER = """
specs:
  tiny: {step_seconds: 0.5, analyses: [eval]}
entries:
  - {id: tiny-seqavg, figure: Fig. T, spec: tiny, metric: eval.seq_avg, paper: PAPER_OK, priority: 1}
  - {id: tiny-t8-miss, figure: Fig. T, spec: tiny, metric: eval.t8, paper: PAPER_MISS, priority: 1}
  - id: tiny-claim
    figure: Fig. T
    spec: tiny
    claim: "the model beats GD-1 by a factor 100"
    checks: ["eval.seq_avg < 0.01 * eval.gd1.seq_avg"]
    priority: 2
"""


def test_budget_stops_like_sigterm_and_the_next_call_resumes_to_the_uninterrupted_result(tmp_path):
    steps = 3000  # ~1 ms each: a 1.5 s budget runs out inside the training loop (after compilation)
    experiments = _tiny_experiments(tmp_path, train={"steps": steps, "eval_every": 1000, "checkpoint_every": 1000,
                                                     "log_every": 100})
    ledger = load_ledger(_write_ledger(tmp_path, TINY_LEDGER.replace("PAPER_OK", "1").replace("PAPER_MISS", "1")),
                         experiments)
    results = tmp_path / "results"
    said = []
    first = reproduce_run(ledger, None, budget_s=1.5, results_dir=results, experiments_dir=experiments,
                          progress=False, say=said.append)
    assert first.stopped == "budget" and [s.what for s in first.stages] == ["train"]
    assert f"training from step 0 of {steps}" in said[0] and "budget left" in said[0]
    status = ledger_status(ledger, None, results, experiments)
    stopped_at = int(status[0].state.split()[1].split("/")[0])
    assert 1 <= stopped_at < steps and status[0].state == f"training {stopped_at}/{steps} steps"
    assert status[0].within is None
    assert status[0].cpu_left_s == pytest.approx((steps - stopped_at) * 0.5 + 120.0)  # steps left, then analyses
    assert [p.name for p in (results / "tiny" / "checkpoints").iterdir()] == [str(stopped_at)]  # the step saved

    nothing = reproduce_run(ledger, None, budget_s=0.0, results_dir=results, experiments_dir=experiments,
                            progress=False, say=said.append)
    assert nothing.stopped == "budget" and nothing.stages == []  # no budget: nothing starts

    second = reproduce_run(ledger, None, results_dir=results, experiments_dir=experiments, progress=False,
                           say=said.append)
    assert second.stopped is None and [s.what for s in second.stages] == ["train", "eval"]
    assert [p.name for p in (results / "tiny" / "checkpoints").iterdir()] == [str(steps)]  # one checkpoint kept
    sessions = read_sessions(results / "tiny")  # the budget's stop, then the rest
    assert [(s["from_step"], s["to_step"], s["interrupted"]) for s in sessions] == \
        [(0, stopped_at, True), (stopped_at, steps, False)]
    provenance = run_provenance(results / "tiny")
    assert (provenance.sessions, provenance.recorded_steps, provenance.trained_steps) == (2, steps, steps)
    assert provenance.machines == (machine_label(runtime.machine()),)  # both sessions on this machine
    resumed = json.loads((results / "tiny" / f"eval_step{steps}.json").read_text())

    straight = tmp_path / "straight"
    reproduce_run(ledger, None, results_dir=straight, experiments_dir=experiments, progress=False, say=said.append)
    uninterrupted = json.loads((straight / "tiny" / f"eval_step{steps}.json").read_text())
    np.testing.assert_allclose(resumed["per_position_loss"], uninterrupted["per_position_loss"], rtol=1e-5)

    third = reproduce_run(ledger, None, results_dir=results, experiments_dir=experiments, progress=False,
                          say=said.append)
    assert third.stages == [] and third.stopped is None  # nothing left to do


def test_status_and_report_show_a_miss_as_a_miss(tmp_path):
    experiments = _tiny_experiments(tmp_path)
    results = tmp_path / "results"
    probe = load_ledger(_write_ledger(tmp_path, TINY_LEDGER.replace("PAPER_OK", "1").replace("PAPER_MISS", "1")),
                        experiments)
    reproduce_run(probe, ["tiny-seqavg"], results_dir=results, experiments_dir=experiments, progress=False,
                  say=lambda _: None)
    record = json.loads((results / "tiny" / "eval_step6.json").read_text())
    ours_seq, ours_t8 = record["seq_avg_loss"], record["per_position_loss"][7]
    ledger = load_ledger(_write_ledger(tmp_path, TINY_LEDGER.replace("PAPER_OK", f"{ours_seq * 1.05:.6f}")
                                       .replace("PAPER_MISS", f"{ours_t8 * 3:.6f}")), experiments)
    by_id = {s.entry.id: s for s in ledger_status(ledger, None, results, experiments)}
    ok, miss, claim = by_id["tiny-seqavg"], by_id["tiny-t8-miss"], by_id["tiny-claim"]
    assert ok.state == miss.state == claim.state == "done"
    assert ok.ours == pytest.approx(ours_seq) and ok.ratio == pytest.approx(1 / 1.05, rel=1e-4) and ok.within
    assert miss.ratio == pytest.approx(1 / 3, rel=1e-4) and miss.within is False
    assert claim.within is False  # a tiny model does not beat GD-1 by a factor 100
    machine = ok.trained_on["tiny"]  # the one recorded session's machine: this one
    assert len(machine) == 1 and machine[0].startswith("cpu (") and ok.to_json()["trained_on"] == {"tiny": [machine[0]]}
    assert ledger_status(ledger, ["tiny-claim"], results, experiments)[0].entry.id == "tiny-claim"
    with pytest.raises(MesaError, match="did you mean 'tiny-claim'"):
        ledger_status(ledger, ["tiny-clam"], results, experiments)

    report = write_report(list(by_id.values()), results).read_text()
    assert "**MISS**" in report and "`tiny-t8-miss`" in report.split("Misses:")[1].splitlines()[0]
    assert "**FAILS**" in report and "| within |" in report
    figure = results / "figures" / "fig-t-position.png"
    assert figure.is_file() and f"figures/{figure.name}" in report
    # how the record was made: the one session that trained the 6 steps, on this machine
    row = next(line for line in report.split("## How the record was made")[1].splitlines()
               if line.startswith("| tiny |"))
    assert row.startswith("| tiny | 6 | 1 (6 steps) | cpu (") and "CPUs)" in row
    assert "authors' test seqs" not in report and ok.ours_authors is None  # the spec does not run eval_authors
    console = Console(width=200, record=True)
    console.print(render.ledger_table(list(by_id.values())))
    assert "authors'" not in console.export_text()

    # eval_authors: the same metrics on the authors' test sequences, beside ours, the verdict still on ours
    authors_text = TINY_LEDGER.replace("analyses: [eval]", "analyses: [eval, eval_authors]")
    ledger = load_ledger(_write_ledger(tmp_path, authors_text.replace("PAPER_OK", f"{ours_seq * 1.05:.6f}")
                                       .replace("PAPER_MISS", f"{ours_t8 * 3:.6f}")), experiments)
    assert ledger_status(ledger, ["tiny-seqavg"], results, experiments)[0].ours_authors is None  # not made yet
    again = reproduce_run(ledger, None, results_dir=results, experiments_dir=experiments, progress=False,
                          say=lambda _: None)
    assert [s.what for s in again.stages] == ["eval_authors"]  # trained and evaluated already: only the new one
    theirs = json.loads((results / "tiny" / "eval_authors_step6.json").read_text())
    assert theirs["test_set"] == "authors" and theirs["per_position_loss"] != record["per_position_loss"]
    by_id = {s.entry.id: s for s in ledger_status(ledger, None, results, experiments)}
    ok, miss = by_id["tiny-seqavg"], by_id["tiny-t8-miss"]
    assert ok.ours_authors == pytest.approx(theirs["seq_avg_loss"]) and ok.ours == pytest.approx(ours_seq)
    assert miss.ours_authors == pytest.approx(theirs["per_position_loss"][7]) and miss.within is False
    assert by_id["tiny-claim"].ours_authors is None and ok.to_json()["ours_authors"] == ok.ours_authors
    assert miss.within_on_authors is False and by_id["tiny-claim"].within_on_authors is None
    drawn = dataclasses.replace(miss, ours_authors=miss.paper * 1.05)  # a miss on ours, within on theirs
    assert drawn.within_on_authors is True and drawn.to_json()["within_on_authors"] is True
    text = write_report([ok, drawn], results).read_text()
    assert "Of these, within tolerance on the authors' own test data" in text.split("`tiny-t8-miss`")[1]
    assert "Of these" not in write_report([ok, miss], results).read_text()
    report = write_report(list(by_id.values()), results).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| `tiny-seqavg` |"))
    assert f"| {metrics.fmt_value(ok.ours_authors)} |" in row and "| within |" in row
    assert "ours, authors' test seqs" in report
    console = Console(width=200, record=True)  # `reproduce status`: the same column
    console.print(render.ledger_table(list(by_id.values())))
    table = console.export_text()
    assert "on authors' seqs" in table and metrics.fmt_value(ok.ours_authors) in table.split("tiny-seqavg")[1]


def test_status_marks_a_run_of_another_spec_as_outdated(tmp_path):
    experiments = _tiny_experiments(tmp_path)
    ledger = load_ledger(_write_ledger(tmp_path, TINY_LEDGER.replace("PAPER_OK", "1").replace("PAPER_MISS", "1")),
                         experiments)
    results = tmp_path / "results"
    reproduce_run(ledger, ["tiny-seqavg"], results_dir=results, experiments_dir=experiments, progress=False,
                  say=lambda _: None)
    _tiny_experiments(tmp_path, train={"lr": 5e-3})  # the shipped spec changed since
    status = ledger_status(ledger, ["tiny-seqavg"], results, experiments)[0]
    assert status.state == "outdated (spec changed)"
    with pytest.raises(MesaError, match="trained with a spec other than the shipped tiny.yaml"):
        reproduce_run(ledger, ["tiny-seqavg"], results_dir=results, experiments_dir=experiments, progress=False,
                      say=lambda _: None)


def test_an_entry_on_a_run_of_several_seeds_reads_their_mean_and_shows_each(tmp_path):
    experiments = _tiny_experiments(tmp_path, train={"seeds": 2, "seed": 3})
    ledger = load_ledger(_write_ledger(tmp_path, TINY_LEDGER.replace("PAPER_OK", "1").replace("PAPER_MISS", "1")),
                         experiments)
    results = tmp_path / "results"
    reproduce_run(ledger, ["tiny-t8-miss"], results_dir=results, experiments_dir=experiments, progress=False,
                  say=lambda _: None)
    status = ledger_status(ledger, ["tiny-t8-miss"], results, experiments)[0]
    assert status.done and len(status.ours_per_seed) == 2 and status.ours_per_seed[0] != status.ours_per_seed[1]
    assert status.ours == pytest.approx(np.mean(status.ours_per_seed), rel=1e-6)  # the mean curve's value
    assert json.loads(json.dumps(status.to_json()))["ours_per_seed"] == list(status.ours_per_seed)
    a, b = (metrics.fmt_value(v) for v in status.ours_per_seed)
    assert status.ours_text() == f"{metrics.fmt_value(status.ours)} (seeds {a} / {b})"
    assert f"(seeds {a} / {b})" in write_report([status], results_dir=results).read_text()


LONGER_LEDGER = """
specs:
  tiny: {step_seconds: 0.5, analyses: [eval]}
  tiny_long: {step_seconds: 0.5, analyses: [eval], start_from: tiny}
entries:
  - {id: short, figure: Fig. T, spec: tiny, metric: eval.seq_avg, paper: 1, priority: 1}
  - {id: long, figure: Fig. T, spec: tiny_long, metric: eval.seq_avg, paper: 1, priority: 2}
"""


def test_a_longer_run_starts_from_the_shorter_one(tmp_path):
    experiments = _tiny_experiments(tmp_path)  # tiny: 6 steps
    (experiments / "tiny_long.yaml").write_text(yaml.safe_dump(merge(TINY, {"name": "tiny_long",
                                                                          "train": {"steps": 10}})))
    ledger = load_ledger(_write_ledger(tmp_path, LONGER_LEDGER), experiments)
    results = tmp_path / "results"
    before = {s.entry.id: s for s in ledger_status(ledger, None, results, experiments)}
    assert before["long"].cpu_left_s == pytest.approx(10 * 0.5 + 120.0)  # nothing to start from yet
    reproduce_run(ledger, ["short"], results_dir=results, experiments_dir=experiments, progress=False,
                  say=lambda _: None)
    waiting = ledger_status(ledger, ["long"], results, experiments)[0]
    assert waiting.state == "missing" and waiting.cpu_left_s == pytest.approx((10 - 6) * 0.5 + 120.0)
    said = []
    report = reproduce_run(ledger, ["long"], results_dir=results, experiments_dir=experiments, progress=False,
                           say=said.append)
    assert [s.what for s in report.stages] == ["train", "eval"] and report.stages[0].detail.startswith("step 10/10, ")
    assert f"training from step 6 of 10 (from {results / 'tiny'})" in said[0]
    # that the started run equals the straight one is tests/test_train.py's (train --start-from); here: it started
    # from the short run's checkpoint, whose metric lines it carries on
    steps = [json.loads(line)["step"] for line in (results / "tiny_long" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 10
    # a start_from that is not the same recipe is refused when the ledger loads
    (experiments / "tiny_long.yaml").write_text(yaml.safe_dump(merge(TINY, {"name": "tiny_long",
                                                                          "train": {"steps": 10, "lr": 2e-2}})))
    with pytest.raises(MesaError, match=r"tiny_long is not a longer run of tiny \(train.lr"):
        load_ledger(_write_ledger(tmp_path, LONGER_LEDGER), experiments)


def test_a_spec_with_compact_checkpoints_commits_them(tmp_path):
    from mesacli.checkpoint import Checkpoints

    experiments = _tiny_experiments(tmp_path)
    ledger = load_ledger(_write_ledger(tmp_path, TINY_LEDGER.replace("PAPER_OK", "1").replace("PAPER_MISS", "1")
                                       .replace("analyses: [eval]}", "analyses: [eval], compact_checkpoints: true}")),
                         experiments)
    assert ledger.specs["tiny"].compact_checkpoints
    results = tmp_path / "results"
    reproduce_run(ledger, None, results_dir=results, experiments_dir=experiments, progress=False, say=lambda _: None)
    ckpts = Checkpoints(results / "tiny" / "checkpoints", read_only=True)
    assert ckpts.restore_meta()["moments_dtype"] == "bfloat16"
    ckpts.close()


def test_specs_with_work_and_one_spec_of_the_work(tmp_path):
    experiments = _tiny_experiments(tmp_path)
    (experiments / "tiny_long.yaml").write_text(yaml.safe_dump(merge(TINY, {"name": "tiny_long",
                                                                          "train": {"steps": 10}})))
    ledger = load_ledger(_write_ledger(tmp_path, LONGER_LEDGER), experiments)
    results = tmp_path / "results"
    assert specs_with_work(ledger, None, results, experiments) == ["tiny", "tiny_long"]
    report = reproduce_run(ledger, None, results_dir=results, experiments_dir=experiments, progress=False,
                           say=lambda _: None, specs=["tiny"])  # one job of --jobs: this spec's work only
    assert report.specs == ["tiny"] and [s.spec for s in report.stages] == ["tiny", "tiny"]
    assert specs_with_work(ledger, None, results, experiments) == ["tiny_long"]
    assert specs_with_work(ledger, ["short"], results, experiments) == []
    (results / "tiny" / "eval_step6.json").unlink()  # a missing record is work again (no training)
    assert specs_with_work(ledger, ["short"], results, experiments) == ["tiny"]


@pytest.mark.filterwarnings("ignore:os.fork")  # the parent here has JAX threads; `reproduce run` has none
def test_jobs_run_at_most_n_at_once_after_what_they_wait_for_and_restart_a_stall(tmp_path):
    # each child logs "start"/"end" lines with times; job "c" waits for "a"; "b" stalls once (exit 75)
    log = tmp_path / "log"
    child = ("import sys, time, pathlib; name, log = sys.argv[1], pathlib.Path(sys.argv[2]); "
             "tries = log.with_name(name + '.tries'); n = int(tries.read_text()) if tries.exists() else 0; "
             "tries.write_text(str(n + 1)); "
             "f = open(log, 'a'); f.write(f'{time.time()} start {name}\\n'); f.flush(); time.sleep(0.6); "
             "f.write(f'{time.time()} end {name}\\n'); f.close(); sys.exit(75 if name == 'b' and n == 0 else 0)")
    said = []
    code = run_jobs(["a", "b", "c", "d"], lambda name, left: [sys.executable, "-c", child, name, str(log)], jobs=2,
                    budget_s=600.0, restarts=2, waits_for=lambda name: "a" if name == "c" else None,
                    say=said.append, poll_s=0.05)
    assert code == 0
    events = [line.split() for line in log.read_text().splitlines()]
    at_once, most = 0, 0
    for _, what, _ in sorted(events, key=lambda e: float(e[0])):
        at_once += 1 if what == "start" else -1
        most = max(most, at_once)
    assert most == 2, events  # two children at a time, never more
    start = {name: float(t) for t, what, name in events if what == "start"}
    end = {name: float(t) for t, what, name in events if what == "end"}
    assert start["c"] >= end["a"]  # c waited for a
    assert (tmp_path / "b.tries").read_text() == "2" and "b: the run stalled" in said[0]
    assert run_jobs(["x"], lambda name, left: [sys.executable, "-c", "import sys; sys.exit(3)"], jobs=2,
                    budget_s=None, restarts=1, poll_s=0.05) == 3  # a failure is reported, not retried
    assert run_jobs(["x"], lambda name, left: [sys.executable, "-c", "pass"], jobs=2, budget_s=0.0,
                    restarts=1, poll_s=0.05) == 0  # no budget: nothing starts


ICL_LEDGER = """
specs:
  tiny: {step_seconds: 0.1, analyses: ["tune:both", "icl:plain,eos,tuned", "icl_continual:plain"],
         tune_steps: 3, tune_prefix_len: 2, icl_seeds: 1, icl_batch: 16}
entries:
  - {id: icl-falls, figure: Fig. I, spec: tiny, claim: "label loss falls", checks: ["icl.plain.falls"], priority: 1}
  - {id: icl-eos, figure: Fig. I, spec: tiny, claim: "EOS helps", checks: ["icl.eos.i4 < icl.plain.i4"], priority: 1}
  - {id: icl-tuned, figure: Fig. I, spec: tiny, claim: "prefix helps", checks: ["icl.tuned.i4 < 2 * icl.ar_lsq.i4"],
     priority: 1}
  - {id: icl-switch, figure: Fig. I, spec: tiny, claim: "rebounds", checks: ["icl_continual.plain.rebounds"],
     priority: 1}
"""


@pytest.mark.slow
def test_a_few_shot_entry_trains_tunes_and_evaluates_then_reports(tmp_path):
    experiments = _tiny_experiments(tmp_path, task={"state_dim": 3, "obs_dim": 3, "seq_len": 16},
                                    model={"attention": "softmax"},
                                    train={"steps": 20, "batch_size": 16, "lr": 3e-2, "eval_every": 20,
                                           "checkpoint_every": 10})
    ledger = load_ledger(_write_ledger(tmp_path, ICL_LEDGER), experiments)
    results = tmp_path / "results"
    report = reproduce_run(ledger, None, results_dir=results, experiments_dir=experiments, progress=False,
                           say=lambda _: None)
    assert [s.what for s in report.stages] == ["train", "tune:both", "icl:plain,eos,tuned", "icl_continual:plain"]
    run = results / "tiny"
    for stage in ("eos", "prefix"):  # one checkpoint kept per tuning stage, at the last step
        assert [p.name for p in (run / "prompt_tune" / stage / "checkpoints").iterdir()] == ["3"]
    statuses = ledger_status(ledger, None, results, experiments)
    assert all(s.state == "done" and s.within is not None for s in statuses), [s.state for s in statuses]
    values = {k: v for s in statuses for k, v in s.values.items()}
    assert isinstance(values["tiny:icl.plain.falls"], bool) and values["tiny:icl.eos.i4"] > 0
    text = write_report(statuses, results).read_text()
    assert "fig-i-icl.png" in text and (results / "figures" / "fig-i-icl.png").is_file()


def test_a_blocked_entry_is_listed_with_its_reason_and_not_produced(tmp_path):
    experiments = _tiny_experiments(tmp_path)
    ledger = load_ledger(_write_ledger(tmp_path, """
specs:
  tiny: {step_seconds: 0.5, analyses: [eval]}
entries:
  - {id: b, figure: F, spec: tiny, metric: probe.prop2.chebyshev.t8, paper: 1, priority: 1, blocked: "not built"}
"""), experiments)
    (status,) = ledger_status(ledger, None, tmp_path / "results", experiments)
    assert status.state == "blocked: not built" and status.within is None
    report = reproduce_run(ledger, None, results_dir=tmp_path / "results", experiments_dir=experiments,
                           progress=False, say=lambda _: None)
    assert report.stages == [] and not (tmp_path / "results" / "tiny").exists()


def test_cli_status_json_and_a_bad_budget(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mesacli.cli", "reproduce", "status", "--json", "--results",
                          str(tmp_path / "empty")], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert len(rows) == len(load_ledger().entries)
    assert {"id", "paper", "ours", "within", "state"} <= set(rows[0])
    model_free = [r for r in rows if (r["metric"] or "").startswith("solver.")]  # need no trained model
    assert model_free and all(r["state"] == "analysis pending" for r in model_free)
    assert all(("missing" in r["state"] or r["state"].startswith("blocked:")) and r["within"] is None
               for r in rows if r not in model_free)
    assert all(machines == [] for r in rows for machines in r["trained_on"].values())  # nothing trained yet
    bad = subprocess.run([sys.executable, "-m", "mesacli.cli", "reproduce", "run", "--budget", "soon",
                          "--results", str(tmp_path / "empty")], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--budget: 'soon' is not a duration" in bad.stderr + bad.stdout


# ----------------------------------------------------------------------------- the committed record


def test_committed_results_stay_within_the_size_caps():
    if not RESULTS.is_dir():
        pytest.skip("no results/ in this checkout")
    total = 0
    for run in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
        total += size
        assert size <= 5 * MB, f"results/{run.name}: {size / MB:.1f} MB > 5 MB"
        for ckpt_dir in run.rglob("checkpoints"):
            kept = [p for p in ckpt_dir.iterdir() if p.is_dir()]
            assert len(kept) <= 1, f"{ckpt_dir}: {len(kept)} checkpoints (the record keeps one)"
        for log in run.rglob("*.jsonl"):
            assert sum(1 for _ in log.open()) <= 5000, f"{log}: more than 5000 lines"
    total += sum(f.stat().st_size for f in RESULTS.iterdir() if f.is_file())
    assert total <= 60 * MB, f"results/: {total / MB:.1f} MB > 60 MB"


def test_committed_results_are_resumable_runs_of_the_shipped_specs():
    if not RESULTS.is_dir():
        pytest.skip("no results/ in this checkout")
    ledger = load_ledger()
    statuses = ledger_status(ledger, None, RESULTS)
    assert not any(s.state.startswith("outdated") for s in statuses)
    for name in {n for s in statuses for n in s.entry.specs()}:
        run = RESULTS / name
        if run.is_dir():
            assert (run / "spec.yaml").is_file()


def test_icl_figures_show_only_the_setting_their_checks_read():
    """Fig. 8A (one task) must not draw the continual curves of Fig. 8B, and the other way round."""
    from mesacli.reproduce.ledger import load_ledger
    from mesacli.reproduce.report import icl_settings

    entries = load_ledger().entries
    fig8a = [e for e in entries if e.figure == "Fig. 8A"]
    fig8b = [e for e in entries if e.figure == "Fig. 8B"]
    assert icl_settings(fig8a) == {"icl_softmax7_t224": {False}}
    assert icl_settings(fig8b) == {"icl_softmax7_t224": {True}}
    assert icl_settings(fig8a + fig8b) == {"icl_softmax7_t224": {False, True}}


def test_machine_label_reads_session_lines_old_and_new():
    assert machine_label({"platform": "cpu", "host": "x86_64, 2 CPUs"}) == "cpu (x86_64, 2 CPUs)"
    new = {"platform": "gpu", "device": "cuda:0", "device_kind": "NVIDIA H100 80GB HBM3", "devices": 1}
    old = {"platform": "gpu", "device": "NVIDIA H100 80GB HBM3", "devices": 1}  # before runtime.machine()
    assert machine_label(new) == machine_label(old) == "gpu: NVIDIA H100 80GB HBM3 x1"
