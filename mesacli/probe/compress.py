"""CompressedAlg-d (paper-spec 4.2): every head reduced to 16 + 16 scalars.

For each head form the products QK = W_q W_k^T and VP = W_v P (E x E, a 4 x 4 grid of n_s x n_s
blocks of the constructed token), replace every block by (mean of its diagonal) * I, and run the
model in product form: score_{t,t'} = x_t^T QK x_{t'} (softmax: divided by sqrt(key_size)), the head
adds sum_{t'} score x_{t'}^T VP.  With the original products the product form is the model itself.

Optional interpolation run (``interpolation_steps`` > 0): retrain from the same initialisation with
the ordinary loss and, at every evaluation point, also evaluate the "interpolation" model whose
per-head products are the 50/50 average of the current model's and the compressed model's
(products are averaged because the factorisation is not unique).  The retrained model is not
steered towards the compressed one; this follows our reading of [P] App. F.1.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mesacli import baselines, tasks
from mesacli.errors import MesaError
from mesacli.probe.common import RunContext, block_diag_means, fmt, test_batches
from mesacli.spec import Spec

TITLE = "CompressedAlg: block-diagonal-mean compression"
DESCRIPTION = "CompressedAlg: block-diagonal-mean compression of every head"


def check_applicable(spec: Spec) -> None:
    m = spec.model
    kinds = set(m.layer_kinds())
    problems = []
    if spec.task.token_format != "constructed" or m.input_proj or m.output_proj:
        problems.append("constructed tokens without input/output projections")
    if not kinds <= {"linear", "softmax"}:
        problems.append("linear or softmax attention only (no mesa / positional-encoding layer)")
    if m.mlp or m.layer_norm or m.qk_norm:
        problems.append("no MLP, LayerNorm or q/k normalisation")
    if problems:
        raise MesaError(f"compress needs {'; '.join(problems)}; this run is a {m.layers}-layer "
                        f"{'/'.join(sorted(kinds))} model on {spec.task.token_format} tokens")


def products(params) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per block: (QK_HEE = W_q W_k^T, VP_HEE = W_v W_o) in float32 numpy."""
    out = []
    for block in params["blocks"]:
        qk = np.einsum("ehd,fhd->hef", np.asarray(block["w_q"]), np.asarray(block["w_k"]))
        vp = np.einsum("ehd,hdf->hef", np.asarray(block["w_v"]), np.asarray(block["w_o"]))
        out.append((qk, vp))
    return out


def compress_products(prods, n: int):
    """Block-diagonal-mean compression: every n x n block -> mean(diag) * I. Returns (compressed, scalars)."""
    eye = np.eye(n)
    compressed, scalars = [], []
    for qk, vp in prods:
        mq, mv = block_diag_means(qk, n), block_diag_means(vp, n)  # [H, 4, 4] each: 16 scalars per product
        compressed.append((np.einsum("hij,ab->hiajb", mq, eye).reshape(qk.shape),
                           np.einsum("hij,ab->hiajb", mv, eye).reshape(vp.shape)))
        scalars.append((mq, mv))
    return compressed, scalars


def apply_products(prods, tokens_BTI: jax.Array, spec: Spec) -> jax.Array:
    """The model in product form (see the module docstring); returns the prediction [B, T, n_s]."""
    m = spec.model
    x = tokens_BTI
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), dtype=bool))
    for (qk, vp), kind in zip(prods, m.layer_kinds(), strict=True):
        scores = jnp.einsum("bte,hef,bsf->bhts", x, qk, x)
        if kind == "softmax":
            scores = jnp.where(mask, scores / jnp.sqrt(m.key_size), -1e30)
            weights = jax.nn.softmax(scores, axis=-1)
        else:
            weights = jnp.where(mask, scores, 0.0)
        x = x + jnp.einsum("bhts,bse,hef->btf", weights, x, vp)
        if m.act_clip is not None:
            x = jnp.clip(x, -m.act_clip, m.act_clip)
    return x[..., : spec.task.obs_dim]


def product_loss_fn(spec: Spec):
    fn = jax.jit(lambda prods, tokens: apply_products(prods, tokens, spec))
    batches = test_batches(spec)

    def curve(prods) -> np.ndarray:
        prods = [(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)) for a, b in prods]
        return np.mean([np.asarray(tasks.per_position_loss(fn(prods, b.tokens_BTI), b.targets_BTS))
                        for b in batches], axis=0)

    return curve


