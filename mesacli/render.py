"""Renderers of the CLI: each turns one library result into a rich table (or a group of table and lines).

They compute nothing that the library has not computed; ``mesacli.cli`` prints what they return.  Heavy
imports (numpy, jax through the library) happen inside the functions, so that `mesacli --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

REPORT_POSITIONS = (1, 5, 10, 25, 50)


def positions(seq_len: int) -> tuple[int, ...]:
    """The positions shown in a loss table: 1, 5, 10, T/2 and T."""
    return tuple(sorted({1, 5, 10, seq_len // 2, seq_len}))


def loss_table(title: str, rows: list[tuple[str, dict]], shown: Sequence[int] = REPORT_POSITIONS) -> Table:
    """rows: (name, {"curve": per-position loss, optional "params", "steps", "seconds"})."""
    import numpy as np

    table = Table(title=title, title_justify="left")
    table.add_column("model / baseline")
    table.add_column("params", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("time", justify="right")
    table.add_column("test loss (seq. avg)", justify="right", style="bold")
    for t in shown:
        table.add_column(f"t={t}", justify="right")
    for name, row in rows:
        curve = np.asarray(row["curve"])
        cells = [f"{curve[t - 1]:.4f}" if t <= len(curve) else "-" for t in shown]
        table.add_row(
            name,
            f"{row['params']:,}" if row.get("params") else "-",
            str(row["steps"]) if row.get("steps") else "-",
            f"{row['seconds']:.0f}s" if row.get("seconds") else "-",
            f"{float(np.mean(curve)):.4f}",
            *cells,
        )
    return table


def train_result(spec: Any, run_dir: Path, result: Any, num_params: int) -> Group:
    """`mesacli train`: the per-position test loss of the trained model (mean and spread over seeds)."""
    parts: list[Any] = [loss_table(f"{spec.name} ({run_dir})", [(spec.name, {
        "curve": result.eval_curve, "params": num_params, "steps": result.step, "seconds": result.seconds})],
        shown=positions(spec.task.seq_len))]
    if result.eval_curves is not None and len(result.eval_curves) > 1:
        from mesacli.rundir import replica_seeds

        per_seed = result.eval_curves.mean(axis=1)
        each = ", ".join(f"seed {s}: {x:.4f}" for s, x in zip(replica_seeds(spec.train), per_seed, strict=True))
        parts.append(Text(f"{len(per_seed)} seeds: sequence-averaged test loss {per_seed.mean():.4f} "
                          f"± {per_seed.std():.4f} ({each})"))
    parts.append(Text(f"outputs: {run_dir}/metrics.jsonl, eval_curve.json, loss_per_position.png, "
                      "training_curve.png"))
    return Group(*parts)


def eval_report(report: Any) -> Group:
    """`mesacli eval`: the checkpoint's per-position test loss next to the baselines."""
    rows = [(name, {"curve": curve, "steps": report.step if i == 0 else None})
            for i, (name, curve) in enumerate(report.curves.items())]
    where = " on the authors' test batches" if report.test_set == "authors" else ""
    return Group(loss_table(f"{report.spec.name}: test loss{where}", rows, shown=positions(report.spec.task.seq_len)),
                 Text(f"outputs: {report.json_path}, {report.plot_path}"))


def quickstart_table(rows: Iterable[Any]) -> Table:
    """`mesacli quickstart`: LSA-1 and Mesa-1 next to GD-1 and ridge LSQ."""
    return loss_table("quick start: next-token test loss on linear dynamics (T=50, constructed tokens)",
                      [(r.name, {"curve": r.curve, "params": r.params, "steps": r.steps, "seconds": r.seconds})
                       for r in rows])


