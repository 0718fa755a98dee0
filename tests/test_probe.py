"""mesacli probe: the pieces against independent references, and every analysis on a tiny trained run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mesacli import baselines, model, tasks
from mesacli.cli import app
from mesacli.errors import MesaError
from mesacli.probe import common, compress, linearize, linprobe, prop1, run_probe, sensitivity, solvers
from mesacli.spec import spec_from_dict

# A tiny constructed-token LSA-1 (n_s = 4, tokens [0, 0, s_t, s_{t-1}] of size 16).
TINY_LSA1 = {
    "name": "tiny_lsa1",
    "task": {"state_dim": 4, "obs_dim": 4, "seq_len": 8, "token_format": "constructed", "mask_slots": [0, 1]},
    "model": {"layers": 1, "attention": "linear", "num_heads": 2, "key_size": 4, "embed_dim": 16, "init_std": 0.1},
    "train": {"steps": 20, "batch_size": 16, "lr": 1e-2, "eval_batches": 2, "eval_every": 10,
              "checkpoint_every": 10, "log_every": 5},
}
FAST = {"prop2_train_steps": 40, "attention_sequences": 128, "interpolation_steps": 4, "distil_steps": 60,
        "distil_lr": 1e-2, "gd1_phi0_steps": 30,
        "prop2_k": 1, "prop2_lr": 0.3}  # prop2_lr: a peak lr for 40 steps of [C]'s warmup


def random_obs(seed=0, b=32, t=12, n=4):
    return np.random.default_rng(seed).uniform(-1, 1, size=(b, t + 1, n))


# ----------------------------------------------------------------------------- pure pieces


def test_gd1_closed_form_line_search_matches_a_brute_force_grid():
    s = random_obs()
    obs, tgt = s[:, :-1], s[:, 1:]
    eta = baselines.gd1_line_search(obs, tgt)
    grid = np.linspace(-0.5, 0.5, 20001)
    g = baselines.gd1_sequence_direction(obs)
    losses = [np.sum((tgt - e * g) ** 2) for e in grid]
    assert abs(grid[int(np.argmin(losses))] - eta) <= grid[1] - grid[0]
    assert np.sum((tgt - eta * g) ** 2) <= min(losses) + 1e-9


def test_gd1_direction_in_jax_matches_the_numpy_baseline():
    obs = random_obs(1)[:, :-1]
    np.testing.assert_allclose(np.asarray(prop1.gd1_direction_jax(jnp.asarray(obs, jnp.float32))),
                               baselines.gd1_sequence_direction(obs), rtol=1e-4, atol=1e-5)


def test_lstsq_probe_recovers_a_known_linear_map_and_uses_the_papers_mse():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6))
    w_true = rng.normal(size=(6, 3))
    w, mse = common.lstsq_probe(x, x @ w_true)
    np.testing.assert_allclose(w, w_true, atol=1e-10)
    assert mse < 1e-20
    y = x @ w_true + 0.1 * rng.normal(size=(300, 3))
    w, mse = common.lstsq_probe(x, y)
    w_ref = np.linalg.pinv(x) @ y
    np.testing.assert_allclose(w, w_ref, atol=1e-10)
    assert mse == pytest.approx(np.sum((x @ w_ref - y) ** 2) / (2 * 300), rel=1e-10)  # sum over dims / 2B
    assert np.abs(w - w_true).max() < 0.05
    assert common.r_squared(x @ w, y) > 0.9


def test_lstsq_probe_ignores_the_round_off_directions_of_a_float32_embedding():
    """A rank-10 float32 embedding in 40 dimensions carries 10 regressors, not 40: the probe must not fit the
    round-off (paper-spec 4.4 fits in float32); its MSE on an unrelated target is that of the 10-dim direct fit."""
    rng = np.random.default_rng(3)
    s = rng.uniform(-1, 1, size=(256, 10))
    embed = (s @ rng.normal(size=(10, 40))).astype(np.float32)  # rank 10 up to float32 round-off
    y = rng.normal(size=(256, 10))
    _, mse = common.lstsq_probe(embed, y)
    w_direct = np.linalg.lstsq(s, y, rcond=None)[0]
    direct = np.sum((s @ w_direct - y) ** 2) / (2 * 256)
    assert mse == pytest.approx(direct, rel=1e-4)
    w_all = np.linalg.lstsq(embed.astype(np.float64), y, rcond=None)[0]  # float64 precision: 40 regressors
    assert np.sum((embed @ w_all - y) ** 2) / (2 * 256) < 0.95 * direct


def test_zscore_rows_and_exact_preconditioned_input():
    norms = np.array([[1.0], [1.1], [0.9], [1.0], [1.05], [0.95], [1.0], [10.0]])
    assert common.zscore_keep(norms).tolist() == [True] * 7 + [False]
    obs = random_obs(3, b=2, t=6)[:, :-1]
    pre = common.preconditioned_exact(obs, lam=0.5)
    b, t = 1, 4
    s_before = obs[b, :t]  # s_1 .. s_{t} are the tokens before position t+1 (0-based t)
    direct = np.linalg.inv(s_before.T @ s_before + 0.5 * np.eye(4)) @ obs[b, t]
    np.testing.assert_allclose(pre[b, t], direct, rtol=1e-10)


def test_block_diag_means_and_offdiag():
    n = 3
    m = np.kron(np.array([[1.0, -2.0], [0.5, 0.0]]), np.eye(n))
    m[0, 1] = 0.25  # an off-diagonal entry inside block (0, 0)
    np.testing.assert_allclose(common.block_diag_means(m, n), [[1.0, -2.0], [0.5, 0.0]])
    np.testing.assert_allclose(common.block_offdiag_max(m, n), [[0.25, 0.0], [0.0, 0.0]])


def test_neumann_and_chebyshev_inverses_approach_the_exact_inverse():
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a = q @ np.diag([0.5, 0.8, 1.0, 1.5, 2.0]) @ q.T
    exact = np.linalg.inv(a)
    errors = [np.abs(solvers.neumann_inverse(a[None], k, xp=np)[0] - exact).max() for k in (2, 10, 200)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8
    # A is normalised by its Frobenius norm inside, so the scale of A does not matter
    scaled = solvers.neumann_inverse(100.0 * a[None], 200, xp=np)[0]
    np.testing.assert_allclose(scaled, exact / 100.0, atol=1e-10)


def orthogonal_sequences(seed=5, b=16, t=30, n=10):
    """Noise-free s_{t+1} = W s_t with a Haar-random orthogonal W per sequence (numpy, independent of tasks.py)."""
    rng = np.random.default_rng(seed)
    s = np.zeros((b, t + 1, n))
    for i in range(b):
        q, r = np.linalg.qr(rng.normal(size=(n, n)))
        w = q * np.sign(np.diag(r))
        s[i, 0] = rng.uniform(-1, 1, n)
        for j in range(t):
            s[i, j + 1] = w @ s[i, j] + 0.01 * rng.normal(size=n)
    return s[:, :-1], s[:, 1:]


def test_the_papers_chebyshev_coefficients_beat_six_neumann_steps():
    """The paper's learned 6-step alpha/beta approximate ridge LSQ better than 6 Neumann steps."""
    obs, tgt = orthogonal_sequences()
    ridge = np.mean(baselines.per_position_loss(baselines.ridge_predictions(obs), tgt))
    prev = np.concatenate([np.zeros_like(obs[:, :1]), obs[:, :-1]], axis=1)
    xx = np.cumsum(np.einsum("bti,btj->btij", prev, prev), axis=1) + 1e-3 * np.eye(10)
    yx = np.cumsum(np.einsum("bti,btj->btij", obs, prev), axis=1)
    loss = {}
    for name, (a, b) in {"neumann": ([1.0] * 6, [0.0] * 6), "paper": solvers.PAPER_CHEBYSHEV_LINEAR}.items():
        inv = solvers.chebyshev_inverse(xx, a, b, xp=np)
        pred = np.einsum("btij,btjk,btk->bti", yx, inv, obs)
        loss[name] = np.mean(baselines.per_position_loss(pred, tgt))
        got = solvers.prop2_predictions(jnp.asarray(obs, jnp.float32), a, b, current_pair=True)  # pairs t' <= t
        np.testing.assert_allclose(np.asarray(got), pred, rtol=2e-2, atol=2e-3)
    assert ridge < loss["paper"] < 0.9 * loss["neumann"]


