"""Bad input found by a new user (issue 21): every case is one `error:` line on stderr and exit code 2 (no
traceback), through the CLI; plus the fixes that make a run directory and its messages say what they mean."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import types

import numpy as np
import pytest
import yaml

from mesacli import memory
from mesacli.errors import MesaError
from tests.conftest import TINY, assert_one_line_error, invoke, merge


def assert_ends_with_one_error(result, fragment):
    """Progress lines (e.g. 'tokenising ...'), then one error line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    assert fragment in lines[-1], lines[-1]


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synthetic-task run directory, trained for 2 steps through the CLI."""
    root = tmp_path_factory.mktemp("bad_input")
    spec = write_yaml(root / "tiny.yaml", merge(TINY, {"train": {"steps": 2, "eval_every": 2}}))
    run = root / "run"
    result = invoke("train", spec, "--run-dir", run, "--no-progress")
    assert result.exit_code == 0, result.output
    return run


# ----------------------------------------------------------------------------- spec files (items 6, 9, 10)


LAUGHS = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef", strict=True))


@pytest.mark.parametrize("content, fragment", [
    ("", "is empty"),
    ("# nothing but a comment\n", "is empty (only comments)"),
    ("a: &x [*x]\n", "a YAML alias is used inside its own anchor's value"),
    ("task: &t {kind: linear, more: *t}\n", "a YAML alias is used inside its own anchor's value"),
    ("name: a\nname: b\n", "duplicate key 'name' (first given on line 1), again on line 2"),
    ("train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n", "duplicate key 'lr' (first given on line 2), again on line 4"),
    (LAUGHS, "more than 100,000 values once its aliases are expanded"),
], ids=["empty", "only_comments", "recursive_list", "recursive_mapping", "duplicate_key", "duplicate_nested_key",
        "alias_bomb"])
@pytest.mark.parametrize("command", ["train", "lm"])
def test_bad_spec_files_are_refused(tmp_path, command, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert_one_line_error(invoke(command, path, "--dry-run"), fragment)


def test_merge_keys_and_shared_aliases_still_load(tmp_path):
    """The duplicate-key and alias checks leave YAML's legitimate sharing alone: a merged key given again
    explicitly, and one anchor used twice."""
    path = tmp_path / "ok.yaml"
    path.write_text("task:\n  <<: {state_dim: 4, obs_dim: 3}\n  obs_dim: 4\n  token_format: raw\n"
                    "model: {embed_dim: &n 4}\ntrain: {eval_batches: *n}\n")
    result = invoke("train", path, "--dry-run")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["task"]["obs_dim"] == 4 and resolved["train"]["eval_batches"] == 4


def test_a_directory_given_as_the_spec_says_it_is_a_directory(tmp_path):
    folder = tmp_path / "specs.yaml"
    folder.mkdir()
    assert_one_line_error(invoke("train", folder), f"{folder} is a directory, not a spec file")
    assert_one_line_error(invoke("lm", "train", folder), "is a directory, not a spec file")


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=.nan", "train.lr: expected a number, got nan"),
    ("train.lr=.inf", "train.lr: must be positive and finite, got inf"),
    ("train.b1=1", "train.b1: Adam's decay rate must lie in [0, 1), got 1.0"),
    ("train.b2=1.5", "train.b2: Adam's decay rate must lie in [0, 1), got 1.5"),
    ("train.b1=-0.1", "train.b1: Adam's decay rate must lie in [0, 1), got -0.1"),
    ("train.eps=-1e-8", "train.eps: must be >= 0, got -1e-08"),
    ("train.end_lr=-1e-5", "train.end_lr: must be >= 0, got -1e-05"),
    ("task.state_noise=.nan", "task.state_noise: expected a number, got nan"),
    ("task.init_scale=-1", "task.init_scale: must be positive, got -1.0"),
    ("task.obs_matrix_std=-0.5", "task.obs_matrix_std: must be >= 0, got -0.5"),
    ("model.init_std=.inf", "model.init_std: must be positive and finite, got inf"),
    ("task.seq_len=1", "task.seq_len: must be at least 2, got 1"),
])
def test_out_of_range_synthetic_spec_values(tmp_path, override, fragment):
    spec = write_yaml(tmp_path / "tiny.yaml", TINY)
    assert_one_line_error(invoke("train", spec, "--dry-run", "--set", override), fragment)


LM_TINY = {"name": "tiny-lm", "data": {"split_block": 256},
           "model": {"layers": ["linear"], "context": 32, "embed_dim": 16, "num_heads": 2, "key_size": 4,
                     "dpfp_nu": 1, "dropout": 0.0},
           "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 2,
                     "checkpoint_every": 2},
           "eval": {"windows": 4, "batch_size": 4, "icl_early": 4, "icl_late": 30}}


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=.nan", "train.lr: expected a number, got nan"),
    ("train.b2=1", "train.b2: Adam's decay rate must lie in [0, 1), got 1.0"),
    ("train.eps=-1", "train.eps: must be >= 0, got -1.0"),
    ("train.end_lr=.inf", "train.end_lr: must be >= 0 and finite, got inf"),
])
def test_out_of_range_lm_spec_values(tmp_path, override, fragment):
    spec = write_yaml(tmp_path / "lm.yaml", LM_TINY)
    assert_one_line_error(invoke("lm", spec, "--dry-run", "--set", override), fragment)


# ----------------------------------------------------------------------------- markup (item 8)


def test_bracketed_text_in_messages_paths_and_tables_is_printed_as_is(tmp_path):
    spec = write_yaml(tmp_path / "lm.yaml", LM_TINY)
    assert_one_line_error(invoke("lm", spec, "--dry-run", "--set", "model.layers=[]"),
                          "list at least one layer kind, e.g. [softmax, mesa]")
    assert_one_line_error(invoke("train", tmp_path / "[bold]x.yaml"), f"spec file not found: {tmp_path}/[bold]x.yaml")
    folder = tmp_path / "[draft]"  # a table's title and cells
    folder.mkdir()
    (folder / "mine.yaml").write_text("# LSA-1 as in [C], not [P]: [bold]loud[/bold]\nname: mine\n")
    result = invoke("specs", folder)
    assert result.exit_code == 0, result.output
    assert "LSA-1 as in [C], not [P]: [bold]loud[/bold]" in result.output
    assert f"specsin{folder}" in "".join(result.output.split())  # the title, wrapped to the table's width


# ----------------------------------------------------------------------------- run directories of the other kind


def test_a_run_of_the_other_kind_names_the_command_that_reads_it(tmp_path):
    lm_run, synthetic_run = tmp_path / "lm_run", tmp_path / "task_run"
    for run, data in ((lm_run, LM_TINY), (synthetic_run, TINY)):
        run.mkdir()
        write_yaml(run / "spec.yaml", data)
    for command in (["eval"], ["probe"], ["icl-eval"], ["prompt-tune", "--no-progress"]):
        assert_one_line_error(invoke(*command, lm_run), f"use `mesacli lm eval {lm_run}` or `mesacli lm generate")
    for command in (["lm", "eval"], ["lm", "generate"]):
        assert_one_line_error(invoke(*command, synthetic_run), f"use `mesacli eval {synthetic_run}`")


# ----------------------------------------------------------------------------- probe / icl-eval / prompt-tune options


@pytest.mark.parametrize("args, fragment", [
    (["-a", "linearize", "--distil-steps", "0"], "--distil-steps must be an integer >= 1, got 0"),
    (["-a", "prop2", "--prop2-steps", "-5"], "--prop2-steps must be an integer >= 0, got -5"),
    (["-a", "prop2", "--prop2-k", "-1"], "--prop2-k must be an integer >= 0, got -1"),
    (["-a", "linearize", "--distil-lr", "-1"], "--distil-lr must be a positive number, got -1.0"),
    (["-a", "linearize", "--distil-lr", "nan"], "--distil-lr must be a positive number, got nan"),
    (["-a", "compress", "--interpolation-steps", "-2"], "--interpolation-steps must be an integer >= 0, got -2"),
    (["-a", "prop1", "--gd1-phi0-steps", "-1"], "--gd1-phi0-steps must be an integer >= 0, got -1"),
    (["-a", "probes", "--precond", "cholesky"], "--precond must be auto, exact or chebyshev"),
    (["-a", ","], "--analysis ',' names no analysis; choose from prop1, probes"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_probe_options_are_checked_before_any_work(trained, args, fragment):
    run = trained
    assert_one_line_error(invoke("probe", run, "--no-progress", *args), fragment)
    assert not (run / "probe").exists()  # nothing was written


@pytest.mark.parametrize("args, fragment", [
    (["prompt-tune", "--lr", "nan", "--no-progress"], "--lr must be a positive number, got nan"),
    (["prompt-tune", "--lr", "inf", "--no-progress"], "--lr must be a positive number, got inf"),
    (["icl-eval", "--lam", "nan"], "--lam must be positive"),
    (["icl-eval", "--lam", "inf"], "--lam must be positive"),
])
def test_non_finite_icl_options_are_refused(trained, args, fragment):
    run = trained
    assert_one_line_error(invoke(args[0], run, *args[1:]), fragment)


def test_a_stopped_prompt_tune_says_how_to_resume(trained, tmp_path, monkeypatch):
    """SIGTERM during a step: the step is saved, exit 130, and the same resume line as `train` gives."""
    from mesacli.icl import tune

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    original = tune.make_tune_step

    def terminating_at_the_second_step(*args):
        tx, step_fn = original(*args)
        calls = []

        def step(state, params):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, params)

        step.lower = step_fn.lower  # the memory check compiles the real step
        return tx, step

    monkeypatch.setattr(tune, "make_tune_step", terminating_at_the_second_step)
    result = invoke("prompt-tune", run, "--steps", "6", "--batch", "8", "--examples", "2", "--no-progress")
    assert result.exit_code == 130, result.output
    assert f"stopped at step 2 of 6; run the same command again to resume from {run}" in " ".join(
        result.output.split()), result.output


# ----------------------------------------------------------------------------- language-model data (items 6, 7)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """A folder with ~24 KB of text, words.txt."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    vocabulary = "mesa layer learns in context the model solves least squares token step".split()
    (folder / "words.txt").write_text("\n".join(" ".join(rng.choice(vocabulary, 8)) for _ in range(600)) + "\n")
    return folder


