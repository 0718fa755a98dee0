"""RUN_DIR/probe/summary.md: the key numbers of every analysis present, next to the paper's claims."""

from __future__ import annotations

import json
from pathlib import Path

from mesacli.spec import Spec

ORDER = ("prop1", "probes", "binding", "sensitivity", "prop2", "compress", "linearize")


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _prop1(r: dict) -> list[str]:
    loss = r["seq_avg_loss"]
    lines = [
        "| quantity | this run | paper (LSA-1, Fig. 2) |", "|---|---|---|",
        f"| sequence-averaged test loss: model | {_f(loss['model'])} | ~ GD-1 |",
        f"| sequence-averaged test loss: GD-1 (line-searched eta) | {_f(loss['gd1'])} | ~0.90 |",
        f"| sequence-averaged test loss: ridge LSQ | {_f(loss['ridge'])} | floor |",
        f"| line-searched eta | {_f(r['gd1_eta'])} | 0.032 |",
        f"| eta_eff read off the weights | {_f(r['eta_eff'])} | 0.033 |",
        f"| cosine(model, GD-1 predictions), mean over t | {_f(r['prediction_cosine']['mean'], 3)} | ~1 |",
        f"| cosine of d f_t/d s_t (model vs GD-1) | {_f(r['sensitivity_cosine']['current_token']['mean'], 3)} | ~1 |",
        f"| cosine of d f_t/d s_(1..t) (model vs GD-1) | {_f(r['sensitivity_cosine']['context']['mean'], 3)} | ~1 |",
        "",
        "Per head (query s_t / key s_{t-1} block of W_q W_k^T, value s_t -> output block of W_v P):",
        "",
        "| head | QK block | VP block | product | max off-diag in QK block |", "|---|---|---|---|---|",
    ]
    phi0 = r.get("gd1_learned_phi0")
    if phi0:
        lines[10:10] = [f"| GD-1 with learned Phi_0 ({phi0['steps']} Adam steps): loss / prediction cosine | "
                      f"{_f(phi0['seq_avg_loss'])} / {_f(phi0['prediction_cosine']['mean'], 3)} | 'perfect fit' |"]
    lines += [f"| {h['head'] + 1} | {_f(h['qk_block'])} | {_f(h['vp_block'])} | {_f(h['product'])} | "
              f"{_f(h.get('qk_block_max_offdiag'), 3)} |" for h in r["heads"]]
    lines += ["", "Paper: head 1 ~ 0.17 x 0.16, head 2 ~ (-0.088) x (-0.070), off-diagonals < 0.01.",
              "", "Figures: prop1_loss.png, prop1_cosine.png, prop1_weights.png."]
    return lines


def _probes(r: dict) -> list[str]:
    t = str(r["t_report"])
    at = r["at_positions"][t]
    names = r["targets"]
    lines = [f"Probe MSE (sum over dims / 2B) at t = {t}, by layer (0 = input), {r['seeds']} data seeds, "
             f"batch {r['batch_size']}, preconditioner {r['precond']}:", "",
             "| target | " + " | ".join(f"layer {layer}" for layer in r["layers"]) + " |",
             "|---|" + "---|" * len(r["layers"])]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_f(x, 3) for x in at[name]) + " |")
    lines.append(f"| control (s_(t+1) on precond input) | {_f(at['control'], 3)} (flat) |" + " |" * (
        len(r["layers"]) - 1))
    nxt = at[names[0]]
    falls = all(b <= a * 1.02 for a, b in zip(nxt, nxt[1:], strict=False))
    lines += ["", f"Target-probe error {'falls monotonically' if falls else 'does not fall monotonically'} with "
                  f"depth at t = {t} ({_f(nxt[0], 3)} -> {_f(nxt[-1], 3)}).",
              f"Paper: {r['paper']['claim']}.", "", "Figures: probes_depth.png, probes_next_by_position.png."]
    return lines


def _binding(r: dict) -> list[str]:
    lines = [f"Layer-1 output at t = {r['position']} probed onto s_t' (element-mean MSE, R^2):", "",
             "| t' | " + " | ".join(str(t) for t in r["t_prime"]) + " |", "|---|" + "---|" * len(r["t_prime"]),
             "| MSE | " + " | ".join(_f(x, 3) for x in r["token_probe_mse"]) + " |",
             "| R^2 | " + " | ".join(_f(x, 3) for x in r["token_probe_r2"]) + " |", "",
             f"Layer-1 attention averaged over {r['attention_sequences']} sequences, per head: mean weight on "
             f"t'=t {[round(x, 4) for x in r['attention_mean_diagonal']]}, on t'=t-1 "
             f"{[round(x, 4) for x in r['attention_mean_subdiagonal']]}, on t'<=t-2 "
             f"{[round(x, 4) for x in r['attention_mean_rest']]}.", "",
             f"Paper: {r['paper']['claim']}.", "", "Figures: binding_token_probe.png, binding_attention.png."]
    return lines