def test_chebyshev_probe_target_approximates_the_exact_one():
    obs, _ = orthogonal_sequences(seed=7, b=8)
    exact = linprobe.preconditioned_inputs(obs, 1e-3, "exact")
    cheb = linprobe.preconditioned_inputs(obs, 1e-3, "chebyshev")
    neumann = solvers.chebyshev_preconditioned(obs, 1e-3, [1.0] * 6, [0.0] * 6)
    late = slice(20, None)  # once S_{t-1} S_{t-1}^T is well conditioned

    def err(x):
        return np.linalg.norm(x[:, late] - exact[:, late]) / np.linalg.norm(exact[:, late])

    assert err(cheb) < 0.9 * err(neumann)  # 6 steps are far from exact, but better than Neumann
    with pytest.raises(MesaError, match="unknown preconditioner"):
        linprobe.preconditioned_inputs(obs, 1e-3, "cg")


# ----------------------------------------------------------------------------- Proposition 1 by construction


def prop1_weights(spec, etas=(0.03, 0.02), qk_scales=(0.5, -0.25)):
    """Paper-spec 4.1: per head, W_q W_k^T = c I in (query s_t slot 2, key s_{t-1} slot 3) and W_v P = (eta/c) I
    from the value slot 2 to output slot 0; the heads' etas add up."""
    n, e = spec.task.obs_dim, spec.model.embed_dim
    h = len(etas)
    w_q, w_k = np.zeros((e, h, n)), np.zeros((e, h, n))
    w_v, w_o = np.zeros((e, h, n)), np.zeros((h, n, e))
    for i, (eta, c) in enumerate(zip(etas, qk_scales, strict=True)):
        w_q[2 * n:3 * n, i] = c * np.eye(n)
        w_k[3 * n:4 * n, i] = np.eye(n)
        w_v[2 * n:3 * n, i] = np.eye(n)
        w_o[i, :, :n] = (eta / c) * np.eye(n)
    block = {k: jnp.asarray(v, jnp.float32) for k, v in {"w_q": w_q, "w_k": w_k, "w_v": w_v, "w_o": w_o}.items()}
    return {"blocks": [block]}


