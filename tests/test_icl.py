"""In-context regression (icl-eval) and prompt tuning (prompt-tune) on a tiny trained raw-token run."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mesacli import loop, model, rundir, tasks
from mesacli.cli import app
from mesacli.errors import MesaError
from mesacli.icl import baselines, evaluate, prompts, tune
from mesacli.icl.tokens import load_tuned, stage_dir
from mesacli.icl.tune import TuneConfig, make_tune_step, tune_stage
from mesacli.state import load_params
from mesacli.train import train
from tests.conftest import TINY, merge, tiny_spec

N_S = 3
SEQ_LEN = 16
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny raw-token 2-layer softmax model trained for 200 steps on T=16 linear dynamics (n_s = 3).

    (Its test loss falls from ~0.5 to ~0.41; an untrained or linear-attention tiny model ignores the EOS.)"""
    spec = tiny_spec(task={"state_dim": N_S, "obs_dim": N_S, "seq_len": SEQ_LEN}, model={"attention": "softmax"},
                     train={"steps": 200, "batch_size": 16, "lr": 3e-2, "eval_every": 200, "checkpoint_every": 200,
                            "log_every": 50})
    run = tmp_path_factory.mktemp("icl") / "run"
    train(spec, run, progress=False)
    return run


# ----------------------------------------------------------------------------- prompt layout


def test_prompt_builder_places_x_y_eos_and_prefix_and_cuts_to_seq_len():
    b, n, s = 2, 4, N_S
    x = jnp.arange(b * n * s, dtype=jnp.float32).reshape(b, n, s) + 1.0
    y = -x
    eos, prefix = jnp.full((s,), 100.0), 200.0 + jnp.arange(2 * s, dtype=jnp.float32).reshape(2, s)

    plain = prompts.make_layout(seq_len=50, n_examples=n, eos=False)
    seq = np.asarray(prompts.build_prompt(x, y, plain))
    assert seq.shape == (b, 2 * n, s)
    for i in range(n):
        np.testing.assert_array_equal(seq[:, 2 * i], x[:, i])
        np.testing.assert_array_equal(seq[:, 2 * i + 1], y[:, i])
    np.testing.assert_array_equal(plain.x_positions, [0, 2, 4, 6])

    lay = prompts.make_layout(seq_len=13, n_examples=n, eos=True, prefix_len=2)  # full length 2 + 12 = 14, cut to 13
    seq = np.asarray(prompts.build_prompt(x, y, lay, eos, prefix))
    assert seq.shape == (b, 13, s) and lay.length == 13
    np.testing.assert_array_equal(seq[:, :2], np.broadcast_to(prefix, (b, 2, s)))
    np.testing.assert_array_equal(lay.x_positions, [2, 5, 8, 11])
    np.testing.assert_array_equal(lay.y_positions, [3, 6, 9, 12])
    np.testing.assert_array_equal(lay.eos_positions, [4, 7, 10, 13])
    for i in range(n):
        np.testing.assert_array_equal(seq[:, 2 + 3 * i], x[:, i])
        np.testing.assert_array_equal(seq[:, 3 + 3 * i], y[:, i])
        if 4 + 3 * i < 13:
            np.testing.assert_array_equal(seq[:, 4 + 3 * i], np.broadcast_to(eos, (b, s)))


def test_context_capacity_matches_the_paper_and_too_many_examples_is_an_error():
    assert prompts.max_examples(224, eos=True, prefix_len=20) == 68  # the paper's 68 examples
    assert prompts.max_examples(224, eos=False, prefix_len=0) == 112
    assert prompts.max_examples(224, eos=True, prefix_len=0) == 75  # x_75 sits at position 222 < 224
    with pytest.raises(MesaError, match="holds at most 5 examples"):
        prompts.make_layout(seq_len=16, n_examples=6, eos=True, prefix_len=2)
    with pytest.raises(MesaError, match="observes obs_dim=5 of state_dim=15"):
        prompts.check_task_hosts_prompt(tiny_spec(task={"kind": "partial", "state_dim": 15, "obs_dim": 5}).task)