def _prop2(r: dict) -> list[str]:
    lines = [f"k = {r['k']} solver steps vs the {r['model_layers']}-layer model; coefficients learned for "
             f"{r['train_steps']} Adam steps (paper: 20k).", "",
             "| model / solver | seq.-avg test loss | cosine(model, solver predictions), mean over t >= 2 |",
             "|---|---|---|"]
    cosines = r.get("prediction_cosine", {})
    lines += [f"| {name} | {_f(v)} | {_f(cosines[name]['mean'], 3) if name in cosines else '-'} |"
              for name, v in r["seq_avg_loss"].items()]
    lines += ["", f"Learned Chebyshev alpha = {[round(a, 3) for a in r['learned']['chebyshev']['alpha']]}, "
                  f"beta = {[round(b, 3) for b in r['learned']['chebyshev']['beta']]}.",
              f"Paper: {r['paper']['claim']}.", "", "Figures: prop2_loss.png, prop2_training.png."]
    return lines


def _compress(r: dict) -> list[str]:
    lines = ["| model | seq.-avg test loss |", "|---|---|"]
    lines += [f"| {name} | {_f(v)} |" for name, v in r["seq_avg_loss"].items()]
    change = ", ".join(f"layer {i + 1}: QK {c['qk']:.2f}, VP {c['vp']:.2f}" for i, c in enumerate(r["relative_change"]))
    lines += ["", f"Parameters per head: {r['params_per_head']['original']} -> {r['params_per_head']['compressed']}. "
                  f"Relative Frobenius change of the products: {change}."]
    if "interpolation" in r:
        last = r["interpolation"][-1]
        lines.append(f"Interpolation run ({last['step']} steps): retrained model {_f(last['model'])}, "
                     f"50/50 interpolation {_f(last['interpolation'])} (figure compress_interpolation.png).")
    lines += [f"Paper: {r['paper']['claim']}.", "", "Figures: compress_loss.png."]
    return lines


def _sensitivity(r: dict) -> list[str]:
    lines = [f"Checkpoints: {', '.join(map(str, r['checkpoints']))} ({r['sequences']} sequences). At the last one:", "",
             "| t | to s_t | to s_(t-1) | to older tokens (mean) |", "|---|---|---|---|"]
    lines += [f"| {t} | {_f(v['s_t'], 3)} | {_f(v['s_(t-1)'], 3)} | {_f(v['older_mean'], 3)} |"
              for t, v in r["final"].items()]
    lines += ["", f"Paper: {r['paper']['claim']}.", "", "Figure: sensitivity.png."]
    return lines


def _linearize(r: dict) -> list[str]:
    lines = [f"Original test loss {_f(r['original_loss'])}; {r['distil_steps']} distillation steps per layer "
             f"(init {r['init']}).", "", "| layer | kind | distil MSE first -> last | loss with the layer linearized "
             "| ratio to original |", "|---|---|---|---|---|"]
    lines += [f"| {row['layer']} | {row['kind']} | {_f(row['distil_mse_first'], 3)} -> {_f(row['distil_mse_last'], 3)}"
              f" | {_f(row['loss'])} | {_f(row['ratio'], 3)} |" for row in r["per_layer"]]
    lines += ["", f"Paper: {r['paper']['claim']}.", "", "Figure: linearize_distillation.png."]
    return lines


def _generic(r: dict) -> list[str]:
    lines = []
    for key in ("seq_avg_loss", "ratio", "per_layer"):
        if key in r:
            lines.append(f"- {key}: `{json.dumps(r[key])}`")
    if "paper" in r:
        lines.append(f"- paper: {r['paper'].get('claim', '')}")
    return lines


FORMATTERS = {"prop1": _prop1, "probes": _probes, "binding": _binding, "sensitivity": _sensitivity, "prop2": _prop2,
              "compress": _compress, "linearize": _linearize}
TITLES = {"prop1": "Proposition 1: one step of mesa-gradient descent", "probes": "Linear probes across depth",
          "binding": "Token binding (first layer)", "sensitivity": "Token binding over training",
          "prop2": "Proposition 2: preconditioned solvers",
          "compress": "CompressedAlg: block-diagonal-mean compression", "linearize": "Linearization"}


def write_summary(out_dir: Path, spec: Spec, skipped: dict[str, str] | None = None) -> Path:
    """Rebuild summary.md from every <analysis>.json in ``out_dir``."""
    m = spec.model
    lines = [f"# Probe summary: {spec.name}", "",
             f"Model: {m.layers} layer(s) {'/'.join(dict.fromkeys(m.layer_kinds()))} attention, {m.num_heads} heads, "
             f"embed {m.embed_dim}, {spec.task.token_format} tokens; task {spec.task.kind}, n_s = "
             f"{spec.task.obs_dim}, T = {spec.task.seq_len}. Paper claims refer to arXiv 2309.05858 "
             "(see paper-spec section 4).", ""]
    for name in ORDER:
        path = out_dir / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        lines += [f"## {TITLES[name]} (`{name}`, step {r.get('step')})", ""]
        lines += FORMATTERS.get(name, _generic)(r)
        if r.get("notes"):
            lines += ["", f"_Notes: {r['notes']}_"]
        lines.append("")
    if skipped:
        lines += ["## Not applicable to this run", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()] + [""]
    path = out_dir / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
