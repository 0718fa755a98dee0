"""Command-line interface: thin Typer commands that validate input and call one library function.

User mistakes (MesaError) become a one-line error on stderr and exit code 2; a diverged run exits 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from mesacli import render
from mesacli.errors import MesaError
from mesacli.probe.registry import ANALYSES

app = typer.Typer(
    name="mesacli",
    help="Reproduce and extend 'Uncovering mesa-optimization algorithms in Transformers' (arXiv 2309.05858).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Not on a terminal (CI logs, pipes) rich would wrap tables at 80 columns: give it room.  No console markup:
# messages, tables and paths carry user text (`e.g. [softmax, mesa]`, a folder named `[draft]`) that rich would
# otherwise read as style tags and drop.
console = Console(width=None if sys.stdout.isatty() else 140, markup=False)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400, markup=False)


def _print_error(message: object) -> None:
    """'error: MESSAGE' on stderr, one line, the message printed as it is (no markup)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", str(message)), highlight=False, soft_wrap=True)


def _user_errors(fn: Callable) -> Callable:
    """Turn MesaError into 'error: ...' and exit code 2 (1 for a diverged run); Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mesacli.loop import TrainingDiverged

        try:
            return fn(*args, **kwargs)
        except TrainingDiverged as err:
            _print_error(err)
            raise typer.Exit(1) from None
        except MesaError as err:
            _print_error(err)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _runtime_settings() -> None:
    """Process-wide settings applied before every command (mesacli.runtime): the host allocator."""
    from mesacli import runtime

    try:
        runtime.configure_from_env()
    except ValueError as err:
        _print_error(err)
        raise typer.Exit(2) from None


def _stopped_early(result, total_steps: int, run_dir: Path, *, say_resumed: bool = True) -> bool:
    """Say where a training session resumed from and, if it ended before ``total_steps``, how to resume
    (exit 130 after SIGTERM or Ctrl-C).  True if it ended early.  Also for a prompt-tuning stage's result."""
    if say_resumed and result.resumed_from is not None:
        console.print(f"resumed from step {result.resumed_from}")
    if not (result.interrupted or result.step < total_steps):
        return False
    console.print(f"stopped at step {result.step} of {total_steps}; "
                  f"run the same command again to resume from {run_dir}", highlight=False)
    if result.interrupted:
        raise typer.Exit(130)
    return True


@app.command()
@_user_errors
def train(
    spec_path: Path = typer.Argument(..., metavar="SPEC.yaml", help="Experiment spec (see experiments/)."),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a spec value, e.g. --set model.layers=4 (repeatable)."),
    run_dir: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<spec name>)."),
    seeds: Optional[int] = typer.Option(
        None, "--seeds", min=1,
        help="Train N seeds in one program (replica i = the plain run with train.seed + i); = --set train.seeds=N."),
    start_from: Optional[Path] = typer.Option(
        None, "--start-from", metavar="RUN_DIR",
        help="Start from the latest checkpoint of RUN_DIR, a shorter run of the same recipe (only name, "
             "description, train.steps and the log/eval/checkpoint intervals may differ): a longer run without "
             "retraining the first steps. Ignored once the run directory has its own checkpoints."),
    compact_checkpoints: bool = typer.Option(
        False, "--compact-checkpoints",
        help="Store AdamW's moments in bfloat16 in the checkpoints (a third smaller; the parameters stay exact). "
             "A run resumed from one goes on from the rounded moments, not bit-identical to an uninterrupted run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved spec, then stop."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    coordinator: Optional[str] = typer.Option(
        None, help="Multi-process run: HOST:PORT of process 0 (env MESACLI_COORDINATOR).",
        rich_help_panel="Several machines"),
    num_processes: Optional[int] = typer.Option(
        None, help="Multi-process run: number of processes (env MESACLI_NUM_PROCESSES).",
        rich_help_panel="Several machines"),
    process_id: Optional[int] = typer.Option(
        None, help="Multi-process run: this process's index (env MESACLI_PROCESS_ID).",
        rich_help_panel="Several machines"),
    cluster: Optional[str] = typer.Option(
        None, help="'auto': let JAX read the cluster from SLURM / Open MPI / TPU variables.",
        rich_help_panel="Several machines"),
    init_timeout: int = typer.Option(60, help="Seconds to wait for the coordinator and every process.",
                                     rich_help_panel="Several machines"),
    heartbeat: int = typer.Option(10, help="Seconds after which a silent peer counts as dead.",
                                  rich_help_panel="Several machines"),
    stop_at: Optional[int] = typer.Option(None, hidden=True, help="End the session after this step (testing)."),
):
    """Train a model on a synthetic sequence task; resumes if RUN_DIR already has checkpoints."""
    from mesacli import distributed
    from mesacli.spec import load_spec
    from mesacli.spec_loader import spec_to_yaml

    spec = load_spec(spec_path, list(overrides) + ([f"train.seeds={seeds}"] if seeds is not None else []))
    if dry_run:
        console.print(spec_to_yaml(spec), highlight=False, markup=False)
        return
    multi = distributed.resolve_cluster(coordinator, num_processes, process_id, cluster, init_timeout, heartbeat)
    if multi is not None and not distributed.is_worker():
        raise typer.Exit(distributed.supervise(sys.argv[1:], multi))
    if multi is not None:
        distributed.initialize(multi)  # before any JAX computation
        distributed.check_same_spec(spec_to_yaml(spec))
        progress = progress and distributed.is_primary()
    from mesacli.model import count_params
    from mesacli.train import train as run_training

    run_dir = run_dir or Path("runs") / spec.name
    result = run_training(spec, run_dir, stop_at_step=stop_at, progress=progress, start_from=start_from,
                          moments_dtype="bfloat16" if compact_checkpoints else None)
    if multi is not None and not distributed.is_primary():
        return  # process 0 reports
    if _stopped_early(result, spec.train.steps, run_dir):
        return
    console.print(render.train_result(spec, run_dir, result, count_params(result.params)))