def test_constructed_tokens_of_a_prompt_come_from_make_tokens():
    spec = tiny_spec(task={"state_dim": N_S, "obs_dim": N_S, "token_format": "constructed"})
    x, y = prompts.sample_regression(jax.random.PRNGKey(0), N_S, 3, 2)
    lay = prompts.make_layout(16, 3, eos=True)
    tok = np.asarray(tasks.make_tokens(spec.task, prompts.build_prompt(x, y, lay, jnp.ones(N_S))))
    assert tok.shape == (2, 9, 4 * N_S)
    np.testing.assert_array_equal(tok[:, 3, N_S:2 * N_S], x[:, 1])  # e_t = [0, s_t, s_t, s_{t-1}]
    np.testing.assert_array_equal(tok[:, 3, 3 * N_S:], np.ones((2, N_S)))  # s_{t-1} = EOS


def test_labels_come_from_an_orthogonal_teacher_and_the_continual_prompt_switches_it():
    x, y = prompts.sample_regression(jax.random.PRNGKey(1), N_S, 40, 2, switch_at=20)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.min() >= -1 and x.max() <= 1
    w = []
    for part in (slice(0, 20), slice(20, 40)):
        sol = np.linalg.lstsq(x[0, part], y[0, part], rcond=None)[0].T
        np.testing.assert_allclose(sol @ sol.T, np.eye(N_S), atol=0.03)  # orthogonal up to the 0.01 noise
        w.append(sol)
    assert np.abs(w[0] - w[1]).max() > 0.1  # a new W* after the switch
    xn, _ = prompts.sample_regression(jax.random.PRNGKey(1), N_S, 400, 1, x_dist="normal")
    assert np.abs(np.asarray(xn)).max() > 1.5


# ----------------------------------------------------------------------------- baselines


def _data(batch=3, n=9, seed=2):
    x, y = prompts.sample_regression(jax.random.PRNGKey(seed), N_S, n, batch)
    return np.asarray(x, np.float64), np.asarray(y, np.float64)


def test_autoregressive_lsq_matches_a_direct_solve_over_all_consecutive_pairs():
    x, y = _data()
    lam = 1e-3
    pred = baselines.ar_ridge_predictions(x, y, lam)
    for b in range(x.shape[0]):
        seq = [v for i in range(x.shape[1]) for v in (x[b, i], y[b, i])]
        for i in range(x.shape[1]):
            t = 2 * i  # x_i's position in the plain prompt; the pairs (s_{t'-1}, s_t') for t' <= t
            inputs = np.array([seq[k - 1] for k in range(1, t + 1)]).reshape(-1, N_S)
            targets = np.array([seq[k] for k in range(1, t + 1)]).reshape(-1, N_S)
            phi = np.linalg.solve(inputs.T @ inputs + lam * np.eye(N_S), inputs.T @ targets).T
            np.testing.assert_allclose(pred[b, i], phi @ x[b, i], rtol=1e-7, atol=1e-9)


def test_proper_lsq_matches_a_direct_solve_on_the_xy_pairs():
    x, y = _data()
    lam = 0.3
    pred = baselines.ridge_xy_predictions(x, y, lam)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            xs, ys = x[b, :i], y[b, :i]
            w = np.linalg.solve(xs.T @ xs + lam * np.eye(N_S), xs.T @ ys).T
            np.testing.assert_allclose(pred[b, i], w @ x[b, i], rtol=1e-7, atol=1e-9)
    # with enough pairs and tiny lambda it recovers W* up to the label noise
    x, y = _data(batch=2, n=60)
    loss = baselines.losses_BN(baselines.ridge_xy_predictions(x, y, 1e-6), y)
    assert loss[:, -10:].mean() < 5e-4


def test_gd1_line_search_is_the_minimum_over_a_brute_force_grid():
    x, y = _data(batch=8, n=12)
    eta = baselines.gd1_xy_line_search(x, y)
    g = np.zeros_like(y)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            g[b, i] = sum(y[b, j] * (x[b, j] @ x[b, i]) for j in range(i))  # one GD step from W = 0
    np.testing.assert_allclose(baselines.gd1_xy_direction(x, y), g, rtol=1e-10)
    grid = np.linspace(0.5 * eta, 1.5 * eta, 2001)
    losses = [np.sum((y - e * g) ** 2) for e in grid]
    assert abs(grid[int(np.argmin(losses))] - eta) <= grid[1] - grid[0]
    assert eta > 0


# ----------------------------------------------------------------------------- the frozen model on prompts