@pytest.mark.parametrize("blocker", ["file", "file_above"])
def test_a_cache_dir_that_is_a_file_is_refused(tmp_path, words, blocker):
    spec = write_yaml(tmp_path / "lm.yaml", merge(LM_TINY, {"data": {"path": str(words / "words.txt")}}))
    cache = words / "words.txt" if blocker == "file" else words / "words.txt" / "cache"
    assert_one_line_error(invoke("lm", spec, "--run-dir", tmp_path / "run", "--no-progress",
                                 "--set", f"data.cache_dir={cache}"),
                          f"cannot write the token cache in {cache} (data.cache_dir): {words / 'words.txt'} is a "
                          f"file, not a directory")


def test_a_relative_data_path_is_stored_absolute_so_the_run_works_from_anywhere(tmp_path, words, monkeypatch):
    monkeypatch.chdir(words)
    spec = write_yaml(tmp_path / "lm.yaml", merge(LM_TINY, {"data": {"path": "words.txt"}}))
    run = tmp_path / "run"
    result = invoke("lm", spec, "--run-dir", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "spec.yaml").read_text())["data"]["path"] == str(words / "words.txt")
    again = invoke("lm", spec, "--run-dir", run, "--no-progress")  # same command, same place: a resume
    assert again.exit_code == 0 and "resumed from step 2" in again.output, again.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("lm", "eval", run)
    assert result.exit_code == 0, result.output
    assert "tiny-lm" in result.output
    assert_one_line_error(invoke("lm", "generate", run, "--temperature", "nan"),
                          "--temperature must be a finite number >= 0, got nan")
    # here 'words.txt' names another (missing) file: not the run's data
    assert_one_line_error(invoke("lm", spec, "--run-dir", run, "--no-progress"), "was made with a different spec "
                          f"(data.path: '{words / 'words.txt'}' -> '{elsewhere / 'words.txt'}')")