def _number(x: float | None, digits: int = 2) -> str:
    """Numbers for the bench table: '-' when missing, fewer decimals when large."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if x >= 1 else f"{x:.{digits + 1}g}"


def _ratio_pair(a: float | None, b: float | None) -> str:
    """'1.52× / 12.3×' for two ratios ('-' for a missing one)."""
    def one(x):
        return "-" if x is None else f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"

    return "-" if a is None and b is None else f"{one(a)} / {one(b)}"


def _cg_steps(row: dict) -> str:
    return "" if row.get("cg_steps_max") is None else f"{row['cg_steps_mean']:.1f} / {row['cg_steps_max']}"


def bench_table(result: dict) -> Table:
    """`mesacli bench`: one row per (T, kernel): times, memory, time / memory / matmul-FLOP ratios to chunked linear
    attention, mesa speed-up and, when a MesaNet CG kernel ran, its CG steps per query (mean / max) and largest
    relative residual."""
    cfg = result["config"]
    with_cg = any(row.get("cg_steps_max") is not None for row in result["rows"])
    table = Table(title=f"attention kernels on {cfg['device']} (B={cfg['batch']}, H={cfg['heads']}, "
                        f"D={cfg['d_head']}, chunk={cfg['chunk_size']}, {cfg['dtype']}, median of "
                        f"{cfg['repeats']}; memory = compiled estimate; allocator {cfg.get('allocator', '?')})",
                  title_justify="left")
    for name, justify in [("T", "right"), ("kernel", "left"), ("fwd ms", "right"), ("fwd+bwd ms", "right"),
                          ("fwd MiB", "right"), ("fwd+bwd MiB", "right"), ("time ×linear\nfwd / fwd+bwd", "right"),
                          ("memory ×linear\nfwd / fwd+bwd", "right"), ("FLOP ×linear\nfwd / fwd+bwd", "right"),
                          ("seq ÷ chunked\nfwd / fwd+bwd", "right"),
                          *([("CG steps\nmean / max", "right"), ("CG max\nresidual", "right")] if with_cg else []),
                          ("note", "left")]:
        table.add_column(name, justify=justify, no_wrap=name == "kernel")
    last_t = None
    for row, ratio in zip(result["rows"], result["ratios"], strict=True):
        if last_t is not None and row["T"] != last_t:
            table.add_section()
        last_t = row["T"]
        note = "; ".join(x for x in (row["skipped"], row["note"]) if x)
        table.add_row(
            str(row["T"]), cfg["labels"][row["kernel"]], _number(row["fwd_ms"]), _number(row["fwd_bwd_ms"]),
            _number(row["fwd_mem_mib"], 1), _number(row["fwd_bwd_mem_mib"], 1),
            _ratio_pair(ratio["fwd_ms_vs_linear"], ratio["fwd_bwd_ms_vs_linear"]),
            _ratio_pair(ratio["fwd_mem_mib_vs_linear"], ratio["fwd_bwd_mem_mib_vs_linear"]),
            _ratio_pair(ratio["fwd_gflop_vs_linear"], ratio["fwd_bwd_gflop_vs_linear"]),
            "" if row["kernel"] != "mesa_chunked" else _ratio_pair(ratio["seq_over_chunked_fwd"],
                                                                  ratio["seq_over_chunked_fwd_bwd"]),
            *([_cg_steps(row), "" if row.get("cg_residual_max") is None else f"{row['cg_residual_max']:.1e}"]
              if with_cg else []),
            note,
        )
    return table


def seeds_bench_table(results: list[dict], seeds: int, steps: int, repeats: int) -> Table:
    """`mesacli bench-seeds`: steps/s of 1 seed, S seeds in one program and S sequential runs (wall), and the CPU
    time per replica-step of each."""
    table = Table(title=f"training throughput on {results[0]['devices']} {results[0]['platform']} device(s), "
                        f"median of {repeats} interleaved rounds of {steps} steps")
    for column in ("spec", "batch", "1 seed steps/s", f"{seeds} seeds in one program: steps/s",
                   "replica-steps/s", f"{seeds} sequential runs: replica-steps/s", "speed-up",
                   "CPU ms per replica-step (1 / S)", "speed-up (CPU time)", "replica group", "compile s (1 / S)"):
        table.add_column(column, justify="left" if column == "spec" else "right")
    for r in results:
        one, many = r["one_seed"], r["one_program"]
        table.add_row(r["spec"], str(r["batch_size"]), f"{one['steps_per_s']:.2f}",
                      f"{many['steps_per_s']:.2f}", f"{many['replica_steps_per_s']:.2f}",
                      f"{r['sequential_runs']['replica_steps_per_s']:.2f}", f"{r['speedup_vs_sequential']:.2f}x",
                      f"{1e3 * one['cpu_s']:.1f} / {1e3 * many['cpu_s_per_replica']:.1f}",
                      f"{r['speedup_vs_sequential_cpu']:.2f}x", str(many["replica_group"]),
                      f"{one['compile_s']:.1f} / {many['compile_s']:.1f}")
    return table


def train_bench_table(result: dict) -> Table:
    """`mesacli bench-train`: per spec s/step, steps/s, compile time, data-generation share, matmul GFLOP per step
    (and XLA's count), model GFLOP/s and mfu against the float32 matmul rate of the same run."""
    mm = result["matmul"]
    table = Table(title=f"training steps on {result['devices']} {result['device_kind']} device(s), median of "
                        f"{result['repeats']} x {result['steps']} steps; float32 {mm['n']}² matmul "
                        f"{result['matmul_gflops']:.1f} GFLOP/s (before / after the specs: {mm['gflops_before']:.1f}"
                        f" / {mm['gflops_after']:.1f})", title_justify="left",
                  caption="GFLOP: matmul FLOPs per step (forward + backward + optimiser, data generation excluded); "
                          "mfu = GFLOP/s ÷ the matmul's GFLOP/s", caption_justify="left")
    for column in ("spec", "B × T", "micro\nbatch", "params", "compile\ns", "s/step", "CPU s\n/step", "steps/s",
                   "data\nshare",
                   "GFLOP\n/step", "XLA GFLOP\n(loops once)", "GFLOP/s", "mfu"):
        table.add_column(column, justify="left" if column == "spec" else "right", no_wrap=column == "spec")
    for r in result["rows"]:
        micro = str(r["micro_batch"] or "-") + (" (auto)" if r.get("micro_batch_auto") else "")
        table.add_row(r["spec"], f"{r['batch_size']} × {r['seq_len']}", micro,
                      f"{r['params']:,}", f"{r['compile_s']:.1f}", _number(r["s_per_step"], 3),
                      _number(r.get("cpu_s_per_step"), 3), _number(r["steps_per_s"]), f"{r['data_share']:.0%}",
                      _number(r["gflops"]),
                      _number(r["xla_gflops"]), _number(r["gflops_per_s"]), f"{r['mfu']:.3f}")
    return table


def probe_report(run_dir: Path, result: Any) -> Group:
    """`mesacli probe`: one line of key numbers per analysis (and replica), the skipped ones, where the files are."""
    from mesacli.probe import headline

    table = Table(title=f"mesacli probe: {run_dir} (step {result.step}, {result.seconds:.0f}s)", title_justify="left")
    table.add_column("analysis")
    table.add_column("key numbers")
    for replica_seed, results in (result.per_replica or {None: result.results}).items():
        for name, r in results.items():
            table.add_row(name if replica_seed is None else f"{name} (seed {replica_seed})", headline(name, r))
    for name, why in result.skipped.items():
        table.add_row(name, f"skipped: {why}")
    where = result.summary_path.parent if not result.per_replica else result.summary_path.parent.parent
    return Group(table, Text(f"outputs: {where}/ (summary.md{', one folder per seed' if result.per_replica else ''}, "
                             f"{len(result.files)} files from this call)"))


def specs_table(directory: Path, specs: list[tuple[Path, str]]) -> Table:
    """`mesacli specs`: each spec file and the first comment line (what it reproduces)."""
    table = Table(title=f"specs in {directory}", title_justify="left")
    table.add_column("spec")
    table.add_column("reproduces")
    for path, first in specs:
        table.add_row(path.name, first)
    return table


def icl_report(report: Any) -> Group:
    """`mesacli icl-eval`: per-example label loss at examples 1, 5, 10, 20, 40, 68 (those that exist),
    mean ± std over seeds."""
    from mesacli.icl.evaluate import REPORT_EXAMPLES

    shown = [i for i in REPORT_EXAMPLES if i <= report.n_examples] or [report.n_examples]
    if report.n_examples not in shown and report.n_examples < REPORT_EXAMPLES[-1]:
        shown.append(report.n_examples)
    meta = report.meta
    title = (f"{report.spec.name} @ step {report.step}: in-context regression label loss, mean ± std over "
             f"{meta['seeds']} seeds x {meta['batch']} prompts (x ~ {meta['x_dist_source']})")
    if meta["continual_switch_at"]:
        title += f"; task switch after example {meta['continual_switch_at']}"
    table = Table(title=title, title_justify="left")
    table.add_column("model / baseline")
    for i in shown:
        table.add_column(f"i={i}", justify="right")
    for name, curve in report.curves.items():
        table.add_row(name, *[f"{curve['mean'][i - 1]:.4f} ± {curve['std'][i - 1]:.4f}" for i in shown])
        if "median" in curve:
            table.add_row(f"  {name.rsplit(' (', 1)[0]}, median", *[f"{curve['median'][i - 1]:.4f}" for i in shown])
    return Group(table, Text(f"outputs: {report.json_path}, {report.plot_path}"))


def prompt_tune_table(run_dir: Path, results: list[Any]) -> Table:
    """`mesacli prompt-tune`: per stage (and replica) the held-out label loss before and after tuning."""
    table = Table(title=f"prompt-tune {run_dir} (model frozen; label loss on held-out prompts)", title_justify="left")
    for name in ("stage", "steps", "held-out before", "held-out after", "time", "outputs"):
        table.add_column(name, justify="left" if name in ("stage", "outputs") else "right")
    for r in results:
        resumed = f" (resumed from {r.resumed_from})" if r.resumed_from is not None else ""
        stage = r.stage if r.replica is None else f"{r.stage} (seed {r.replica})"
        table.add_row(stage, f"{r.step}{resumed}", f"{r.heldout_before:.4f}", f"{r.heldout_after:.4f}",
                      f"{r.seconds:.0f}s", f"{r.loss_path}, {r.plot_path}")
    return table


def lm_table(rows: list[dict], title: str) -> Table:
    """`mesacli lm train / eval / compare`: validation loss, bits per token, perplexity and ICL score per model."""
    table = Table(title=title, title_justify="left")
    for name in ("model", "layers", "params", "steps", "tokens", "wall time", "val loss (nats)", "bits/token",
                 "perplexity", "ICL score"):
        table.add_column(name, justify="left" if name in ("model", "layers") else "right")
    for r in rows:
        layers = "+".join(r["layers"]) + (" (MLP)" if r["mlp"] else "") + (" key-shift" if r["key_shift"] else "")
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        table.add_row(r["name"], layers, f"{r['params']:,}", str(r["steps"]), f"{r['tokens']:,}", seconds,
                      f"{r['val_loss']:.4f}", f"{r['val_bits_per_token']:.4f}", f"{r['val_perplexity']:.2f}",
                      f"{r['icl_score']:+.4f}")
    return table


def icl_score_title(spec: Any) -> str:
    """The ICL-score definition of a language-model table title."""
    return f"ICL score = loss at token {spec.eval.icl_late} - loss at token {spec.eval.icl_early}"


def ledger_table(statuses: list[Any]) -> Group:
    """`mesacli reproduce status`: one row per ledger entry, then the totals."""
    from mesacli.reproduce.metrics import fmt_value
    from mesacli.reproduce.report import verdict
    from mesacli.reproduce.run import format_seconds
    from mesacli.reproduce.status import total_cpu_left

    table = Table(title="the paper's results (ledger)", title_justify="left")
    authors = any(s.ours_authors is not None for s in statuses)  # eval_authors records: the same metric on theirs
    for name, justify in (("id", "left"), ("paper", "right"), ("ours", "right"), ("on authors' seqs", "right"),
                          ("ratio", "right"), ("verdict", "left"), ("state", "left"), ("CPU left", "right")):
        if name != "on authors' seqs" or authors:
            table.add_column(name, justify=justify)
    for s in statuses:
        style = {"within": "green", "holds": "green", "**MISS**": "red", "**FAILS**": "red"}.get(verdict(s), "")
        ours = [s.ours_text(at=" @")] + ([fmt_value(s.ours_authors)] if authors else [])
        table.add_row(s.entry.id, fmt_value(s.paper), *ours, "–" if s.ratio is None else f"{s.ratio:.2f}",
                      Text(verdict(s).strip("*"), style=style), s.state,
                      format_seconds(s.cpu_left_s) if s.cpu_left_s else "–")
    done = sum(s.done for s in statuses)
    measured = [s for s in statuses if s.within is not None]
    held = sum(bool(s.within) for s in measured)
    cpu = total_cpu_left(statuses)
    footer = Text(f"{len(statuses)} entries: {done} done, {len(measured)} measured ({held} within / holding, "
                  f"{len(measured) - held} missed); CPU time left about {format_seconds(cpu)} (the ledger's step costs "
                  "on a 2-core CPU; each run counted once)")
    return Group(table, footer)


def reproduce_run_table(report: Any) -> Group:
    """`mesacli reproduce run`: what this call produced, and why it stopped."""
    from mesacli.reproduce.run import format_seconds

    table = Table(title="reproduce run", title_justify="left")
    for name, justify in (("spec", "left"), ("stage", "left"), ("time", "right"), ("result", "left")):
        table.add_column(name, justify=justify)
    for stage in report.stages:
        table.add_row(stage.spec, stage.what, format_seconds(stage.seconds), stage.detail)
    if report.stopped:
        end = Text(f"stopped ({report.stopped}) after {format_seconds(report.seconds)}: the step under way was "
                   "saved; run `mesacli reproduce run` again to continue")
    else:
        end = Text(f"all {len(report.specs)} specs of the selection produced ({format_seconds(report.seconds)})")
    return Group(table, end)