def test_eta_eff_of_hand_built_prop1_weights_and_gd1_equivalence():
    spec = spec_from_dict({**TINY_LSA1, "model": {**TINY_LSA1["model"], "key_size": 4}})
    params = prop1_weights(spec)
    qk, vp = common.token_space_products(params, spec)
    eta_eff, heads = prop1.effective_eta(qk, prop1.readout_map(params, spec, vp), spec)
    assert eta_eff == pytest.approx(0.05, rel=1e-6)
    assert [h["product"] for h in heads] == pytest.approx([0.03, 0.02], rel=1e-6)
    batch = tasks.sample_batch(jax.random.PRNGKey(1), spec, 16)
    pred, _ = model.apply(params, batch.tokens_BTI, spec)
    gd = baselines.gd1_predictions(np.asarray(batch.obs_BTS), 0.05)
    np.testing.assert_allclose(np.asarray(pred), gd, rtol=1e-4, atol=1e-6)
    assert common.cosine(np.asarray(pred), gd)[:, 1:].min() > 1 - 1e-5  # t = 1 predicts 0 (s_0 = 0)
    cos = prop1.sensitivity_cosines(*prop1.model_sensitivities(params, spec, batch.obs_BTS[:4]))
    assert cos["current_token"][1:].min() > 1 - 1e-5 and cos["context"][1:].min() > 1 - 1e-5


def test_prop2_prediction_cosines_single_out_the_solver_a_model_implements():
    """A hand-built Prop-1 model is GD-1: cosine 1 against GD-1's predictions on the test batches, clearly below 1
    against exact ridge LSQ; the cosine of a solver with itself is 1 (t >= 2; every solver predicts 0 at t = 1)."""
    spec = spec_from_dict({**TINY_LSA1, "model": {**TINY_LSA1["model"], "key_size": 4}})
    batches = common.test_batches(spec)
    model_preds = solvers.model_predictions(prop1_weights(spec), spec, batches)
    assert len(model_preds) == spec.train.eval_batches and model_preds[0].shape == (16, 8, 4)
    gd = [baselines.gd1_predictions(np.asarray(b.obs_BTS), 0.7) for b in batches]  # eta does not change a cosine
    ridge = [baselines.ridge_predictions(np.asarray(b.obs_BTS), 1e-3) for b in batches]
    cos_gd, cos_ridge = solvers.prediction_cosines(model_preds, gd), solvers.prediction_cosines(model_preds, ridge)
    assert cos_gd.shape == (8,) and cos_gd[1:].min() > 1 - 1e-5
    assert cos_ridge[1:].mean() < 0.99
    np.testing.assert_allclose(solvers.prediction_cosines(ridge, ridge)[1:], 1.0, atol=1e-9)  # t = 1: both 0
    # the loss curve of the k-step solver from its predictions equals the direct evaluation
    preds = solvers.solver_predictions(batches, [1.0], [0.0])
    np.testing.assert_allclose(solvers.loss_curve(preds, batches),
                               np.mean([np.asarray(tasks.per_position_loss(jnp.asarray(p), b.targets_BTS))
                                        for p, b in zip(preds, batches, strict=True)], axis=0), rtol=1e-5)


