"""Proposition 1: a one-layer linear self-attention model against one step of mesa-gradient descent.

GD-1 (paper-spec 4.1): s^_{t+1} = eta sum_{t'<=t} s_{t'} s_{t'-1}^T s_t (Phi_0 = 0, s_0 = 0, current pair
included), eta line-searched in closed form on separate batches (mesacli.baselines).  The model sees
constructed tokens e_t = [0, s_t, s_t, s_{t-1}] (masked slots zeroed).  The query s_t / key s_{t'-1}
block of W_q W_k^T times the value s_{t'} -> slot-0 block of W_v P gives, per head, a scalar multiple
of the GD-1 update, so eta_eff = sum_h mean-diag(QK block) * mean-diag(VP block), summed over the
unmasked slots carrying s_t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mesacli import baselines, model, tasks
from mesacli.errors import MesaError
from mesacli.probe.common import (
    SLOT_NAMES,
    RunContext,
    block_diag_means,
    block_offdiag_max,
    cosine,
    fit_on_fresh_batches,
    fmt,
    probe_batch,
    test_batches,
    token_space_products,
)
from mesacli.spec import Spec

TITLE = "Proposition 1: one step of mesa-gradient descent"
DESCRIPTION = "Prop. 1: 1-layer LSA vs one step of mesa-GD (GD-1), eta_eff from the weights"


def check_applicable(spec: Spec) -> None:
    m = spec.model
    ok = (m.layers == 1 and m.layer_kinds() == ("linear",) and spec.task.token_format == "constructed"
          and not m.mlp and not m.layer_norm)
    if not ok:
        what = (f"{m.layers}-layer {'/'.join(sorted(set(m.layer_kinds())))}-attention model on "
                f"{spec.task.token_format} tokens" + (" with an MLP" if m.mlp else "")
                + (" with LayerNorm" if m.layer_norm else ""))
        raise MesaError(f"prop1 needs a 1-layer linear-attention model on constructed tokens; this run is a {what}")


def gd1_direction_jax(obs_BTS: jax.Array) -> jax.Array:
    """g_t = sum_{t'<=t} s_{t'} s_{t'-1}^T s_t (as baselines.gd1_sequence_direction, differentiable)."""
    prev = jnp.pad(obs_BTS, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    scores_BTT = jnp.tril(jnp.einsum("bti,bsi->bts", obs_BTS, prev))
    return jnp.einsum("bts,bsi->bti", scores_BTT, obs_BTS)


def gd1_phi0_predictions(obs_BTS: jax.Array, eta, phi_SS) -> jax.Array:
    """One mesa-GD step from a learned Phi_0 (paper-spec 4.1):
    s^_{t+1} = Phi_0 s_t + eta sum_{t'<=t} (s_{t'} - Phi_0 s_{t'-1}) s_{t'-1}^T s_t."""
    prev = jnp.pad(obs_BTS, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    scores_BTT = jnp.tril(jnp.einsum("bti,bsi->bts", obs_BTS, prev))
    resid = obs_BTS - prev @ phi_SS.T
    return obs_BTS @ phi_SS.T + eta * jnp.einsum("bts,bsi->bti", scores_BTT, resid)


def learn_gd1_phi0(spec: Spec, eta0: float, steps: int, lr: float = 1e-3, batch_size: int = 128):
    """Adam on the next-token loss of GD-1 with a learned (eta, Phi_0), from (eta0, 0); fresh batches from
    fold_in(PRNGKey(train.seed + 4242), step). Returns (eta, Phi_0, [(step, loss)])."""
    import optax

    n = spec.task.obs_dim
    params = {"eta": jnp.asarray(eta0, jnp.float32), "phi": jnp.zeros((n, n), jnp.float32)}
    key = jax.random.PRNGKey(spec.train.seed + 4242)

    def loss_fn(p, batch):
        return tasks.sequence_loss(gd1_phi0_predictions(batch.obs_BTS, p["eta"], p["phi"]), batch.targets_BTS)

    params, history = fit_on_fresh_batches(params, optax.adam(lr), loss_fn, spec, key, steps=steps,
                                           batch_size=batch_size, log_every=max(1, steps // 20))
    return float(params["eta"]), np.asarray(params["phi"], np.float64), history


def prediction_slots(spec: Spec) -> dict[str, list[int]]:
    """Unmasked constructed-token slots that carry s_t (query / value side) and s_{t-1} (key side)."""
    masked = set(spec.task.mask_slots)
    return {"s_t": [i for i in (1, 2) if i not in masked], "s_prev": [i for i in (3,) if i not in masked]}


def readout_map(params, spec: Spec, vp_HIE: np.ndarray) -> np.ndarray:
    """The token-space value -> prediction map of every head: [H, I, n_s] (slot 0, or through output_proj)."""
    if spec.model.output_proj:
        return np.einsum("hie,es->his", vp_HIE, np.asarray(params["output_proj"], np.float64))
    return vp_HIE[..., : spec.task.obs_dim]


def effective_eta(qk_HII: np.ndarray, vp_out_HIS: np.ndarray, spec: Spec) -> tuple[float, list[dict]]:
    """eta_eff = sum_h [sum_{i in s_t slots} md(QK_h[i, s_{t-1}])] [sum_{j in s_t slots} md(VP_h[j -> pred])]."""
    n = spec.task.obs_dim
    slots = prediction_slots(spec)
    qk_means = block_diag_means(qk_HII, n)  # [H, 4, 4]
    vp_means = block_diag_means(vp_out_HIS, n)  # [H, 4, 1]
    heads, eta = [], 0.0
    for h in range(qk_HII.shape[0]):
        a = float(sum(qk_means[h, i, j] for i in slots["s_t"] for j in slots["s_prev"]))
        b = float(sum(vp_means[h, j, 0] for j in slots["s_t"]))
        heads.append({"head": h, "qk_block": a, "vp_block": b, "product": a * b})
        eta += a * b
    return eta, heads


def model_sensitivities(params, spec: Spec, obs_BTS: jax.Array):
    """Jacobians d f_t / d s_{t'} of the model and of GD-1 (eta = 1): two arrays [B, T, S, T, S]."""

    def model_fn(obs_TS):
        pred, _ = model.apply(params, tasks.make_tokens(spec.task, obs_TS[None]), spec)
        return pred[0]

    def gd_fn(obs_TS):
        return gd1_direction_jax(obs_TS[None])[0]

    jac = jax.jit(jax.vmap(jax.jacrev(model_fn)))
    jac_gd = jax.jit(jax.vmap(jax.jacrev(gd_fn)))
    return np.asarray(jac(obs_BTS)), np.asarray(jac_gd(obs_BTS))


def sensitivity_cosines(jac_model: np.ndarray, jac_gd: np.ndarray) -> dict[str, np.ndarray]:
    """Per position t: mean over sequences of cos(J_model, J_GD) for d f_t/d s_t and for d f_t/d s_{1..t}."""
    b, t, s = jac_model.shape[:3]
    idx = np.arange(t)
    own_m = jac_model[:, idx, :, idx, :].transpose(1, 0, 2, 3).reshape(b, t, s * s)
    own_g = jac_gd[:, idx, :, idx, :].transpose(1, 0, 2, 3).reshape(b, t, s * s)
    ctx_m = jac_model.reshape(b, t, s * t * s)
    ctx_g = jac_gd.reshape(b, t, s * t * s)
    return {"current_token": cosine(own_m, own_g).mean(axis=0), "context": cosine(ctx_m, ctx_g).mean(axis=0)}


def run(ctx: RunContext) -> dict:
    """Model vs GD-1: losses, prediction / sensitivity cosines, weight products and eta_eff."""
    from mesacli.probe import figures

    spec, params = ctx.spec, ctx.params
    check_applicable(spec)
    ctx.say("prop1: GD-1 line search and test losses")
    apply = jax.jit(lambda p, x: model.apply(p, x, spec)[0])
    search = test_batches(spec, seed_offset=1)  # as mesacli.baselines.baseline_curves
    eta = baselines.gd1_line_search(np.concatenate([np.asarray(b.obs_BTS) for b in search]),
                                    np.concatenate([np.asarray(b.targets_BTS) for b in search]))
    curves = {"model": [], "gd1": [], "ridge": []}
    for b in test_batches(spec):
        obs, tgt = np.asarray(b.obs_BTS), np.asarray(b.targets_BTS)
        curves["model"].append(baselines.per_position_loss(np.asarray(apply(params, b.tokens_BTI)), tgt))
        curves["gd1"].append(baselines.per_position_loss(baselines.gd1_predictions(obs, eta), tgt))
        curves["ridge"].append(baselines.per_position_loss(baselines.ridge_predictions(obs), tgt))
    model_curve, gd_curve, ridge_curve = (np.mean(curves[k], axis=0) for k in ("model", "gd1", "ridge"))
    phi0_steps = int(ctx.options.get("gd1_phi0_steps", 0))
    phi0 = None
    if phi0_steps > 0:
        ctx.say(f"prop1: learning GD-1's Phi_0 and eta ({phi0_steps} Adam steps)")
        eta_phi, phi, history = learn_gd1_phi0(spec, eta, phi0_steps)
        phi_fn = jax.jit(lambda obs: gd1_phi0_predictions(obs, eta_phi, jnp.asarray(phi, jnp.float32)))
        phi_curve = np.mean([baselines.per_position_loss(np.asarray(phi_fn(b.obs_BTS)), np.asarray(b.targets_BTS))
                             for b in test_batches(spec)], axis=0)
        phi0 = {"eta": eta_phi, "phi0_diag_mean": float(np.trace(phi) / phi.shape[0]),
                "phi0_fro": float(np.linalg.norm(phi)), "history": history, "seq_avg_loss": float(np.mean(phi_curve)),
                "per_position_loss": phi_curve.tolist(), "steps": phi0_steps}

    ctx.say("prop1: prediction cosines and input sensitivities")
    pred_cos, sens = [], {"current_token": [], "context": []}
    for seed in range(ctx.seeds):
        batch = probe_batch(spec, seed, ctx.batch_size)
        obs = np.asarray(batch.obs_BTS)
        pred = np.asarray(apply(params, batch.tokens_BTI))
        pred_cos.append(cosine(pred, baselines.gd1_predictions(obs, eta)).mean(axis=0))
        if phi0 is not None:
            phi0.setdefault("cos", []).append(cosine(pred, np.asarray(phi_fn(batch.obs_BTS))).mean(axis=0))
        sub = batch.obs_BTS[: min(32, ctx.batch_size)]
        cos = sensitivity_cosines(*model_sensitivities(params, spec, sub))
        for key in sens:
            sens[key].append(cos[key])
    pred_cos_T = np.mean(pred_cos, axis=0)
    sens_T = {k: np.mean(v, axis=0) for k, v in sens.items()}

    if phi0 is not None:
        cos_T = np.mean(phi0.pop("cos"), axis=0)
        phi0["prediction_cosine"] = {"mean": float(cos_T[1:].mean()), "per_position": cos_T.tolist()}
    qk, vp = token_space_products(params, spec)
    vp_out = readout_map(params, spec, vp)
    eta_eff, heads = effective_eta(qk, vp_out, spec)
    n = spec.task.obs_dim
    slots = prediction_slots(spec)
    offdiag = [float(block_offdiag_max(qk[h], n)[slots["s_t"][0], 3]) if slots["s_t"] else None
               for h in range(qk.shape[0])]
    for h, head in enumerate(heads):
        head["qk_block_max_offdiag"] = offdiag[h]
    loss_curves = {f"model @ {ctx.step}": model_curve, f"GD-1 (eta={eta:.4f})": gd_curve, "ridge LSQ": ridge_curve}
    if phi0 is not None:
        loss_curves["GD-1 with learned Phi_0"] = np.asarray(phi0["per_position_loss"])
    figures.loss_curves(loss_curves, ctx.out_dir / "prop1_loss.png",
                        f"{spec.name}: model vs one step of mesa-GD (Prop. 1)")
    figures.cosine_curves({"predictions": pred_cos_T, "d f_t / d s_t": sens_T["current_token"],
                           "d f_t / d s_{1..t}": sens_T["context"]}, ctx.out_dir / "prop1_cosine.png",
                          f"{spec.name}: cosine similarity, model vs GD-1")
    block_labels = SLOT_NAMES if qk.shape[-1] == 4 * n else None
    figures.product_heatmaps(qk, vp, n, ctx.out_dir / "prop1_weights.png", block_labels,
                             f"{spec.name}: per-head products (eta_eff = {eta_eff:.4f})")
    return {
        "analysis": "prop1",
        "step": ctx.step,
        "gd1_eta": eta,
        "eta_eff": eta_eff,
        "heads": heads,
        "seq_avg_loss": {"model": float(np.mean(model_curve)), "gd1": float(np.mean(gd_curve)),
                         "ridge": float(np.mean(ridge_curve))},
        "per_position_loss": {"model": model_curve.tolist(), "gd1": gd_curve.tolist(), "ridge": ridge_curve.tolist()},
        "prediction_cosine": {"mean": float(pred_cos_T[1:].mean()), "per_position": pred_cos_T.tolist()},
        "sensitivity_cosine": {k: {"mean": float(v[1:].mean()), "per_position": v.tolist()}
                               for k, v in sens_T.items()},
        "gd1_learned_phi0": phi0,
        "block_means": {"qk": block_diag_means(qk, n).tolist(), "vp": block_diag_means(vp, n).tolist()},
        "paper": {"gd1_eta": 0.032, "eta_eff": 0.033, "gd1_seq_loss": 0.90,
                  "claim": "a trained LSA-1 implements one step of mesa-GD: its loss, predictions and "
                           "sensitivities match GD-1 with the line-searched eta (Fig. 2)"},
        "notes": "eta line-searched in closed form on batches from eval_seed+1; losses on the spec's test batches; "
                 "cosines over data seeds (sensitivities on 32 sequences per seed), means over t >= 2 (GD-1 predicts "
                 "0 at t = 1 since s_0 = 0); GD-1 uses Phi_0 = 0.",
    }


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    loss = r["seq_avg_loss"]
    lines = [
        "| quantity | this run | paper (LSA-1, Fig. 2) |", "|---|---|---|",
        f"| sequence-averaged test loss: model | {fmt(loss['model'])} | ~ GD-1 |",
        f"| sequence-averaged test loss: GD-1 (line-searched eta) | {fmt(loss['gd1'])} | ~0.90 |",
        f"| sequence-averaged test loss: ridge LSQ | {fmt(loss['ridge'])} | floor |",
        f"| line-searched eta | {fmt(r['gd1_eta'])} | 0.032 |",
        f"| eta_eff read off the weights | {fmt(r['eta_eff'])} | 0.033 |",
        f"| cosine(model, GD-1 predictions), mean over t | {fmt(r['prediction_cosine']['mean'], 3)} | ~1 |",
        f"| cosine of d f_t/d s_t (model vs GD-1) | {fmt(r['sensitivity_cosine']['current_token']['mean'], 3)} | ~1 |",
        f"| cosine of d f_t/d s_(1..t) (model vs GD-1) | {fmt(r['sensitivity_cosine']['context']['mean'], 3)} | ~1 |",
        "",
        "Per head (query s_t / key s_{t-1} block of W_q W_k^T, value s_t -> output block of W_v P):",
        "",
        "| head | QK block | VP block | product | max off-diag in QK block |", "|---|---|---|---|---|",
    ]
    phi0 = r.get("gd1_learned_phi0")
    if phi0:
        lines[10:10] = [f"| GD-1 with learned Phi_0 ({phi0['steps']} Adam steps): loss / prediction cosine | "
                      f"{fmt(phi0['seq_avg_loss'])} / {fmt(phi0['prediction_cosine']['mean'], 3)} | 'perfect fit' |"]
    lines += [f"| {h['head'] + 1} | {fmt(h['qk_block'])} | {fmt(h['vp_block'])} | {fmt(h['product'])} | "
              f"{fmt(h.get('qk_block_max_offdiag'), 3)} |" for h in r["heads"]]
    lines += ["", "Paper: head 1 ~ 0.17 x 0.16, head 2 ~ (-0.088) x (-0.070), off-diagonals < 0.01.",
              "", "Figures: prop1_loss.png, prop1_cosine.png, prop1_weights.png."]
    return lines


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    loss = r["seq_avg_loss"]
    return (f"loss model {loss['model']:.4f} vs GD-1 {loss['gd1']:.4f}; eta_eff {r['eta_eff']:.4f} vs "
            f"line-searched {r['gd1_eta']:.4f}; prediction cosine {r['prediction_cosine']['mean']:.3f}")