# ----------------------------------------------------------------------------- memory (item 6)


def fake_compiled(argument=0, output=0, temp=0, alias=0, stats=True):
    """What check_fits reads of a compiled computation: its memory analysis and where its inputs live."""
    import jax

    analysis = types.SimpleNamespace(argument_size_in_bytes=argument, output_size_in_bytes=output,
                                     temp_size_in_bytes=temp, alias_size_in_bytes=alias)
    one_device = types.SimpleNamespace(device_set={jax.devices("cpu")[0]})
    return types.SimpleNamespace(memory_analysis=lambda: analysis if stats else None, input_shardings=[one_device])


def test_check_fits_compares_the_compiled_estimate_with_available_memory(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:    2097152 kB\n")
    assert memory.host_available_bytes(meminfo) == 2 * 2**30
    assert memory.host_available_bytes(tmp_path / "missing") is None
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 2 * 2**30)
    memory.check_fits(fake_compiled(argument=2**30, output=2**29, temp=2**29, alias=2**29), "a step")  # 1.5 GiB
    with pytest.raises(MesaError) as err:
        memory.check_fits(fake_compiled(argument=2**30, temp=3 * 2**30), "a training step")
    assert str(err.value) == ("a training step needs about 4.0 GiB, 2.0 GiB available; reduce task.seq_len or "
                              "train.batch_size (or set train.micro_batch)")
    with pytest.raises(MesaError, match="needs about 2.0 GiB, 2.0 GiB available; smaller"):
        memory.check_fits(fake_compiled(temp=2**29), "x", extra_bytes=2**29 + 1 + 2**30, hint="smaller")
    memory.check_fits(fake_compiled(temp=2**50, stats=False), "a step")  # no estimate: no check
    monkeypatch.setattr(memory, "host_available_bytes", lambda: None)
    memory.check_fits(fake_compiled(temp=2**50), "a step")  # unknown memory: no check