def test_the_prediction_for_y_i_is_read_at_x_i(tiny_run):
    spec, params, _ = load_params(tiny_run)
    x, y = prompts.sample_regression(jax.random.PRNGKey(3), N_S, 4, 2)
    eos, prefix = jnp.ones(N_S), jnp.zeros((2, N_S))
    lay = prompts.make_layout(SEQ_LEN, 4, eos=True, prefix_len=2)
    losses = prompts.model_losses_BN(params, spec, lay, x, y, eos, prefix)
    seq = jnp.concatenate([jnp.broadcast_to(prefix, (2, 2, N_S)),
                           jnp.stack([x, y, jnp.broadcast_to(eos, x.shape)], 2).reshape(2, 12, N_S)], 1)
    pred, _ = model.apply(params, seq, spec)
    by_hand = 0.5 * np.sum((np.asarray(pred)[:, [2, 5, 8, 11]] - np.asarray(y)) ** 2, -1)
    np.testing.assert_allclose(losses, by_hand, rtol=1e-5)
    # causality: changing y_2 leaves the predictions for examples 1 and 2 alone and changes example 3's
    changed = prompts.model_losses_BN(params, spec, lay, x, y.at[:, 1].add(1.0), eos, prefix)
    np.testing.assert_allclose(changed[:, :1], losses[:, :1], rtol=1e-6)
    assert np.abs(changed[:, 2] - losses[:, 2]).max() > 1e-6


def test_prompt_tuning_the_eos_reduces_held_out_label_loss(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = TuneConfig(steps=40, lr=0.05, batch=32, n_examples=5, checkpoint_every=20, log_every=5)
    result = tune_stage(run, "eos", cfg, progress=False)
    assert result.step == 40 and result.heldout_after < 0.97 * result.heldout_before
    spec, params, _ = load_params(run)
    # the initial state is placed like the params: one trace and compile for all 40 steps (not one more at step 2)
    _, step_fn = make_tune_step(spec, prompts.make_layout(SEQ_LEN, 5, eos=True), "eos", cfg.lr, cfg.batch, cfg.x_dist,
                                cfg.seed, cfg.micro_batch)
    assert step_fn._cache_size() == 1
    # independent held-out prompts (another seed): tuned EOS beats the initial N(0, I) EOS
    lay = prompts.make_layout(SEQ_LEN, 6, eos=True)  # all 6 examples that fit (tuned on 5)
    x, y = prompts.sample_regression(jax.random.PRNGKey(99), N_S, lay.n_examples, 256)
    init = jax.random.normal(prompts.icl_key("init", 0, 0), (N_S,))
    tuned = load_tuned(run, N_S)["eos"]
    np.testing.assert_array_equal(tuned, result.tokens)
    before = prompts.model_losses_BN(params, spec, lay, x, y, init).mean()
    after = prompts.model_losses_BN(params, spec, lay, x, y, tuned).mean()
    assert after < 0.97 * before
    with pytest.raises(MesaError, match="token size mismatch"):
        load_tuned(run, N_S + 1)


def test_micro_batched_tune_step_gives_the_full_batch_update(tiny_run):
    """The prefix step accumulated over 4 micro-batches of 8 prompts equals one pass over the 32 prompts."""
    spec, params, _ = load_params(tiny_run)
    lay = prompts.make_layout(SEQ_LEN, 4, eos=True, prefix_len=2)
    tokens = jax.random.normal(jax.random.PRNGKey(3), (2, N_S))
    results = []
    for micro in (None, 8):
        tx, step_fn = make_tune_step(spec, lay, "prefix", 1e-3, 32, "uniform", 0, micro)
        state = {"tokens": tokens, "eos": jnp.ones(N_S), "opt_state": tx.init(tokens), "step": jnp.array(0)}
        new, value = step_fn(state, params)
        results.append((np.asarray(new["tokens"]), float(value), tx, state))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)
    assert np.abs(results[0][0] - np.asarray(tokens)).max() > 5e-4  # the step moved the tokens (lr 1e-3)
    with pytest.raises(MesaError, match=r"--micro-batch \(5\) must be a positive divisor of --batch \(32\)"):
        TuneConfig(batch=32, micro_batch=5).validate()