def test_gd1_with_phi0_zero_is_gd1_and_learning_phi0_helps(probed):
    obs = random_obs(8)[:, :-1]
    np.testing.assert_allclose(np.asarray(prop1.gd1_phi0_predictions(jnp.asarray(obs, jnp.float32), 0.1,
                                                                     jnp.zeros((4, 4)))),
                               baselines.gd1_predictions(obs, 0.1), rtol=1e-4, atol=1e-6)
    phi0 = probed.results["prop1"]["gd1_learned_phi0"]
    assert phi0["steps"] == 30 and len(phi0["per_position_loss"]) == 8
    # with one teacher W* shared by all sequences, Phi_0 -> W* is learnable and beats Phi_0 = 0 by far
    spec = spec_from_dict({**TINY_LSA1, "task": {**TINY_LSA1["task"], "kind": "fixed_teacher"}})
    eta, phi, _ = prop1.learn_gd1_phi0(spec, 0.0, steps=150, lr=3e-2, batch_size=32)
    batch = tasks.sample_batch(jax.random.PRNGKey(3), spec, 64)
    obs, tgt = np.asarray(batch.obs_BTS), np.asarray(batch.targets_BTS)
    gd_loss = np.mean(baselines.per_position_loss(baselines.gd1_predictions(obs, baselines.gd1_line_search(obs, tgt)),
                                                  tgt))
    phi_pred = np.asarray(prop1.gd1_phi0_predictions(batch.obs_BTS, eta, jnp.asarray(phi, jnp.float32)))
    assert np.mean(baselines.per_position_loss(phi_pred, tgt)) < 0.5 * gd_loss


def test_prop1_refuses_other_models():
    with pytest.raises(MesaError, match="prop1 needs a 1-layer linear-attention model on constructed tokens"):
        prop1.check_applicable(spec_from_dict({**TINY_LSA1, "model": {**TINY_LSA1["model"], "layers": 2}}))
    with pytest.raises(MesaError, match="softmax"):
        prop1.check_applicable(spec_from_dict({**TINY_LSA1, "model": {**TINY_LSA1["model"], "attention": "softmax"}}))