# without a memory figure the check passes and these steps would really be tried
needs_meminfo = pytest.mark.skipif(memory.host_available_bytes() is None, reason="no /proc/meminfo MemAvailable")


@needs_meminfo
def test_train_refuses_a_step_that_cannot_fit_in_memory(tmp_path):
    """task.seq_len = 10^6: the T x T attention of a step is petabytes.  One line naming what it needs (the check
    runs on the compiled step, before anything that size is allocated)."""
    spec = write_yaml(tmp_path / "tiny.yaml", TINY)
    result = invoke("train", spec, "--run-dir", tmp_path / "run", "--no-progress", "--set", "task.seq_len=1000000")
    assert_one_line_error(result, "a training step needs about")
    assert "GiB available; reduce task.seq_len or train.batch_size (or set train.micro_batch)" in result.output


def test_the_evaluation_is_checked_too(trained, monkeypatch):
    """train.micro_batch shrinks the training step, not the evaluation of the fixed test batches: it has its own
    check (here: a machine with 1 KiB free)."""
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 1024)
    result = invoke("eval", trained, "--no-baselines")
    assert_one_line_error(result, "evaluating the 2 fixed test batches needs about")
    assert "reduce task.seq_len, train.batch_size or train.eval_batches" in result.output


@needs_meminfo
def test_lm_train_and_prompt_tune_refuse_a_step_that_cannot_fit(tmp_path, trained, words):
    spec = write_yaml(tmp_path / "lm.yaml", merge(LM_TINY, {"data": {"path": str(words / "words.txt")}}))
    result = invoke("lm", spec, "--run-dir", tmp_path / "lm_run", "--no-progress",
                    "--set", "train.batch_size=100000000")
    assert_ends_with_one_error(result, "a training step needs about")
    assert "reduce model.context or train.batch_size" in result.output
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    result = invoke("prompt-tune", run, "--batch", "1000000000", "--examples", "2", "--no-progress")
    assert_one_line_error(result, "a prompt-tuning step (eos) needs about")
    assert "use a smaller --batch or set --micro-batch" in result.output
    assert math.isfinite(float(result.output.split("needs about ")[1].split(" GiB")[0].replace(",", "")))


def test_train_start_from_a_run_of_another_recipe_is_one_line(tmp_path):
    spec_path = tmp_path / "tiny.yaml"
    write_yaml(spec_path, merge(TINY, {"train": {"steps": 2}}))
    assert invoke("train", spec_path, "--run-dir", tmp_path / "short", "--no-progress").exit_code == 0
    longer = tmp_path / "longer.yaml"
    write_yaml(longer, merge(TINY, {"train": {"steps": 4, "batch_size": 16}}))
    assert_one_line_error(invoke("train", longer, "--run-dir", tmp_path / "long", "--no-progress",
                                 "--start-from", tmp_path / "short"),
                          "is not a shorter run of this spec (train.batch_size: 8 -> 16)")
    assert_one_line_error(invoke("train", longer, "--run-dir", tmp_path / "long2", "--no-progress",
                                 "--start-from", tmp_path / "nothing"), "is not a mesacli run directory")
    write_yaml(longer, merge(TINY, {"train": {"steps": 4}}))
    result = invoke("train", longer, "--run-dir", tmp_path / "long3", "--no-progress", "--start-from",
                    tmp_path / "short")
    assert result.exit_code == 0, result.output


def test_eval_on_the_authors_test_batches_and_an_unknown_test_set(trained):
    """`mesacli eval --test-set authors` evaluates on the authors' own test sequences (tasks.authors_test_batch) into
    its own record, beside eval_step<N>.json; an unknown test set is one line."""
    result = invoke("eval", trained, "--test-set", "authors", "--no-baselines")
    assert result.exit_code == 0, result.output
    assert "on the authors' test batches" in result.output
    record = json.loads((trained / "eval_authors_step2.json").read_text())
    assert record["test_set"] == "authors" and len(record["per_position_loss"]) == 8
    assert all(math.isfinite(x) for x in record["per_position_loss"])
    assert_one_line_error(invoke("eval", trained, "--test-set", "theirs"), "unknown test set 'theirs'")