def test_prompt_tune_resumed_equals_uninterrupted(tiny_run, tmp_path):
    cfg = TuneConfig(steps=12, lr=0.05, batch=32, n_examples=5, checkpoint_every=4, log_every=2)  # compiled above
    runs = []
    for name in ("a", "b"):
        shutil.copytree(tiny_run, tmp_path / name)
        runs.append(tmp_path / name)
    whole = tune_stage(runs[0], "eos", cfg, progress=False, heldout=False)
    first = tune_stage(runs[1], "eos", cfg, progress=False, heldout=False, stop_at_step=6)
    assert first.step == 6
    second = tune_stage(runs[1], "eos", cfg, progress=False, heldout=False)
    assert second.resumed_from == 6 and second.step == 12
    np.testing.assert_allclose(second.tokens, whole.tokens, rtol=1e-6)
    log = [json.loads(line) for line in (runs[1] / "prompt_tune/eos/loss.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (runs[0] / "prompt_tune/eos/loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in ref] == [2, 4, 6, 8, 10, 12]
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in ref], rtol=1e-5)
    with pytest.raises(MesaError, match="other settings"):
        tune_stage(runs[1], "eos", TuneConfig(steps=12, lr=0.01, batch=32, n_examples=5), progress=False, heldout=False)


def test_sigterm_stops_prompt_tuning_after_the_step_with_a_checkpoint(tiny_run, tmp_path, monkeypatch):
    import os
    import signal

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    original = tune.make_tune_step

    def terminating_at_the_third_step(*args):
        tx, step_fn = original(*args)
        calls = []

        def step(state, params):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step is under way
            return step_fn(state, params)

        return tx, step

    monkeypatch.setattr(tune, "make_tune_step", terminating_at_the_third_step)
    cfg = TuneConfig(steps=12, lr=0.05, batch=32, n_examples=5, checkpoint_every=12, log_every=2)
    stopped = tune_stage(run, "eos", cfg, progress=False, heldout=False)
    assert stopped.interrupted and stopped.step == 3  # returned, not raised: the step under way finished
    assert load_tuned(run, N_S)["eos_step"] == 3  # ... and was saved
    np.testing.assert_array_equal(load_tuned(run, N_S)["eos"], stopped.tokens)
    assert [s for s, _ in stopped.losses] == [2, 3]  # the log was flushed up to the stop
    monkeypatch.setattr(tune, "make_tune_step", original)
    resumed = tune_stage(run, "eos", cfg, progress=False, heldout=False)
    assert resumed.resumed_from == 3 and resumed.step == 12 and not resumed.interrupted
    log = [json.loads(line)["step"] for line in (run / "prompt_tune/eos/loss.jsonl").read_text().splitlines()]
    assert log == [2, 3, 4, 6, 8, 10, 12]


def test_a_non_finite_tuning_loss_stops_with_the_last_checkpoint_kept(tiny_run, tmp_path, monkeypatch):
    """A step whose label loss is NaN raises TrainingDiverged (exit 1 in the CLI) naming the stage's last good
    checkpoint, which stays loadable; nothing after it is logged."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    original = tune.make_tune_step

    def nan_from_call(first_bad):
        def make(*args):
            tx, step_fn = original(*args)
            calls = []

            def step(state, params):
                calls.append(1)
                state, value = step_fn(state, params)
                return state, value * jnp.nan if len(calls) >= first_bad else value

            return tx, step

        return make

    monkeypatch.setattr(tune, "make_tune_step", nan_from_call(5))
    cfg = TuneConfig(steps=8, lr=0.05, batch=32, n_examples=5, checkpoint_every=2, log_every=2)
    with pytest.raises(loop.TrainingDiverged, match="try a smaller --lr") as err:
        tune_stage(run, "eos", cfg, progress=False, heldout=False)
    message = str(err.value)  # the loss of step 5 is that of the tokens saved at step 4: they go too
    assert "at step 5" in message and "last good checkpoint: step 2" in message
    assert str(stage_dir(run, "eos") / "checkpoints") in message
    tuned = load_tuned(run, N_S)
    assert tuned["eos_step"] == 2 and np.all(np.isfinite(tuned["eos"]))
    log = [json.loads(line)["step"] for line in (run / "prompt_tune/eos/loss.jsonl").read_text().splitlines()]
    assert log == [2, 4]
    # the CLI: resumes from step 2, diverges at once, one error line and exit code 1; its held-out check finds the
    # tokens of step 2 finite (the NaN came from the step, not from them): they are kept
    monkeypatch.setattr(tune, "make_tune_step", nan_from_call(1))
    out = runner.invoke(app, ["prompt-tune", str(run), "--steps", "8", "--batch", "32", "--lr", "0.05",
                              "--examples", "5", "--checkpoint-every", "2", "--no-progress"])
    assert out.exit_code == 1, out.output
    lines = [line for line in out.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "try a smaller --lr" in lines[0], out.output
    assert "last good checkpoint: step 2" in lines[0]
    assert load_tuned(run, N_S)["eos_step"] == 2


@pytest.mark.slow
def test_a_prefix_tuned_with_an_older_eos_is_not_resumed(tiny_run, tmp_path):
    """Resuming the prefix stage after the EOS was tuned further would go on with the old EOS: an error."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = TuneConfig(steps=4, lr=0.05, batch=32, n_examples=4, prefix_len=2, checkpoint_every=2, log_every=2)
    tune_stage(run, "eos", cfg, progress=False, heldout=False)
    assert tune_stage(run, "prefix", cfg, progress=False, heldout=False, stop_at_step=2).step == 2
    resumed = tune_stage(run, "prefix", cfg, progress=False, heldout=False)  # same EOS: resumes
    assert resumed.resumed_from == 2 and resumed.step == 4
    tune_stage(run, "eos", dataclasses.replace(cfg, steps=6), progress=False, heldout=False)
    longer = dataclasses.replace(cfg, steps=6)
    with pytest.raises(MesaError, match="the EOS was tuned further"):
        tune_stage(run, "prefix", longer, progress=False, heldout=False)
    shutil.rmtree(stage_dir(run, "prefix"))
    fresh = tune_stage(run, "prefix", longer, progress=False, heldout=False)
    assert fresh.resumed_from is None and fresh.step == 6
    tuned = load_tuned(run, N_S)
    assert tuned["eos_step"] == 6
    np.testing.assert_array_equal(tuned["prefix_eos"], tuned["eos"])