def interpolation_run(spec: Spec, compressed, steps: int, evals: int = 10, say=None):
    """Retrain from the same initialisation; at ~``evals`` points record model / interpolation test loss."""
    import optax

    from mesacli.sharding import make_mesh
    from mesacli.state import init_state, make_optimizer
    from mesacli.train import loss_fn

    tx = make_optimizer(spec.train)
    state = init_state(spec, make_mesh())
    params, opt_state = state["params"], state["opt_state"]

    @jax.jit
    def step_fn(params, opt_state, step):
        batch = tasks.sample_batch(tasks.train_batch_key(spec, step), spec, spec.train.batch_size)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, spec)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    curve = product_loss_fn(spec)
    every = max(1, steps // evals)
    rows = []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            current = products(params)
            interp = [((q + cq) / 2, (v + cv) / 2) for (q, v), (cq, cv) in zip(current, compressed, strict=True)]
            rows.append({"step": step, "model": float(np.mean(curve(current))),
                         "interpolation": float(np.mean(curve(interp)))})
            if say is not None:
                say(f"compress: interpolation run step {step}/{steps}: model {rows[-1]['model']:.4f}, "
                    f"interpolation {rows[-1]['interpolation']:.4f}")
        if step < steps:
            params, opt_state, _ = step_fn(params, opt_state, step)
    return rows


def run(ctx: RunContext) -> dict:
    from mesacli.probe import figures

    spec = ctx.spec
    check_applicable(spec)
    n = spec.task.obs_dim
    prods = products(ctx.params)
    compressed, scalars = compress_products(prods, n)
    curve = product_loss_fn(spec)
    ctx.say("compress: evaluating the product-form and compressed models")
    full_curve, comp_curve = curve(prods), curve(compressed)
    curves = {"model (product form)": full_curve, "compressed (16+16 scalars per head)": comp_curve}
    result = {
        "analysis": "compress",
        "step": ctx.step,
        "scalars": [{"qk": mq.tolist(), "vp": mv.tolist()} for mq, mv in scalars],  # [layer][head][4][4]
        "params_per_head": {"original": 4 * spec.model.embed_dim * spec.model.key_size, "compressed": 32},
        "relative_change": [{"qk": float(np.linalg.norm(c[0] - p[0]) / np.linalg.norm(p[0])),
                             "vp": float(np.linalg.norm(c[1] - p[1]) / np.linalg.norm(p[1]))}
                            for p, c in zip(prods, compressed, strict=True)],
    }
    if spec.model.layers == 1 and spec.model.attention == "linear":
        # closed-form Prop-1 loss of the compressed scalars: GD-1 with eta = sum over heads of the products
        from mesacli.probe.prop1 import effective_eta

        eta, _ = effective_eta(compressed[0][0], compressed[0][1][..., :n], spec)
        gd = [baselines.per_position_loss(baselines.gd1_predictions(np.asarray(b.obs_BTS), eta),
                                          np.asarray(b.targets_BTS)) for b in test_batches(spec)]
        curves[f"GD-1 with eta_eff = {eta:.4f}"] = np.mean(gd, axis=0)
        result["eta_eff"] = eta
    steps = int(ctx.options.get("interpolation_steps", 0))
    if steps > 0:
        rows = interpolation_run(spec, compressed, steps, say=ctx.say)
        comp = float(np.mean(comp_curve))
        figures.steps_curves({"Transformer (retrained)": (np.array([r["step"] for r in rows]),
                                                          np.array([r["model"] for r in rows])),
                              "interpolation 50/50": (np.array([r["step"] for r in rows]),
                                                      np.array([r["interpolation"] for r in rows])),
                              "compressed algorithm": (np.array([0, steps]), np.array([comp, comp]))},
                             ctx.out_dir / "compress_interpolation.png",
                             f"{spec.name}: retraining with the interpolated model evaluated")
        result["interpolation"] = rows
    figures.loss_curves(curves, ctx.out_dir / "compress_loss.png", f"{spec.name}: compressed vs full model")
    result.update({
        "seq_avg_loss": {name: float(np.mean(c)) for name, c in curves.items()},
        "per_position_loss": {name: np.asarray(c).tolist() for name, c in curves.items()},
        "paper": {"claim": "the compressed algorithm (16 parameters per product instead of 3200 per head, ~0.5 %) "
                           "performs on par with the trained Transformer (Fig. 3 / App. F.1.2)"},
        "notes": "test losses on the spec's fixed test batches; product form = the model up to float rounding.",
    })
    return result


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    lines = ["| model | seq.-avg test loss |", "|---|---|"]
    lines += [f"| {name} | {fmt(v)} |" for name, v in r["seq_avg_loss"].items()]
    change = ", ".join(f"layer {i + 1}: QK {c['qk']:.2f}, VP {c['vp']:.2f}" for i, c in enumerate(r["relative_change"]))
    lines += ["", f"Parameters per head: {r['params_per_head']['original']} -> {r['params_per_head']['compressed']}. "
                  f"Relative Frobenius change of the products: {change}."]
    if "interpolation" in r:
        last = r["interpolation"][-1]
        lines.append(f"Interpolation run ({last['step']} steps): retrained model {fmt(last['model'])}, "
                     f"50/50 interpolation {fmt(last['interpolation'])} (figure compress_interpolation.png).")
    lines += [f"Paper: {r['paper']['claim']}.", "", "Figures: compress_loss.png."]
    return lines


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    return "; ".join(f"{k} {v:.4f}" for k, v in r["seq_avg_loss"].items())
