"""End to end through the CLI on tiny specs; every bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import assert_one_line_error, invoke


def test_train_then_eval_then_resume_is_a_no_op(tiny_spec_file, tmp_path):
    spec = tiny_spec_file()
    run = tmp_path / "run"
    result = invoke("train", spec, "--run-dir", run, "--no-progress", "--set", "train.steps=4")
    assert result.exit_code == 0, result.output
    assert "test loss (seq. avg)" in result.output
    assert yaml.safe_load((run / "spec.yaml").read_text())["train"]["steps"] == 4
    assert (run / "checkpoints" / "4").is_dir()
    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    assert "GD-1" in result.output and (run / "eval_step4.json").exists()
    data = json.loads((run / "eval_step4.json").read_text())
    assert len(data["per_position_loss"]) == 8 and "gd1_eta" in data
    again = invoke("train", spec, "--run-dir", run, "--no-progress", "--set", "train.steps=4")
    assert again.exit_code == 0 and "resumed from step 4" in again.output


def test_interrupted_session_resumes(tiny_spec_file, tmp_path):
    spec, run = tiny_spec_file(), tmp_path / "run"
    first = invoke("train", spec, "--run-dir", run, "--no-progress", "--stop-at", "2")
    assert first.exit_code == 0 and "stopped at step 2 of 6" in first.output
    second = invoke("train", spec, "--run-dir", run, "--no-progress")
    assert second.exit_code == 0 and "resumed from step 2" in second.output


def test_compact_checkpoints_are_noted_when_a_run_resumes_from_one(tiny_spec_file, tmp_path):
    spec, run = tiny_spec_file(), tmp_path / "run"
    first = invoke("train", spec, "--run-dir", run, "--no-progress", "--stop-at", "2", "--compact-checkpoints")
    assert first.exit_code == 0, first.output
    second = invoke("train", spec, "--run-dir", run, "--no-progress")
    assert second.exit_code == 0 and "resumed from step 2" in second.output
    assert "stored in bfloat16" in second.output


def test_dry_run_prints_the_resolved_spec(tiny_spec_file):
    result = invoke("train", tiny_spec_file(), "--dry-run", "--set", "model.layers=5")
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["model"]["layers"] == 5


def test_specs_lists_the_experiments(tmp_path):
    from mesacli.spec_loader import EXPERIMENTS_DIR

    result = invoke("specs")
    assert result.exit_code == 0 and "lsa1_constructed.yaml" in result.output
    assert EXPERIMENTS_DIR.parent.name == "mesacli"  # shipped inside the package, found when installed too
    (tmp_path / "mine.yaml").write_text("# my own experiment\nname: mine\n")
    result = invoke("specs", str(tmp_path))
    assert result.exit_code == 0 and "mine.yaml" in result.output and "my own experiment" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke("specs", empty), "no *.yaml spec")
    assert_one_line_error(invoke("specs", tmp_path / "nowhere"), "is not a directory")


def test_help():
    result = invoke("--help")
    assert result.exit_code == 0 and "train" in result.output and "quickstart" in result.output


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("model:\n  layers: [1,\n", "YAML syntax error (line"),
        ("model:\n  num_head: 2\n", "unknown spec key 'model.num_head' (did you mean 'model.num_heads'?)"),
        ("model:\n  layers: four\n", "model.layers: expected an integer, got 'four'"),
        ("task:\n  token_format: constructed\nmodel:\n  embed_dim: 30\n", "must equal the token size (40"),
    ],
)
def test_bad_spec_files(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert_one_line_error(invoke("train", path, "--run-dir", tmp_path / "run"), fragment)
    assert not (tmp_path / "run").exists()


def test_missing_spec_and_bad_override(tiny_spec_file, tmp_path):
    assert_one_line_error(invoke("train", tmp_path / "nope.yaml"), "spec file not found")
    assert_one_line_error(invoke("train", tiny_spec_file(), "--set", "model.layrs=3"), "did you mean 'model.layers'")
    assert_one_line_error(invoke("train", tiny_spec_file(), "--set", "train.lr"), "expected KEY=VALUE")


def test_run_dir_spec_mismatch_and_checkpoint_problems(tiny_spec_file, tmp_path):
    spec, run = tiny_spec_file(train={"steps": 2}), tmp_path / "run"
    assert invoke("train", spec, "--run-dir", run, "--no-progress").exit_code == 0
    assert_one_line_error(invoke("train", spec, "--run-dir", run, "--set", "model.layers=3"),
                          "was made with a different spec (model.layers: 2 -> 3)")
    for path in (run / "checkpoints" / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    assert_one_line_error(invoke("eval", run), "corrupted or unreadable")
    assert_one_line_error(invoke("train", spec, "--run-dir", run), "corrupted or unreadable")
    assert_one_line_error(invoke("eval", tmp_path), "not a mesacli run directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "spec.yaml").write_text((run / "spec.yaml").read_text())
    assert_one_line_error(invoke("eval", empty), "no checkpoint found")


def test_divergence_exits_1_with_a_message(tiny_spec_file, tmp_path):
    spec = tiny_spec_file(train={"lr": 1e30, "grad_clip": None, "weight_decay": 0.0, "checkpoint_every": 1})
    result = invoke("train", spec, "--run-dir", tmp_path / "run", "--no-progress")
    assert_one_line_error(result, "non-finite loss or parameters", code=1)
    assert "no good checkpoint was saved" in result.output  # step 1's parameters are finite, their loss is not


@pytest.mark.slow
def test_train_and_eval_with_several_seeds(tiny_spec_file, tmp_path):
    spec, run = tiny_spec_file(), tmp_path / "run"
    result = invoke("train", spec, "--run-dir", run, "--no-progress", "--seeds", "2", "--set", "train.steps=2")
    assert result.exit_code == 0, result.output
    assert "2 seeds: sequence-averaged test loss" in result.output and "seed 1:" in result.output
    assert yaml.safe_load((run / "spec.yaml").read_text())["train"]["seeds"] == 2
    result = invoke("eval", run, "--no-baselines")
    assert result.exit_code == 0, result.output
    data = json.loads((run / "eval_step2.json").read_text())
    assert sorted(data["per_seed"]) == ["0", "1"] and "seq_avg_loss_std" in data
    bad = invoke("train", spec, "--run-dir", tmp_path / "bad", "--seeds", "0")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