@app.command("eval")
@_user_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by `mesacli train`."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step (default: the latest)."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also evaluate GD-1 and ridge LSQ."),
    test_set: str = typer.Option("ours", help="ours: the spec's fixed test batches (eval_step<N>.json); authors: "
                                 "the authors' own test sequences of the paper's figures (seeds 1 .. 11111, 5 x "
                                 "256 linear / 5 x 512 nonlinear and partially observed; eval_authors_step<N>.json)."),
):
    """Evaluate a checkpoint on the spec's fixed test batches (per-position loss), with baselines."""
    from mesacli.evaluate import evaluate_run

    console.print(render.eval_report(evaluate_run(run_dir, step, with_baselines=baselines, test_set=test_set)))


@app.command()
@_user_errors
def quickstart(
    out_dir: Path = typer.Option(Path("runs/quickstart"), help="Where the two quick-start runs are written."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """The embedded default job (a few minutes on a laptop CPU): LSA-1 and Mesa-1 against GD-1 and ridge LSQ."""
    from mesacli.quickstart import run_quickstart

    console.print(render.quickstart_table(run_quickstart(out_dir, progress=progress)))
    console.print(f"results: {out_dir}/quickstart.json, figure: {out_dir}/comparison.png")


@app.command()
@_user_errors
def bench(
    batch: int = typer.Option(8, help="Batch size B."),
    heads: int = typer.Option(4, help="Number of heads H."),
    seq_lens: str = typer.Option("512,2048,8192", help="Comma-separated sequence lengths T."),
    d_head: int = typer.Option(64, help="Key/value size per head D."),
    chunk_size: int = typer.Option(64, help="Chunk size of the chunked kernels (softmax: query block)."),
    repeats: int = typer.Option(5, help="Timed rounds; each calls every kernel at one T once (median reported)."),
    kernels: str = typer.Option("softmax,linear_chunked,mesa_sequential,mesa_chunked",
                                help="Comma-separated kernels to compare (also: softmax_dense, mesanet_exact, "
                                     "mesanet_cg, mesanet_cg_fixed)."),
    out: Path = typer.Option(Path("bench.json"), help="Where the JSON results are written."),
    dtype: str = typer.Option("float32", help="float32 or float64."),
    max_memory_gb: float = typer.Option(8.0, help="Skip a configuration whose compiled memory estimate is larger."),
    max_call_seconds: float = typer.Option(60.0, help="If the warm-up call takes longer, report it as the timing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show what is running on stderr."),
):
    """Compare attention kernels (softmax, chunked linear, sequential and chunked mesa, MesaNet): time and memory."""
    import contextlib

    from mesacli.bench import BenchConfig, parse_int_list, parse_names, run_bench
    from mesacli.checkpoint import check_output_path, write_output_json

    config = BenchConfig(batch=batch, heads=heads, seq_lens=parse_int_list(seq_lens, "--seq-lens"), d_head=d_head,
                         chunk_size=chunk_size, repeats=repeats, kernels=parse_names(kernels), dtype=dtype,
                         max_memory_gb=max_memory_gb, max_call_seconds=max_call_seconds).validate()
    check_output_path(out)
    live = progress and err_console.is_terminal  # a spinner on a terminal, one line per step in a log
    with err_console.status("benchmarking") if live else contextlib.nullcontext() as status:
        report = status.update if live else (lambda message: err_console.print(message, highlight=False))
        result = run_bench(config, progress=report if progress else None)
    console.print(render.bench_table(result))
    write_output_json(out, result, indent=2)
    console.print(f"results: {out}")


@app.command("bench-seeds")
@_user_errors
def bench_seeds(
    spec_paths: List[Path] = typer.Argument(..., metavar="SPEC.yaml...", help="Specs to benchmark."),
    seeds: int = typer.Option(8, help="Replicas in one program (S)."),
    steps: int = typer.Option(10, help="Steps per timed block."),
    repeats: int = typer.Option(3, help="Timed blocks (the median is reported)."),
    out: Path = typer.Option(Path("bench_seeds.json"), help="Where the JSON results are written."),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="Override a spec value."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Say what is running on stderr."),
    replica_group: Optional[int] = typer.Option(
        None, help="Replicas whose gradients the S-seed program computes together (vmapped; the groups take turns). "
                   "Default: automatic, as training chooses (on a CPU: as many as fit 1,600 tokens a pass); "
                   "S = all at once, the program before this rule."),
):
    """Training throughput: 1 seed, S seeds in one program, and S sequential runs (wall and CPU time)."""
    from mesacli.checkpoint import write_output_json
    from mesacli.seeds_bench import run_seeds_bench
    from mesacli.spec import load_spec

    loaded = [load_spec(p, overrides) for p in spec_paths]
    say = (lambda message: err_console.print(message, highlight=False)) if progress else None
    results = [run_seeds_bench(spec, seeds=seeds, steps=steps, repeats=repeats, progress=say,
                               replica_group=replica_group) for spec in loaded]
    console.print(render.seeds_bench_table(results, seeds, steps, repeats))
    write_output_json(out, {"results": results})
    console.print(f"results: {out}")


@app.command("bench-train")
@_user_errors
def bench_train(
    spec_names: List[str] = typer.Argument(..., metavar="SPEC...",
                                           help="Spec files or shipped spec names (e.g. softmax7_full)."),
    steps: int = typer.Option(5, help="Steps per timed block."),
    repeats: int = typer.Option(3, help="Timed blocks (the median is reported); also the matmul calls before and "
                                        "after the specs."),
    matmul_size: int = typer.Option(2048, help="N of the float32 N x N matmul that mfu is relative to."),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a value in every spec (repeatable)."),
    out: Optional[Path] = typer.Option(None, help="Also write the results to this JSON file."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Say what is running on stderr."),
):
    """Training-step speed and model FLOP utilisation: per spec, seconds per step (median of timed blocks after
    the compile and a warm-up step; the step samples its own batch, data_s times that alone), matmul FLOPs per
    step (counted in the step's jaxpr: 2*M*N*K per matmul of forward + backward + optimiser, scan bodies once per
    iteration, data generation excluded; XLA's cost_analysis, which counts loop bodies once, is listed beside
    it), model GFLOP/s, and mfu = model GFLOP/s / the GFLOP/s of a float32 N x N matmul measured in the same run."""
    from mesacli.checkpoint import check_output_path, write_output_json
    from mesacli.spec import load_spec
    from mesacli.spec_loader import find_spec_file
    from mesacli.train_bench import bench_train as run_bench_train

    loaded = [load_spec(find_spec_file(name), overrides) for name in spec_names]
    if out is not None:
        check_output_path(out)
    say = (lambda message: err_console.print(message, highlight=False)) if progress else None
    result = run_bench_train(loaded, steps=steps, repeats=repeats, matmul_size=matmul_size, progress=say)
    console.print(render.train_bench_table(result))
    if out is not None:
        write_output_json(out, result, indent=2)
        console.print(f"results: {out}")


@app.command()
@_user_errors
def probe(
    run_dir: Path = typer.Argument(..., help="A run directory written by `mesacli train`."),
    analyses: List[str] = typer.Option([], "--analysis", "-a", metavar="NAME",
                                       help="Analysis to run (repeatable or comma-separated): "
                                            f"{', '.join(ANALYSES)}. Default: all that apply."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step (default: the latest)."),
    seeds: int = typer.Option(5, help="Data seeds (probe batches) to average over."),
    batch_size: int = typer.Option(256, help="Sequences per probe batch."),
    precond: str = typer.Option("auto", help="Preconditioned-input probe target (S S^T + lam I)^-1 s_t: chebyshev "
                                             "(the paper's: its learned 6-step inverse), exact (float64 solve), or "
                                             "auto = chebyshev on fully observed linear tasks, else exact."),
    prop2_steps: Optional[int] = typer.Option(None, help="AdamW steps ([C]'s recipe) to learn the Prop-2 solver "
                                                         "coefficients (default: the paper's, 20k; 80k for k = 2)."),
    prop2_k: Optional[int] = typer.Option(None, help="Prop-2 solver steps k (default: model layers - 1)."),
    gd1_phi0_steps: int = typer.Option(0, help="prop1: also fit GD-1 with a learned Phi_0 for this many Adam steps."),
    distil_steps: int = typer.Option(2000, help="Adam steps per layer for the linearize analysis (paper: 15k)."),
    distil_lr: float = typer.Option(1e-3, help="Adam learning rate of the linearize distillation (paper: 1e-3)."),
    interpolation_steps: int = typer.Option(0, help="compress: also retrain from the same initialisation for this "
                                                    "many steps, evaluating the 50/50 interpolated model (0 = off)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Report what is running on stderr."),
):
    """Reverse-engineer a trained run (paper section 4): writes RUN_DIR/probe/*.json, *.png and summary.md."""
    from mesacli.probe import run_probe

    options = {"precond": precond, "distil_steps": distil_steps,
               "distil_lr": distil_lr,
               "interpolation_steps": interpolation_steps, "gd1_phi0_steps": gd1_phi0_steps}
    if prop2_steps is not None:
        options["prop2_train_steps"] = prop2_steps
    if prop2_k is not None:
        options["prop2_k"] = prop2_k
    report = (lambda message: err_console.print(message, highlight=False)) if progress else None
    result = run_probe(run_dir, analyses, step=step, seeds=seeds, batch_size=batch_size, options=options,
                       report=report)
    console.print(render.probe_report(run_dir, result))


@app.command()
@_user_errors
def specs(
    directory: Optional[Path] = typer.Argument(None, metavar="[DIR]",
                                               help="A folder of spec files (default: the shipped experiments/)."),
):
    """List the experiment specs (shipped with mesacli, or in DIR) and what each reproduces."""
    from mesacli.spec_loader import list_spec_files

    console.print(render.specs_table(*list_spec_files(directory)))


@app.command("icl-eval")
@_user_errors
def icl_eval(
    run_dir: Path = typer.Argument(..., help="A run directory written by `mesacli train` (a fully observed task)."),
    prompt: str = typer.Option("plain", help="plain | eos | tuned (tuned EOS + prefix), or a comma-separated list."),
    examples: Optional[int] = typer.Option(None, help="Examples per prompt (default: as many as fit the context)."),
    seeds: int = typer.Option(5, help="Data seeds (the spread is the std over seeds)."),
    batch: int = typer.Option(128, help="Prompts per seed."),
    lam: float = typer.Option(1e-3, help="Ridge lambda of the LSQ baselines."),
    continual: bool = typer.Option(False, "--continual", help="Two tasks: a new W* after --switch-at examples."),
    switch_at: Optional[int] = typer.Option(None, help="Examples of task 1 (default: 21/68 of the examples)."),
    x_dist: str = typer.Option("uniform", help="uniform: x ~ U(-1,1) (authors' code); normal: N(0, I) (paper)."),
    data_seed: int = typer.Option(0, help="Base seed of the evaluation prompts."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step (default: the latest)."),
):
    """Few-shot in-context regression with the frozen model (paper section 5), next to LSQ and GD-1 baselines."""
    from mesacli.icl.evaluate import icl_eval as run_icl_eval

    report = run_icl_eval(run_dir, prompt, n_examples=examples, seeds=seeds, batch=batch, lam=lam,
                          continual=continual, switch_at=switch_at, x_dist=x_dist, data_seed=data_seed, step=step)
    console.print(render.icl_report(report))


@app.command("prompt-tune")
@_user_errors
def prompt_tune(
    run_dir: Path = typer.Argument(..., help="A run directory written by `mesacli train` (kept frozen)."),
    what: str = typer.Option("eos", help="eos | prefix (needs a tuned EOS) | both (EOS, then the prefix)."),
    steps: int = typer.Option(5000, help="Adam steps per stage."),
    prefix_len: int = typer.Option(20, help="Prefix tokens P."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    batch: int = typer.Option(64, help="Prompts per step (authors' code: 64 for EOS, 128 for the prefix)."),
    micro_batch: Optional[int] = typer.Option(
        None, help="Accumulate each step's gradient over micro-batches of this many prompts: the same update, "
        "a smaller working set (faster on a CPU at T=224 with 16)."),
    examples: Optional[int] = typer.Option(None, help="Examples per prompt (default: as many as fit)."),
    x_dist: str = typer.Option("uniform", help="uniform (authors' code) or normal (paper)."),
    seed: int = typer.Option(0, help="Seed of the initial tokens and the tuning prompts."),
    checkpoint_every: int = typer.Option(500, help="Checkpoint every N steps (resume from the latest)."),
    step: Optional[int] = typer.Option(None, help="Model checkpoint step (default: the latest)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    stop_at: Optional[int] = typer.Option(None, hidden=True, help="End the session after this step (testing)."),
):
    """Tune the EOS token and/or a prompt prefix of a frozen run on label-prediction loss; resumable."""
    from mesacli.icl.tune import TuneConfig
    from mesacli.icl.tune import prompt_tune as run_prompt_tune

    cfg = TuneConfig(steps=steps, lr=lr, batch=batch, micro_batch=micro_batch, prefix_len=prefix_len,
                     n_examples=examples, x_dist=x_dist, seed=seed, checkpoint_every=checkpoint_every)
    results = run_prompt_tune(run_dir, what, cfg, progress=progress, model_step=step, stop_at_step=stop_at)
    console.print(render.prompt_tune_table(run_dir, results))
    # the table says where each stage resumed from; SIGTERM or Ctrl-C (the step under way saved): exit 130
    _stopped_early(results[-1], steps, run_dir, say_resumed=False)


# ----------------------------------------------------------------------------- mesacli reproduce

reproduce_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                            help="The ledger of the paper's results: status, produce (a budget at a time), report.")
app.add_typer(reproduce_app, name="reproduce")
_RESULTS_HELP = "The committed record: one run directory per spec (results/<spec>/)."


@reproduce_app.command("status")
@_user_errors
def reproduce_status(
    ids: List[str] = typer.Argument(None, metavar="[ID...]", help="Entries to show (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of entries instead of the table."),
    results: Path = typer.Option(Path("results"), help=_RESULTS_HELP),
):
    """Every result of the paper: paper, ours, ratio, within tolerance or not, state, CPU time left."""
    import json

    from mesacli.reproduce.ledger import load_ledger
    from mesacli.reproduce.status import ledger_status

    statuses = ledger_status(load_ledger(), list(ids or []), results)
    if as_json:
        print(json.dumps([s.to_json() for s in statuses], indent=1))
        return
    console.print(render.ledger_table(statuses))


@reproduce_app.command("run")
@_user_errors
def reproduce_run(
    ids: List[str] = typer.Argument(None, metavar="[ID...]", help="Entries to produce (default: all, by priority)."),
    budget: Optional[str] = typer.Option(None, help="Time budget, e.g. 150m, 2h, 1h30m (bare number: minutes); "
                                                    "when it runs out training stops as on SIGTERM (step saved)."),
    results: Path = typer.Option(Path("results"), help=_RESULTS_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    restarts: int = typer.Option(3, min=0, help="Run each spec's work in a child process and start it again (from "
                                                "its last checkpoint) when a stalled step ended it, at most this many "
                                                "times per spec; 0: all in this process."),
    jobs: int = typer.Option(1, min=1, help="Work on this many specs at once, each in its own child process. On a "
                                            "CPU one training process barely uses a second core: --jobs 2 on 2 cores "
                                            "trains ~1.7x as many steps per hour. Not for one GPU."),
    spec: Optional[str] = typer.Option(None, hidden=True, help="Only the work of this spec (a --jobs child)."),
):
    """Train / resume and analyse what the entries need, in priority order, from the shipped specs."""
    from mesacli.reproduce.ledger import load_ledger
    from mesacli.reproduce.run import parse_budget, run_jobs, specs_with_work
    from mesacli.reproduce.run import reproduce_run as run_ledger

    budget_s = parse_budget(budget) if budget is not None else None
    ledger = load_ledger()
    ledger.select(list(ids or []))  # unknown ids are an error here, not in the child
    if jobs > 1 and restarts == 0:
        raise MesaError("--jobs > 1 runs its work in child processes: give --restarts 1 or more")
    if restarts > 0:  # each spec's work in a child process, `jobs` at a time, started again after a stall
        def spec_command(name: str, left: float | None) -> list[str]:
            return [sys.executable, "-m", "mesacli.cli", "reproduce", "run", *(ids or []), "--results", str(results),
                    "--restarts", "0", "--spec", name, "--progress" if progress else "--no-progress",
                    *([] if left is None else ["--budget", f"{left:.0f}s"])]

        names = specs_with_work(ledger, list(ids or []), results)
        err_console.print(f"{len(names)} spec{'' if len(names) == 1 else 's'} with work, {jobs} at a time: "
                          f"{', '.join(names) or 'none'}", highlight=False)
        raise typer.Exit(run_jobs(names, spec_command, jobs, budget_s, restarts,
                                  waits_for=lambda name: ledger.specs[name].start_from,
                                  say=lambda message: err_console.print(message, highlight=False)))
    report = run_ledger(ledger, list(ids or []), budget_s=budget_s, results_dir=results, progress=progress,
                        say=lambda message: err_console.print(message, highlight=False),
                        specs=None if spec is None else [spec])
    console.print(render.reproduce_run_table(report))
    if report.stopped == "SIGTERM":
        raise typer.Exit(130)


@reproduce_app.command("report")
@_user_errors
def reproduce_report(
    results: Path = typer.Option(Path("results"), help=_RESULTS_HELP),
):
    """Write RESULTS/REPORT.md and its figures: per paper figure, ours beside the paper (misses shown)."""
    from mesacli.reproduce.ledger import load_ledger
    from mesacli.reproduce.report import write_report
    from mesacli.reproduce.status import ledger_status

    path = write_report(ledger_status(load_ledger(), None, results), results)
    console.print(f"report: {path}")


# ----------------------------------------------------------------------------- mesacli lm


class _TrainByDefault(TyperGroup):
    """`mesacli lm SPEC.yaml ...` means `mesacli lm train SPEC.yaml ...`."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args.insert(0, "train")
        return super().resolve_command(ctx, args)


lm_app = typer.Typer(cls=_TrainByDefault, no_args_is_help=True, pretty_exceptions_enable=False,
                     help="Hybrid language models (softmax, linear, DPFP, mesa, MesaNet layers) on local text "
                          "(paper app. G). `mesacli lm SPEC.yaml` = `mesacli lm train SPEC.yaml`.")
app.add_typer(lm_app, name="lm")


@lm_app.command("train")
@_user_errors
def lm_train(
    spec_path: Path = typer.Argument(..., metavar="SPEC.yaml", help="Language-model spec (experiments/lm-*.yaml)."),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a spec value, e.g. --set train.steps=100 (repeatable)."),
    run_dir: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<spec name>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved spec, then stop."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    stop_at: Optional[int] = typer.Option(None, hidden=True, help="End the session after this step (testing)."),
):
    """Train and evaluate a language model; resumes if RUN_DIR already has checkpoints."""
    from mesacli.lm.spec import load_lm_spec
    from mesacli.lm.train import train_lm
    from mesacli.rundir import LM_EVAL_FILE
    from mesacli.spec_loader import spec_to_yaml

    spec = load_lm_spec(spec_path, overrides)
    if dry_run:
        console.print(spec_to_yaml(spec), highlight=False, markup=False)
        return
    run_dir = run_dir or Path("runs") / spec.name
    result = train_lm(spec, run_dir, progress=progress, stop_at_step=stop_at,
                      say=lambda m: err_console.print(m, highlight=False))
    console.print(render.lm_table([result.row()], f"{spec.name}: validation at step {result.step} "
                                                  f"({render.icl_score_title(spec)})"))
    if _stopped_early(result, spec.train.steps, run_dir):
        return
    console.print(f"results: {run_dir / LM_EVAL_FILE}, {run_dir / 'metrics.jsonl'}, figures in {run_dir}")


@lm_app.command("eval")
@_user_errors
def lm_eval(
    run_dirs: List[Path] = typer.Argument(..., help="Language-model run directories."),
    windows: Optional[int] = typer.Option(None, help="Validation windows (default: each spec's eval.windows)."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step (default: the latest)."),
    out: Optional[Path] = typer.Option(None, help="Also write the rows (with per-position losses) to this JSON file."),
):
    """Re-evaluate trained language models on the validation split: loss, bits per token, perplexity, ICL score."""
    from mesacli.checkpoint import write_output_json
    from mesacli.lm.evaluate import evaluate_run

    rows = [evaluate_run(run_dir, windows=windows, step=step) for run_dir in run_dirs]
    spec_eval = rows[0]
    console.print(render.lm_table(rows, f"validation on {spec_eval['windows']} windows"))
    if out is not None:
        write_output_json(out, rows)
        console.print(f"rows: {out}")


@lm_app.command("generate")
@_user_errors
def lm_generate(
    run_dir: Path = typer.Argument(..., help="A language-model run directory."),
    prompt: str = typer.Option("", help="Text to continue (empty: start after an end-of-document token)."),
    max_new_tokens: int = typer.Option(200, help="Tokens to sample."),
    temperature: float = typer.Option(0.8, help="Softmax temperature; 0 = greedy."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens only."),
    seed: int = typer.Option(0, help="Sampling seed."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step (default: the latest)."),
):
    """Sample text with the recurrent (constant-memory) forms of the linear, DPFP, mesa and MesaNet layers."""
    from mesacli.lm.generate import generate
    from mesacli.lm.state import load_lm

    spec, params, _, tokenizer = load_lm(run_dir, step)
    text = generate(params, spec, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, seed=seed)
    console.print(prompt + text, highlight=False, markup=False, soft_wrap=True)


@lm_app.command("compare")
@_user_errors
def lm_compare(
    spec_paths: List[Path] = typer.Argument(..., metavar="SPEC.yaml...", help="Language-model specs to compare."),
    steps: Optional[int] = typer.Option(None, min=1, help="Train every model for this many steps (= --set "
                                                          "train.steps=N; warmup is capped at a tenth of it)."),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a value in every spec (repeatable)."),
    out_dir: Path = typer.Option(Path("runs/lm-compare"), help="Run directories and compare.json go here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Train several language models with the same budget and print validation loss and ICL score side by side."""
    from mesacli.lm.train import compare_lms, load_compare_specs

    specs = load_compare_specs(spec_paths, overrides, steps)
    rows = compare_lms(specs, out_dir, progress=progress, say=lambda m: err_console.print(m, highlight=False))
    console.print(render.lm_table(rows, f"validation after {rows[0]['steps']} steps of {rows[0]['tokens']:,} tokens "
                                        f"({render.icl_score_title(specs[0])})"))
    console.print(f"results: {out_dir / 'compare.json'}, figure: {out_dir / 'compare.png'}")


def main() -> None:
    app(prog_name="mesacli")


if __name__ == "__main__":
    sys.exit(main())
