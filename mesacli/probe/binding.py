"""Token binding (paper-spec 4.5): what the first layer writes at position t, and where it attends.

Token probe: regress the layer-1 output at t = min(50, T) onto s_{t'} for t' = t-7..t with an
unregularised bias-free least-squares map; report the element-mean squared error (no 1/2) and R^2,
averaged over data seeds.  This is the authors' ``tokenanalyser.py`` item by item: the block-1 output after
the residual add (their ``activations[1]``: input projection + first attention layer, nothing clipped),
the raw observations s_{t'} as targets (their ``data[:, probe_token]``, not normalised), float32-precision
``lstsq`` fitted and scored on one batch of 256 (no split, no ridge), ``mean((X W - Y)^2)`` over batch and
dims, probe_token = 49 (0-based) = t 50 and t' = 43..50; R^2 as their ``r2_score_batch`` (per-dimension
R^2 about the batch mean, then the mean over dimensions); 5 data seeds.

Attention maps: the first block's per-head weights averaged over sequences (for linear attention these
are the raw scores q_t^T k_{t'}; for a chunked mesa-layer the sequential Sherman-Morrison form is used,
which records them).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mesacli import model
from mesacli.probe.common import LSTSQ_CUTOFF, RunContext, fmt, lstsq_probe, probe_batch, r_squared

TITLE = "Token binding (first layer)"
DESCRIPTION = "token binding: layer-1 output probed on s_{t'}, layer-1 attention maps"

LAGS = 8  # t' = t-7 .. t


def run(ctx: RunContext) -> dict:
    from mesacli.probe import figures

    spec, params = ctx.spec, ctx.params
    seq_len = spec.task.seq_len
    t = min(50, seq_len)
    lags = [tp for tp in range(t - LAGS + 1, t + 1) if tp >= 1]
    attn_spec = spec
    note = ""
    if spec.model.layer_kinds()[0] == "mesa" and spec.model.mesa_impl != "sequential":
        attn_spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, mesa_impl="sequential"))
        note = "attention maps computed with mesa_impl=sequential (the chunked form never forms them). "
    layer1 = jax.jit(lambda p, x: model.apply(p, x, spec)[1]["residual_LBTE"][1])
    first_attn = jax.jit(lambda p, x: model.apply(p, x, attn_spec)[1]["attention"][0].mean(axis=0))
    mse, r2, maps = [], [], []
    n_maps = max(1, -(-int(ctx.options.get("attention_sequences", 2048)) // ctx.batch_size))
    for seed in range(max(ctx.seeds, n_maps)):
        batch = probe_batch(spec, seed, ctx.batch_size)
        if seed < n_maps:
            maps.append(np.asarray(first_attn(params, batch.tokens_BTI), np.float64))
        if seed >= ctx.seeds:
            continue
        ctx.say(f"binding: data seed {seed + 1}/{ctx.seeds}")
        x = np.asarray(layer1(params, batch.tokens_BTI), np.float64)[:, t - 1]
        obs = np.asarray(batch.obs_BTS, np.float64)
        row_mse, row_r2 = [], []
        for tp in lags:
            w, _ = lstsq_probe(x, obs[:, tp - 1])
            pred = x @ w
            row_mse.append(float(np.mean((pred - obs[:, tp - 1]) ** 2)))
            row_r2.append(r_squared(pred, obs[:, tp - 1]))
        mse.append(row_mse)
        r2.append(row_r2)
    mse_m, r2_m = np.mean(mse, axis=0), np.mean(r2, axis=0)
    attn_HTT = np.mean(maps, axis=0)
    figures.binding_bars(lags, mse_m, r2_m, ctx.out_dir / "binding_token_probe.png",
                         f"{spec.name}: layer-1 output at t={t} probed onto s_t'")
    figures.attention_maps(attn_HTT, ctx.out_dir / "binding_attention.png",
                           f"{spec.name}: layer-1 attention averaged over {len(maps) * ctx.batch_size} sequences")
    diag = np.diagonal(attn_HTT, axis1=1, axis2=2).mean(axis=-1)
    sub = np.diagonal(attn_HTT, offset=-1, axis1=1, axis2=2).mean(axis=-1)
    lower = np.tril(np.ones(attn_HTT.shape[1:]), k=-2).astype(bool)
    rest = attn_HTT[:, lower].mean(axis=-1) if lower.any() else np.zeros(attn_HTT.shape[0])
    return {
        "analysis": "binding",
        "step": ctx.step,
        "lstsq_cutoff": LSTSQ_CUTOFF,
        "position": t,
        "t_prime": lags,
        "token_probe_mse": mse_m.tolist(),
        "token_probe_r2": r2_m.tolist(),
        "attention_sequences": len(maps) * ctx.batch_size,
        "attention_mean_diagonal": diag.tolist(),  # per head: mean weight on t' = t
        "attention_mean_subdiagonal": sub.tolist(),  # per head: mean weight on t' = t-1
        "attention_mean_rest": rest.tolist(),  # per head: mean weight on t' <= t-2
        "attention_map": attn_HTT.tolist(),
        "paper": {"claim": "the first (softmax) layer binds s_t with a few past tokens (the last 1-2 are decodable "
                           "from its output, older ones less); its attention maps show a diagonal plus a "
                           "sub-diagonal (Fig. 3A)"},
        "notes": note + "MSE is the element mean (no 1/2), fitted and scored on the same batch; R^2 is the mean over "
                        "dimensions of the per-dimension R^2 (the authors' r2_score_batch).",
    }


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    lines = [f"Layer-1 output at t = {r['position']} probed onto s_t' (element-mean MSE, R^2):", "",
             "| t' | " + " | ".join(str(t) for t in r["t_prime"]) + " |", "|---|" + "---|" * len(r["t_prime"]),
             "| MSE | " + " | ".join(fmt(x, 3) for x in r["token_probe_mse"]) + " |",
             "| R^2 | " + " | ".join(fmt(x, 3) for x in r["token_probe_r2"]) + " |", "",
             f"Layer-1 attention averaged over {r['attention_sequences']} sequences, per head: mean weight on "
             f"t'=t {[round(x, 4) for x in r['attention_mean_diagonal']]}, on t'=t-1 "
             f"{[round(x, 4) for x in r['attention_mean_subdiagonal']]}, on t'<=t-2 "
             f"{[round(x, 4) for x in r['attention_mean_rest']]}.", "",
             f"Paper: {r['paper']['claim']}.", "", "Figures: binding_token_probe.png, binding_attention.png."]
    return lines


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    return f"R^2 of s_t' from layer 1 at t={r['position']}: " + ", ".join(
        f"{t}:{x:.2f}" for t, x in zip(r["t_prime"], r["token_probe_r2"], strict=True))