# ----------------------------------------------------------------------------- every analysis on a tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mesacli.train import train

    run_dir = tmp_path_factory.mktemp("probe") / "run"
    train(spec_from_dict(TINY_LSA1), run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def probed(tiny_run):
    return run_probe(tiny_run, None, seeds=2, batch_size=64, options=FAST)


def test_probe_writes_every_analysis(probed, tiny_run):
    out = tiny_run / "probe"
    for name in probed.results:
        assert (out / f"{name}.json").exists()
    for png in ("prop1_loss.png", "prop1_cosine.png", "prop1_weights.png", "probes_depth.png",
                "binding_token_probe.png", "binding_attention.png", "sensitivity.png", "prop2_loss.png",
                "prop2_best_loss.png", "compress_loss.png", "compress_interpolation.png", "linearize_distillation.png"):
        assert (out / png).stat().st_size > 1000, png
    text = (out / "summary.md").read_text()
    assert "Proposition 1" in text and "0.032" in text and "Linear probes" in text
    assert not probed.skipped


def test_every_registered_analysis_owns_its_summary_section_and_headline(probed, tiny_run):
    """Each analysis module has the registry's interface, and its section of summary.md and its headline in
    the probe table are built from its own JSON (one file and one registry line per analysis)."""
    from mesacli.probe import registry

    text = (tiny_run / "probe" / "summary.md").read_text()
    assert list(probed.results) == list(registry.ANALYSES)  # every analysis ran, in registry order
    for name, result in probed.results.items():
        analysis = registry.module(name)
        assert analysis.TITLE and analysis.DESCRIPTION and callable(analysis.run)
        section = analysis.summary(result)
        assert section and all(isinstance(line, str) for line in section)
        assert f"## {analysis.TITLE} (`{name}`, step {result['step']})" in text
        assert "\n".join(section) in text
        line = registry.headline(name, result)
        assert isinstance(line, str) and line and "\n" not in line
    prop1 = probed.results["prop1"]
    expected = f"eta_eff {prop1['eta_eff']:.4f} vs line-searched {prop1['gd1_eta']:.4f}"
    assert expected in registry.headline("prop1", prop1)


def test_prop1_on_the_tiny_run_agrees_with_the_eval_path(probed, tiny_run):
    from mesacli.evaluate import make_evaluator
    from mesacli.sharding import make_mesh
    from mesacli.state import load_params

    r = probed.results["prop1"]
    spec, params, _ = load_params(tiny_run)
    curves, eta = baselines.baseline_curves(spec)
    assert r["gd1_eta"] == pytest.approx(eta, rel=1e-9)
    gd_curve = next(iter(curves.values()))
    assert r["seq_avg_loss"]["gd1"] == pytest.approx(float(np.mean(gd_curve)), rel=1e-9)
    assert r["seq_avg_loss"]["model"] == pytest.approx(float(np.mean(make_evaluator(spec, make_mesh())(params))),
                                                       rel=1e-5)
    qk, vp = common.token_space_products(params, spec)
    # eta_eff recomputed from raw einsums over the trained weights
    block = params["blocks"][0]
    n = spec.task.obs_dim
    wq, wk, wv, wo = (np.asarray(block[k], np.float64) for k in ("w_q", "w_k", "w_v", "w_o"))
    manual = sum(np.trace(wq[2 * n:3 * n, h] @ wk[3 * n:, h].T) / n * np.trace(wv[2 * n:3 * n, h] @ wo[h][:, :n]) / n
                 for h in range(wq.shape[1]))
    assert r["eta_eff"] == pytest.approx(manual, rel=1e-6)


def test_probes_on_the_tiny_run(probed):
    r = probed.results["probes"]
    current = np.asarray(r["mse"][linprobe.TARGETS[2]])  # [L+1, T]
    assert current[0].max() < 1e-12  # s_t sits in the input token: an exact linear read-out
    nxt = np.asarray(r["mse"][linprobe.TARGETS[0]])
    assert nxt.shape == (2, 8) and np.all(nxt >= 0)
    assert len(r["control_mse"]) == 8
    assert r["precond"] == "chebyshev"  # by default the paper's target (its learned Chebyshev inverse)


def test_binding_on_the_tiny_run(probed):
    r = probed.results["binding"]
    assert r["t_prime"] == list(range(1, 9)) and r["position"] == 8
    # layer 1 keeps s_t and s_{t-1} in slots 2 and 3 of its residual stream (no clipping): R^2 = 1
    assert r["token_probe_r2"][-1] == pytest.approx(1.0, abs=1e-6)
    assert r["token_probe_r2"][-2] == pytest.approx(1.0, abs=1e-6)
    assert max(r["token_probe_r2"][:-2]) < 0.999
    assert np.asarray(r["attention_map"]).shape == (2, 8, 8)
    assert np.triu(np.asarray(r["attention_map"])[0], k=1).max() == 0  # causal


def test_layer1_sensitivity_of_an_identity_layer_and_causality():
    """Zero attention weights: the layer-1 output is the token itself, so with tokens [0, 0, s_t, s_{t-1}] it moves
    with s_t and s_{t-1} only, each by ||I||_F = sqrt(n); with raw tokens and an input projection W, by ||W||_F."""
    spec = spec_from_dict(TINY_LSA1)
    params = jax.tree_util.tree_map(jnp.zeros_like, model.init(jax.random.PRNGKey(0), spec))
    obs = tasks.sample_batch(jax.random.PRNGKey(1), spec, 6).obs_BTS
    at = sensitivity.positions(8)
    assert at == [2, 4, 8]
    sens = sensitivity.layer1_sensitivity(params, spec, obs, at)
    expected = np.zeros((3, 8))
    for i, t in enumerate(at):
        expected[i, t - 1] = expected[i, t - 2] = 2.0  # sqrt(n_s = 4)
    np.testing.assert_allclose(sens, expected, atol=1e-6)
    raw = spec_from_dict({"task": {"state_dim": 4, "obs_dim": 4, "seq_len": 8, "token_format": "raw"},
                          "model": {"layers": 2, "attention": "softmax", "first_layer": "softmax_pe", "num_heads": 2,
                                    "key_size": 4, "embed_dim": 8, "input_proj": True, "output_proj": True,
                                    "init_std": 0.5}})
    params = model.init(jax.random.PRNGKey(2), raw)
    sens = sensitivity.layer1_sensitivity(params, raw, tasks.sample_batch(jax.random.PRNGKey(3), raw, 6).obs_BTS, at)
    for i, t in enumerate(at):
        assert np.all(sens[i, t:] == 0) and sens[i, :t].min() > 0  # causal; softmax attention mixes every t' <= t
    zero_attn = jax.tree_util.tree_map(jnp.zeros_like, params)
    zero_attn["input_proj"] = params["input_proj"]
    sens = sensitivity.layer1_sensitivity(zero_attn, raw, obs, at)
    norm = float(np.linalg.norm(np.asarray(params["input_proj"])))
    np.testing.assert_allclose(sens[np.arange(3), np.asarray(at) - 1], norm, rtol=1e-5)
    assert np.abs(sens).sum() == pytest.approx(3 * norm, rel=1e-5)


def test_sensitivity_on_the_tiny_run_reads_every_kept_checkpoint(probed):
    r = probed.results["sensitivity"]
    assert r["checkpoints"] == [10, 20] and r["positions"] == [2, 4, 8]  # checkpoint_every 10, 20 steps
    sens = np.asarray(r["sensitivity"])
    assert sens.shape == (2, 3, 8) and np.all(sens[:, 0, 2:] == 0) and np.all(sens[:, 1, 4:] == 0)
    assert r["final"]["8"]["s_t"] == pytest.approx(sens[-1, 2, 7]) and r["final"]["8"]["s_t"] > 0


def test_prop2_on_the_tiny_run(probed):
    r = probed.results["prop2"]
    losses = r["seq_avg_loss"]
    floor = losses["exact ridge LSQ (lam=0.001)"]
    assert all(v >= floor - 1e-6 for v in losses.values())
    assert r["k"] == 1 and len(r["learned"]["chebyshev"]["alpha"]) == 1  # k set in FAST (default: layers - 1)
    cosines = r["prediction_cosine"]
    assert set(cosines) == set(losses) - {"model (1 layer)"} and r["gd1_eta"] > 0
    assert all(-1 <= c["mean"] <= 1 and len(c["per_position"]) == 8 for c in cosines.values())
    for history in r["history"].values():  # Adam on the solver's next-token loss makes progress
        assert np.mean([loss for _, loss in history[-2:]]) < history[0][1]


def test_prop2_authors_on_the_tiny_run_agrees_with_eval_on_the_authors_sequences(probed, tiny_run):
    from mesacli.evaluate import evaluate_run

    r, made = probed.results["prop2_authors"], probed.results["prop2"]
    assert r["step"] == 20 and r["prop2"]["learned"] == made["learned"] and r["sequences_per_batch"] == 256
    assert list(r["per_position_loss"]) == list(made["per_position_loss"])  # the model and prop2's solvers
    theirs = evaluate_run(tiny_run, test_set="authors").curves  # another path: the evaluator, eval's baselines
    model = r["per_position_loss"]["model (1 layer)"]
    np.testing.assert_allclose(model, next(iter(theirs.values())), rtol=1e-5)
    gd1 = next(name for name in theirs if name.startswith("GD-1"))  # "GD-1 (eta=0.1713)"
    ours_gd1 = next(name for name in r["per_position_loss"] if name.startswith(gd1[:-1]))  # the same eta
    np.testing.assert_allclose(r["per_position_loss"][ours_gd1], theirs[gd1], rtol=1e-5)
    assert not np.allclose(model, made["per_position_loss"]["model (1 layer)"])  # not our test batches


def test_probes_authors_fits_the_same_probes_on_the_authors_batches(probed, tiny_run):
    from mesacli.state import load_params

    r, ours = probed.results["probes_authors"], probed.results["probes"]
    assert r["data"] == {"authors_seeds": [1, 11], "sequences_per_seed": 64} and r["seeds"] == 2  # --seeds 2
    assert (r["precond"], r["precond_coefficients"], r["layers"]) == (ours["precond"], ours["precond_coefficients"],
                                                                      ours["layers"])
    spec, params, _ = load_params(tiny_run)
    errors = []
    for seed in (1, 11):  # the probes fitted directly on the authors' batches of these seeds
        batch = tasks.authors_test_batch(spec.task, seed, 64)
        obs = np.asarray(batch.obs_BTS, np.float64)
        residual = np.asarray(model.apply(params, batch.tokens_BTI, spec)[1]["residual_LBTE"], np.float64)
        errors.append(linprobe.probe_errors(residual, obs, np.asarray(batch.targets_BTS, np.float64),
                                            linprobe.preconditioned_inputs(obs, 1e-3, r["precond"], "constructed"))[0])
    for i, name in enumerate(r["targets"]):
        np.testing.assert_allclose(r["mse"][name], np.mean(errors, axis=0)[i], rtol=1e-6, atol=1e-9)
    assert not np.allclose(r["mse"][r["targets"][0]], ours["mse"][ours["targets"][0]])  # not our probe batches
    assert (tiny_run / "probe" / "probes_authors_depth.png").stat().st_size > 1000


def test_compress_on_the_tiny_run(probed, tiny_run):
    from mesacli.state import load_params

    r = probed.results["compress"]
    spec, params, _ = load_params(tiny_run)
    batch = common.test_batches(spec)[0]
    pred, _ = model.apply(params, batch.tokens_BTI, spec)
    prods = compress.products(params)
    np.testing.assert_allclose(np.asarray(compress.apply_products(prods, batch.tokens_BTI, spec)), np.asarray(pred),
                               rtol=1e-4, atol=1e-6)  # the product form is the model
    assert len(r["scalars"]) == 1 and np.asarray(r["scalars"][0]["qk"]).shape == (2, 4, 4)
    assert r["seq_avg_loss"]["model (product form)"] == pytest.approx(probed.results["prop1"]["seq_avg_loss"]["model"],
                                                                      rel=1e-4)
    # 1 layer: the compressed model is GD-1 with eta_eff (up to the s_{t-1} -> output blocks it also keeps)
    assert r["eta_eff"] == pytest.approx(probed.results["prop1"]["eta_eff"], rel=1e-6)
    assert [row["step"] for row in r["interpolation"]] == [0, 1, 2, 3, 4]


def test_linearize_on_the_tiny_run(probed, tiny_run):
    from mesacli.state import load_params

    r = probed.results["linearize"]
    row = r["per_layer"][0]
    assert row["distil_mse_last"] < 0.5 * row["distil_mse_first"]  # the distillation learns
    assert r["original_loss"] == pytest.approx(probed.results["prop1"]["seq_avg_loss"]["model"], rel=1e-4)
    spec, params, _ = load_params(tiny_run)
    batch = common.test_batches(spec)[0]
    np.testing.assert_allclose(np.asarray(linearize.apply_with_kinds(params, batch.tokens_BTI, spec, ("linear",))),
                               np.asarray(model.apply(params, batch.tokens_BTI, spec)[0]), rtol=1e-6)
    # a linear layer replaced by itself (the original weights, no training) leaves the loss unchanged
    repl, _ = linearize.distil_layer(params, spec, 0, steps=1, lr=0.0, init="original")
    same = linearize.swap_in(params, repl, 0)
    np.testing.assert_allclose(np.asarray(model.apply(same, batch.tokens_BTI, spec)[0]),
                               np.asarray(model.apply(params, batch.tokens_BTI, spec)[0]), rtol=1e-6)


def test_the_linear_replacement_of_a_softmax_pe_layer_keeps_its_positional_query_key_inputs():
    """[C] linearises the first (PE) layer as linear attention on the same [e_t; PE_t] query/key inputs."""
    from conftest import TINY, merge

    from mesacli.layers import linear_attention, sinusoidal_encoding

    spec = spec_from_dict(merge(TINY, {"model": {"first_layer": "softmax_pe", "attention": "softmax"}}))
    params = model.init(jax.random.PRNGKey(0), spec)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, spec.task.seq_len, spec.model.embed_dim))
    block = params["blocks"][0]
    assert block["w_q"].shape[0] == 2 * spec.model.embed_dim
    out, _ = model.attention_block(block, x, spec, "linear_pe", qk_norm=False)
    qk_in = jnp.concatenate([x, jnp.broadcast_to(sinusoidal_encoding(x.shape[1], x.shape[2]), x.shape)], -1)
    q, k = (jnp.einsum("bte,ehd->bthd", qk_in, block[w]) for w in ("w_q", "w_k"))
    v = jnp.einsum("bte,ehd->bthd", x, block["w_v"])
    by_hand = jnp.einsum("bthd,hde->bte", linear_attention(q, k, v)[0], block["w_o"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(by_hand), rtol=1e-5, atol=1e-7)
    assert linearize.replacement_kind("softmax_pe") == "linear_pe" and linearize.replacement_kind("softmax") == "linear"
    repl, history = linearize.distil_layer(params, spec, 0, steps=2, batch_size=4)
    assert repl["w_q"].shape == block["w_q"].shape and np.isfinite(history[-1][1])


def test_compressing_block_scalar_weights_is_the_identity():
    rng = np.random.default_rng(6)
    n, heads = 3, 2
    prods = [tuple(np.einsum("hij,ab->hiajb", rng.normal(size=(heads, 4, 4)), np.eye(n)).reshape(heads, 4 * n, 4 * n)
                   for _ in range(2))]
    compressed, scalars = compress.compress_products(prods, n)
    for (q, v), (cq, cv) in zip(prods, compressed, strict=True):
        np.testing.assert_allclose(cq, q, atol=1e-12)
        np.testing.assert_allclose(cv, v, atol=1e-12)
    generic = [(rng.normal(size=(heads, 4 * n, 4 * n)), rng.normal(size=(heads, 4 * n, 4 * n)))]
    twice = compress.compress_products(compress.compress_products(generic, n)[0], n)[0]
    once = compress.compress_products(generic, n)[0]
    np.testing.assert_allclose(twice[0][0], once[0][0], atol=1e-12)  # a projection
    assert np.abs(once[0][0] - generic[0][0]).max() > 0.1


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output


def test_cli_probe_end_to_end(tiny_run):
    result = runner.invoke(app, ["probe", str(tiny_run), "--analysis", "binding", "--seeds", "1",
                                 "--batch-size", "32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "binding" in result.output and "R^2" in result.output
    data = json.loads((tiny_run / "probe" / "binding.json").read_text())
    assert data["step"] == 20 and len(data["token_probe_r2"]) == 8


def test_cli_probe_bad_input(tmp_path, tiny_run):
    assert_one_line_error(runner.invoke(app, ["probe", str(tmp_path)]), "not a mesacli run directory")
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "spec.yaml").write_text(yaml.safe_dump(TINY_LSA1))
    assert_one_line_error(runner.invoke(app, ["probe", str(no_ckpt), "-a", "probes"]), "no checkpoint found")
    softmax = tmp_path / "softmax"
    softmax.mkdir()
    (softmax / "spec.yaml").write_text(yaml.safe_dump({**TINY_LSA1, "model": {**TINY_LSA1["model"],
                                                                              "attention": "softmax"}}))
    assert_one_line_error(runner.invoke(app, ["probe", str(softmax), "-a", "prop1"]),
                          "prop1 needs a 1-layer linear-attention model on constructed tokens")
    assert_one_line_error(runner.invoke(app, ["probe", str(tiny_run), "-a", "prop3"]), "unknown analysis 'prop3'")
    assert_one_line_error(runner.invoke(app, ["probe", str(tiny_run), "--seeds", "0"]), "--seeds")


@pytest.mark.slow
def test_probe_analyses_every_replica_of_a_multi_seed_run(tmp_path):
    from mesacli.train import train

    spec = spec_from_dict({**TINY_LSA1, "train": {**TINY_LSA1["train"], "seeds": 2, "seed": 3}})
    train(spec, tmp_path / "run", progress=False)
    result = run_probe(tmp_path / "run", ["prop1"], seeds=1, batch_size=32)
    assert sorted(result.per_replica) == [3, 4]
    etas = [result.per_replica[s]["prop1"]["eta_eff"] for s in (3, 4)]
    for seed in (3, 4):
        assert (tmp_path / "run" / "probe" / f"seed{seed}" / "prop1.json").exists()
        assert (tmp_path / "run" / "probe" / f"seed{seed}" / "summary.md").exists()
    assert etas[0] != etas[1]  # two different models