# ----------------------------------------------------------------------------- CLI


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output


def test_cli_prompt_tune_then_icl_eval_end_to_end(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = runner.invoke(app, ["prompt-tune", str(run), "--what", "both", "--steps", "4", "--prefix-len", "2",
                              "--batch", "32", "--lr", "0.05", "--checkpoint-every", "4", "--examples", "5",
                              "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "held-out" in out.output and (run / "prompt_tune/prefix/loss.png").exists()
    out = runner.invoke(app, ["icl-eval", str(run), "--prompt", "plain,eos,tuned", "--seeds", "2", "--batch", "32"])
    assert out.exit_code == 0, out.output
    assert "model (EOS+prefix)" in out.output and "AR ridge" in out.output and "i=5" in out.output
    data = json.loads((run / "icl_eval_plain_eos_tuned.json").read_text())
    assert data["meta"]["n_examples"] == 5  # (16 - 2) / 3 rounded up, the tightest of the three prompts
    assert data["meta"]["layouts"]["tuned"]["x_positions"] == [2, 5, 8, 11, 14]
    assert len(data["curves"]["model (plain)"]["mean"]) == 5 and "median" in data["curves"][
        "AR ridge LSQ, all token pairs (lam=0.001)"]
    assert (run / "icl_eval_plain_eos_tuned.png").exists()
    out = runner.invoke(app, ["icl-eval", str(run), "--continual", "--seeds", "1", "--batch", "32", "--examples", "5"])
    assert out.exit_code == 0, out.output
    data = json.loads((run / "icl_eval_plain_continual.json").read_text())
    assert data["meta"]["continual_switch_at"] == 2  # round(5 * 21 / 68)


def test_cli_bad_inputs_give_one_error_line(tiny_run, tmp_path):
    _one_line_error(runner.invoke(app, ["icl-eval", str(tiny_run), "--examples", "9"]), "holds at most 8 examples")
    _one_line_error(runner.invoke(app, ["prompt-tune", str(tiny_run), "--examples", "7", "--no-progress"]),
                    "holds at most 6 examples")
    _one_line_error(runner.invoke(app, ["icl-eval", str(tiny_run), "--prompt", "tuned"]), "no tuned prefix")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "spec.yaml").write_text(yaml.safe_dump(merge(TINY, {"task": {"kind": "partial", "obs_dim": 2}})))
    _one_line_error(runner.invoke(app, ["icl-eval", str(partial)]), "observes obs_dim=2 of state_dim=4")
    _one_line_error(runner.invoke(app, ["prompt-tune", str(partial), "--no-progress"]), "observes obs_dim=2")
    _one_line_error(runner.invoke(app, ["icl-eval", str(tiny_run), "--prompt", "fancy"]), "not one of")
    _one_line_error(runner.invoke(app, ["icl-eval", str(tiny_run), "--lam", "0"]), "--lam must be positive")
    _one_line_error(runner.invoke(app, ["prompt-tune", str(tiny_run), "--what", "prefix", "--no-progress"]),
                    "no room for an example after a 20-token prefix")
    _one_line_error(runner.invoke(app, ["prompt-tune", str(tiny_run), "--what", "prefix", "--prefix-len", "2",
                                        "--no-progress"]), "no tuned EOS")


@pytest.mark.slow
def test_tokens_tuned_on_another_model_checkpoint_are_refused(tmp_path):
    """A run trained on after prompt-tuning: icl-eval of the newer checkpoint refuses the stale tokens (one line),
    evaluates the checkpoint they were tuned on, and prompt-tune names the step change."""
    spec = tiny_spec(task={"state_dim": N_S, "obs_dim": N_S, "seq_len": SEQ_LEN}, model={"attention": "softmax"},
                     train={"steps": 4, "batch_size": 8, "eval_every": 4, "checkpoint_every": 2, "log_every": 2})
    run = tmp_path / "run"
    train(spec, run, progress=False)
    tune = ["prompt-tune", str(run), "--steps", "2", "--batch", "8", "--examples", "5", "--no-progress"]
    assert runner.invoke(app, tune + ["--step", "2"]).exit_code == 0
    assert load_tuned(run, N_S)["eos_model_step"] == 2
    _one_line_error(runner.invoke(app, ["icl-eval", str(run), "--prompt", "eos", "--seeds", "1", "--batch", "8"]),
                    "tuned on model step 2, but this evaluates step 4: pass --step 2")
    out = runner.invoke(app, ["icl-eval", str(run), "--prompt", "eos", "--seeds", "1", "--batch", "8", "--step", "2"])
    assert out.exit_code == 0, out.output
    assert json.loads((run / "icl_eval_eos_step2.json").read_text())["meta"]["eos_source"]["eos"] == "tuned"
    _one_line_error(runner.invoke(app, tune), "model checkpoint step: 2 -> 4")


@pytest.mark.slow
def test_icl_eval_analyses_every_replica_of_a_multi_seed_run(tmp_path):
    spec = tiny_spec(task={"state_dim": N_S, "obs_dim": N_S, "seq_len": SEQ_LEN},
                     train={"steps": 4, "seeds": 2, "seed": 7, "eval_every": 4, "checkpoint_every": 4})
    run = tmp_path / "seeds"
    train(spec, run, progress=False)
    report = evaluate.icl_eval(run, "plain", seeds=2, batch=8, write=False)
    curve = report.curves["model (plain)"]
    assert report.meta["replica_seeds"] == [7, 8] and sorted(curve["per_replica"]) == ["7", "8"]
    per_replica = np.array([curve["per_replica"][s] for s in ("7", "8")])
    np.testing.assert_allclose(per_replica.mean(0), curve["mean"], rtol=1e-6)
    assert not np.allclose(per_replica[0], per_replica[1])
    # prompt-tune tunes every replica (its own tokens in prompt_tune/seed<k>/); icl-eval uses each one's
    stages = tune.prompt_tune(run, "eos", TuneConfig(steps=2, batch=4, n_examples=4, checkpoint_every=2),
                              progress=False)
    assert [(r.stage, r.replica) for r in stages] == [("eos", 7), ("eos", 8)]
    tuned = {s: icl_load(run, s) for s in (7, 8)}
    assert not np.allclose(tuned[7], tuned[8])  # different models, different gradients
    report = evaluate.icl_eval(run, "eos", n_examples=4, seeds=1, batch=8, write=False)
    assert "model (EOS)" in report.curves and report.meta["eos_source"]["eos"] == "tuned"
    for seed in (7, 8):  # each replica is evaluated with its own tuned EOS
        _, params = dict(enumerate(replicas_of(run)))[seed - 7]
        x, y = prompts.sample_regression(prompts.icl_key("eval", 0, 0), N_S, 4, 8, "uniform", None)
        layout = prompts.make_layout(SEQ_LEN, 4, True, 0)
        own = prompts.model_losses_BN(params, load_params(run)[0], layout, x, y, tuned[seed], None).mean(0)
        np.testing.assert_allclose(report.curves["model (EOS)"]["per_replica"][str(seed)], own, rtol=1e-5)
    with pytest.raises(MesaError, match="holds 2 replicas"):
        tune_stage(run, "eos", TuneConfig(steps=1, batch=4, n_examples=4), progress=False)


def icl_load(run, seed):
    return load_tuned(run, N_S, seed)["eos"]


def replicas_of(run):
    spec, params, _ = load_params(run)
    return rundir.replicas(spec, params)
