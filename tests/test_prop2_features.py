"""Prop-2 baselines of the partially observed and nonlinear tasks (Fig. 7B/C): feature maps, the matrix-free
Chebyshev solver, the variants' records, and the ledger running them without a trained model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import TINY, merge

from mesacli import baselines, tasks
from mesacli.errors import MesaError
from mesacli.probe import run_model_free, run_probe, solvers
from mesacli.reproduce import metrics
from mesacli.reproduce.ledger import load_ledger
from mesacli.reproduce.report import write_report
from mesacli.reproduce.run import reproduce_run
from mesacli.reproduce.status import ledger_status
from mesacli.spec import spec_from_dict

PARTIAL = {"kind": "partial", "state_dim": 6, "obs_dim": 2, "seq_len": 10, "obs_noise": 0.01, "obs_matrix_std": 0.5}
NONLINEAR = {"kind": "nonlinear", "state_dim": 4, "obs_dim": 4, "seq_len": 10, "init_scale": 0.25, "mlp_hidden": 8}


def tiny(task: dict, **train):
    return spec_from_dict(merge(TINY, {"task": task, "train": {"batch_size": 16, **train}}))


# ----------------------------------------------------------------------------- feature maps


def test_concat_features_stack_the_last_observations_newest_first_zero_padded():
    obs = np.random.default_rng(0).normal(size=(3, 7, 2))
    z = np.asarray(solvers.feature_map(tiny(PARTIAL).task, jnp.asarray(obs), "concat", 4))
    assert z.shape == (3, 7, 8)
    for t in range(7):  # slot j holds s_{t-j}, zero before the sequence starts
        want = np.concatenate([obs[:, t - j] if t - j >= 0 else np.zeros((3, 2)) for j in range(4)], axis=-1)
        np.testing.assert_allclose(z[:, t], want, rtol=1e-6)
    np.testing.assert_allclose(z[:, 0, 2:], 0.0)  # z_1 = [s_1, 0, 0, 0]
    np.testing.assert_allclose(solvers.concat_features(obs, 1, xp=np), obs)  # a window of one is s_t


def test_mlp_features_are_the_teachers_normalised_mlp_output():
    spec = tiny(NONLINEAR)
    obs = jax.random.uniform(jax.random.PRNGKey(1), (2, 5, 4), minval=-1, maxval=1)
    phi = np.asarray(solvers.feature_map(spec.task, obs, "mlp"))
    want = np.stack([np.stack([np.asarray(tasks.teacher_features(spec.task, obs[b, t])) for t in range(5)])
                     for b in range(2)])
    np.testing.assert_allclose(phi, want, rtol=1e-5, atol=1e-6)
    a, b = (np.asarray(w, np.float64) for w in tasks.nonlinear_mlp_weights(spec.task))  # B GELU(A s) / ||.||
    h = a @ np.asarray(obs[0, 0], np.float64)
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))  # tanh GELU, as the authors' code
    m = b @ gelu
    np.testing.assert_allclose(phi[0, 0], m / np.linalg.norm(m), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(phi, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(MesaError, match="nonlinear task only"):
        solvers.feature_map(tiny(PARTIAL).task, obs, "mlp")
    with pytest.raises(MesaError, match="unknown features"):
        solvers.feature_map(spec.task, obs, "poly")


def test_the_paper_baselines_per_task_and_the_lambda_grids():
    assert solvers.lambda_grid(10.0) == (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
    assert solvers.lambda_grid(1.0)[-1] == 1.0 and solvers.lambda_grid(100.0)[-1] == 100.0
    partial = solvers.variants_for(tiny(PARTIAL).task, search=True)
    assert [(v.name, v.features, v.window, v.lambdas[-1]) for v in partial] == [
        ("concat", "concat", 16, 10.0), ("naive", "raw", None, 100.0)]
    # by default lambda = 1e-3, the lambda of [C]'s stored Fig. 7B/C curves
    assert all(v.lambdas == (1e-3,) for task in (PARTIAL, NONLINEAR) for v in solvers.variants_for(tiny(task).task))
    assert [(v.name, v.features) for v in solvers.variants_for(tiny(NONLINEAR).task)] == [
        ("mlp", "mlp"), ("naive", "raw")]
    assert solvers.variants_for(tiny({"kind": "linear"}).task) == []  # the fully observed analysis as before


# ----------------------------------------------------------------------------- the solver


def authors_lsq_solver(feat_BTF, labels_BTL, lam, alphas=None, betas=None):
    """[C]'s LeastSquaresSequenceSolver (src/models/auxiliary_models.py: least_squares_seq_pred_single_seq with
    invert_matrix_chebyshev, or jnp.linalg.inv without alphas), transcribed loop for loop in float64 numpy: the
    data of token t (0-based) are shifted_data[:t] (the features one position back, a zero first) against
    labels[:t], and the prediction is feat[t] @ w_hat."""
    b_, t_, f = feat_BTF.shape
    out = np.zeros((b_, t_, labels_BTL.shape[-1]))
    for b in range(b_):
        shifted = np.concatenate([np.zeros((1, f)), feat_BTF[b, :-1]])
        for token in range(t_):
            x, y = shifted[:token], labels_BTL[b, :token]
            a = x.T @ x + lam * np.eye(f)
            if alphas is None:
                inv = np.linalg.inv(a)
            else:
                norm = np.linalg.norm(a)
                a, eye = a / norm, np.eye(f)
                inv = term = prev = eye
                for alpha, beta in zip(alphas, betas, strict=True):
                    term = term @ (eye - alpha * a)
                    momentum = beta * (inv - prev)
                    prev = inv
                    inv = inv + term + momentum
                inv = inv / norm
            out[b, token] = feat_BTF[b, token] @ (inv @ (x.T @ y))
    return out


def test_the_solver_and_its_ridge_reference_follow_the_authors_pairs():
    """prop2_predictions and ridge_pair_predictions use [C]'s data matrix (one pair fewer than L_t: nothing to
    regress on before t = 3), on s_t and on concatenated observations (there [C] regresses the whole z_{t'} and
    reads its first n_s entries, which is regressing s_{t'})."""
    rng = np.random.default_rng(5)
    obs = rng.uniform(-1, 1, size=(3, 9, 2))
    alphas, betas = list(solvers.PAPER_CHEBYSHEV_LINEAR[0][:4]), list(solvers.PAPER_CHEBYSHEV_LINEAR[1][:4])
    for phi, lam in ((obs, 1e-3), (np.asarray(solvers.concat_features(obs, 3, xp=np)), 0.7)):
        want = authors_lsq_solver(phi, phi, lam, alphas, betas)[..., :2]
        with jax.enable_x64(True):
            got = np.asarray(solvers.prop2_predictions(jnp.asarray(obs), jnp.asarray(alphas), jnp.asarray(betas),
                                                       lam, jnp.asarray(phi)))
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        assert np.all(got[:, :2] == 0) and np.all(np.abs(got[:, 2:]) > 0)
        np.testing.assert_allclose(solvers.ridge_pair_predictions(obs, lam, phi),
                                   authors_lsq_solver(phi, phi, lam)[..., :2], rtol=1e-8, atol=1e-10)
    # current_pair: [P]'s L_t, the pairs up to (s_{t-1}, s_t) (as mesacli.baselines' ridge)
    with jax.enable_x64(True):
        both = [np.asarray(solvers.prop2_predictions(jnp.asarray(obs), jnp.asarray(alphas), jnp.asarray(betas),
                                                     1e-3, current_pair=c)) for c in (False, True)]
    incl = np.zeros_like(obs)
    for t in range(obs.shape[1]):
        x = np.concatenate([np.zeros_like(obs[:, :1]), obs[:, :t]], axis=1)  # s_0 = 0, s_1 .. s_t-1 (1-based)
        y = obs[:, :t + 1]
        a = np.einsum("btf,btg->bfg", x, x) + 1e-3 * np.eye(2)
        inv = solvers.chebyshev_inverse(a, alphas, betas, xp=np)
        incl[:, t] = np.einsum("bf,bfg,bgl->bl", obs[:, t], inv, np.einsum("btf,btl->bfl", x, y))
    np.testing.assert_allclose(both[1], incl, rtol=1e-9, atol=1e-12)
    assert not np.allclose(both[0], both[1])
    np.testing.assert_allclose(solvers.ridge_pair_predictions(obs, 1e-3, current_pair=True),
                               baselines.ridge_predictions(obs, 1e-3))


def test_matrix_free_chebyshev_equals_the_explicit_inverse_on_features():
    """prop2_predictions (causal products with X, the Frobenius norm from the Gram matrix) against the explicit
    [T, F, F] Gram stack and chebyshev_inverse, in float64 numpy."""
    rng = np.random.default_rng(2)
    obs = rng.normal(size=(4, 9, 3))
    phi = np.asarray(solvers.concat_features(obs, 3, xp=np))
    alphas, betas, lam = [1.0, 2.5, 3.0], [0.0, 0.4, 0.9], 0.3
    x = np.concatenate([np.zeros_like(phi[:, :1]), phi[:, :-1]], axis=1)
    xx = np.cumsum(np.einsum("bti,btj->btij", x, x), axis=1) + lam * np.eye(9)
    yx = np.cumsum(np.einsum("bti,btj->btij", obs, x), axis=1)
    want = np.einsum("btij,btjk,btk->bti", yx, solvers.chebyshev_inverse(xx, alphas, betas, xp=np), phi)
    np.testing.assert_allclose(np.einsum("btij,btj->bti", yx, solvers.chebyshev_apply(xx, phi, alphas, betas, xp=np)),
                               want, rtol=1e-10, atol=1e-12)
    with jax.enable_x64(True):
        got = solvers.prop2_predictions(jnp.asarray(obs), jnp.asarray(alphas), jnp.asarray(betas), lam,
                                        jnp.asarray(phi), current_pair=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-11)


def test_many_small_steps_on_concat_features_approach_ridge_least_squares():
    """A small lambda and enough steps: the solver on concatenated observations reaches the float64 ridge solution
    on the same features (the normalised A has its eigenvalues in (0, 1], so the Neumann series converges)."""
    spec = tiny(PARTIAL, eval_batches=1)
    (batch,) = tasks.eval_batches(spec, batch_size=8)
    obs = np.asarray(batch.obs_BTS, np.float64)
    phi = np.asarray(solvers.concat_features(obs, 3, xp=np))
    lam = 1e-2
    ridge = baselines.ridge_predictions(obs, lam, features_BTF=phi)
    x = np.concatenate([np.zeros_like(phi[:, :1]), phi[:, :-1]], axis=1)
    xx = np.cumsum(np.einsum("bti,btj->btij", x, x), axis=1) + lam * np.eye(6)
    yx = np.cumsum(np.einsum("bti,btj->btij", obs, x), axis=1)
    # Neumann steps (alpha = 1, beta = 0) shrink the error by 1 - lam_min(A_t) / ||A_t||_F each (below 2e3 here)
    cond = np.max(np.sqrt(np.sum(xx**2, axis=(-2, -1))) / np.linalg.eigvalsh(xx)[..., 0])
    steps = int(30 * cond)
    errors = {}
    for k in (50, steps):
        z = solvers.chebyshev_apply(xx, phi, [1.0] * k, [0.0] * k, xp=np)
        errors[k] = np.max(np.abs(np.einsum("btij,btj->bti", yx, z) - ridge))
    assert errors[steps] < 1e-8 < 1e-2 < errors[50]  # (prop2_predictions is this solver: see the test above)
    # and the ridge reference with features is the plain one when the features are s_t
    np.testing.assert_allclose(baselines.ridge_predictions(obs, lam, features_BTF=obs),
                               baselines.ridge_predictions(obs, lam))


def test_lambda_line_search_picks_the_least_loss_on_its_batches():
    spec = tiny(PARTIAL)
    batches = tasks.eval_batches(spec, batch_size=8)
    variant = solvers.Variant("concat", "concat", 3, (1e-3, 0.1, 10.0))
    alphas, betas = [1.0, 2.0], [0.0, 0.5]
    lam, losses = solvers.line_search_lambda(batches, spec.task, variant, alphas, betas)
    for value, loss in zip(variant.lambdas, losses, strict=True):
        preds = solvers.solver_predictions(batches, alphas, betas, value, task=spec.task, features="concat",
                                           window=3)
        assert loss == pytest.approx(float(np.mean(solvers.loss_curve(preds, batches))), rel=1e-6)
    assert lam == variant.lambdas[int(np.argmin(losses))]


# ----------------------------------------------------------------------------- model-free runs and the ledger


FAST = {"prop2_train_steps": 30, "prop2_k": 2, "prop2_window": 3, "prop2_lr": 0.3,  # a peak lr for 30 steps
        "prop2_lambda_search": True}


# slow (27 s together): the default suite covers the model-free path end to end in
# test_the_ledger_produces_model_free_entries_without_training
@pytest.mark.slow
@pytest.mark.parametrize("task, names", [(PARTIAL, ["concat", "naive"]), (NONLINEAR, ["mlp", "naive"])])
def test_model_free_prop2_records_each_baseline_with_its_features_and_lambda(tmp_path, task, names):
    spec = tiny(task)
    run = tmp_path / "run"
    result = run_model_free(run, "prop2", spec, options=FAST)
    assert (run / "spec.yaml").is_file() and (run / "solver" / "prop2.json").is_file()
    assert (run / "solver" / "prop2_loss.png").is_file() and not (run / "checkpoints").exists()
    record = json.loads((run / "solver" / "prop2.json").read_text())
    assert record["model_free"] and record["step"] is None and record["train_steps"] == 30 and record["k"] == 2
    assert list(record["variants"]) == names and record["variants"] == result["variants"]
    assert list(record["history"]) == names[:1]  # as [C]: alpha/beta learned on the informative features, reused
    history = record["history"][names[0]]
    assert np.mean([loss for _, loss in history[-3:]]) < history[0][1]  # AdamW makes progress
    for name in names:
        v = record["variants"][name]
        assert (v["alpha"], v["beta"]) == (record["variants"][names[0]]["alpha"], record["variants"][names[0]]["beta"])
        assert v["lambda"] in v["lambda_grid"] and len(v["lambda_search_loss"]) == len(v["lambda_grid"])
        assert len(v["alpha"]) == 2 and len(v["beta"]) == 2
        assert v["window"] == (3 if v["features"] == "concat" else None)
        curve = record["per_position_loss"][v["curve"]]
        assert len(curve) == spec.task.seq_len and np.all(np.isfinite(curve))
        assert metrics.parse_metric(f"solver.prop2.{name}.t10").read(run).value == pytest.approx(curve[-1])
    assert not any(name.startswith("model") for name in record["per_position_loss"])
    from mesacli.train import train  # the model may be trained in the same run directory afterwards

    train(spec, run, progress=False)
    assert (run / "solver" / "prop2.json").is_file()
    if task is PARTIAL:  # and probed: the same baselines, next to the model
        probed = run_probe(run, ["prop2"], options=FAST).results["prop2"]
        assert probed["step"] == 6 and not probed["model_free"] and list(probed["variants"]) == names
        model = [name for name in probed["per_position_loss"] if name.startswith("model")]
        assert model == ["model (2 layers)"]
        assert set(probed["prediction_cosine"]) == set(probed["per_position_loss"]) - set(model)
        assert "concat (lam=" in solvers.headline(probed) and "| concat |" in "\n".join(solvers.summary(probed))


def test_model_free_runs_refuse_an_analysis_that_reads_the_model(tmp_path):
    with pytest.raises(MesaError, match="binding analyses a trained model"):
        run_model_free(tmp_path / "run", "binding", tiny(PARTIAL))
    with pytest.raises(MesaError, match="prop2_window must be an integer >= 1"):
        run_model_free(tmp_path / "run", "prop2", tiny(PARTIAL), options={"prop2_window": 0})


def test_prop2_authors_runs_the_prop2_solvers_unchanged_on_the_authors_sequences(tmp_path):
    spec = tiny(PARTIAL)
    run = tmp_path / "run"
    with pytest.raises(MesaError, match="prop2_authors evaluates the solvers of .*prop2.json, which is not there"):
        run_model_free(run, "prop2_authors", spec)
    made = run_model_free(run, "prop2", spec, options={**FAST, "prop2_lambda_search": False})
    theirs = run_model_free(run, "prop2_authors", spec)
    batches = tasks.authors_test_batches(spec.task)
    assert len(batches) == 5 and batches[0].obs_BTS.shape == (512, 10, 2)  # the partially observed task's 5 x 512
    assert theirs["model_free"] and theirs["k"] == 2 and theirs["variants"] == made["variants"]
    assert list(theirs["per_position_loss"]) == list(made["per_position_loss"])  # the same curves, by name
    for name, v in made["variants"].items():  # each baseline with prop2's features, alpha/beta and lambda
        preds = solvers.solver_predictions(batches, v["alpha"], v["beta"], v["lambda"], task=spec.task,
                                           features=v["features"], window=v["window"])
        want = solvers.loss_curve(preds, batches)
        np.testing.assert_allclose(theirs["per_position_loss"][v["curve"]], want, rtol=1e-6)
        assert not np.allclose(want, made["per_position_loss"][v["curve"]])  # other sequences than ours
        assert np.all(np.isfinite(theirs["per_position_loss"][v["ridge_curve"]]))
        read = metrics.parse_metric(f"solver.prop2_authors.{name}.t10").read(run)
        assert read.value == pytest.approx(want[-1], rel=1e-6)
    assert (run / "solver" / "prop2_authors_loss.png").stat().st_size > 1000
    from mesacli.probe import prop2_authors

    record = json.loads((run / "solver" / "prop2_authors.json").read_text())
    source = json.loads((run / "solver" / "prop2.json").read_text())
    assert prop2_authors.reads_current(record, source)
    source["variants"]["naive"]["lambda_search_loss"][0] *= 1 + 1e-7  # prop2 made again, the same solvers
    assert prop2_authors.reads_current(record, source)
    source["variants"]["naive"]["lambda"] = 0.5  # prop2 made again, other solvers: this record is not current
    assert not prop2_authors.reads_current(record, source) and not prop2_authors.reads_current(record, None)
    assert "authors' seqs: Prop-2 concat" in prop2_authors.headline(record)
    assert "| Prop-2 naive" in "\n".join(prop2_authors.summary(record))
    with pytest.raises(MesaError, match="the authors' test batches are transcribed for"):
        run_model_free(tmp_path / "other", "prop2_authors", tiny({"kind": "contracting"}))


LEDGER = """
specs:
  tiny: {step_seconds: 0.5, analyses: [eval, "solver:prop2", "solver:prop2_authors"], solver_seconds: 30,
         prop2_train_steps: 20}
entries:
  - {id: concat, figure: F, spec: tiny, metric: solver.prop2.concat.t10, paper: 0.1, priority: 1}
  - {id: naive, figure: F, spec: tiny, metric: solver.prop2.naive.t10, paper: 1.0, priority: 1}
  - {id: model, figure: F, spec: tiny, metric: eval.t10, paper: 0.1, priority: 1}
"""


def test_the_ledger_produces_model_free_entries_without_training(tmp_path):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "tiny.yaml").write_text(yaml.safe_dump(merge(TINY, {"task": PARTIAL, "train": {"steps": 4}})))
    (tmp_path / "ledger.yaml").write_text(LEDGER)
    ledger = load_ledger(tmp_path / "ledger.yaml", experiments)
    assert [e.trained_specs() for e in ledger.entries] == [[], [], ["tiny"]]
    results = tmp_path / "results"
    before = {s.entry.id: s for s in ledger_status(ledger, None, results, experiments)}
    assert before["concat"].state == "analysis pending" and before["concat"].cpu_left_s == 30  # not "missing"
    assert before["model"].state == "missing" and before["model"].cpu_left_s == 4 * 0.5 + 120
    report = reproduce_run(ledger, ["concat", "naive"], results_dir=results, experiments_dir=experiments,
                           progress=False, say=lambda _: None)
    assert [s.what for s in report.stages] == ["solver:prop2", "solver:prop2_authors"]  # once each, no training
    assert not (results / "tiny" / "checkpoints").exists()
    after = {s.entry.id: s for s in ledger_status(ledger, None, results, experiments)}
    assert after["concat"].state == "done" and after["naive"].state == "done" and after["model"].state == "missing"
    assert after["concat"].ours > 0 and after["concat"].ours_step is None and after["concat"].cpu_left_s == 0
    record = json.loads((results / "tiny" / "solver" / "prop2.json").read_text())
    assert record["variants"]["concat"]["window"] == 16 and record["train_steps"] == 20
    theirs = json.loads((results / "tiny" / "solver" / "prop2_authors.json").read_text())
    assert after["concat"].ours_authors == pytest.approx(metrics.variant_curve(theirs, "concat")[9])
    assert after["concat"].ours_authors != after["concat"].ours and after["model"].ours_authors is None
    text = write_report(list(after.values()), results).read_text()
    assert "| `concat` | tiny | solver.prop2.concat.t10 |" in text and "f-position.png" in text
    assert f"| {metrics.fmt_value(after['concat'].ours_authors)} |" in text and "--analysis prop2_authors" in text
    again = reproduce_run(ledger, None, results_dir=results, experiments_dir=experiments, progress=False,
                          say=lambda _: None)
    assert [s.what for s in again.stages] == ["train", "eval"]  # the solver record is current: not made again
    bad = LEDGER.replace('"solver:prop2"', '"solver:binding"')
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(MesaError,
                       match="solver:binding: only prop2, prop2_authors, prop2_best run without a trained model"):
        load_ledger(tmp_path / "bad.yaml", experiments)
