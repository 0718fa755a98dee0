"""Linearization (paper-spec 4.6): per layer, distil a linear-attention replacement and swap it in.

For block l, record its input (after LayerNorm when the model has one) and its attention output
sum_h P_h attn_h(x) on fresh batches of the original model, fit a linear-attention layer of the same
shape (W_q, W_k, W_v [E, H, D], W_o [H, D, E]; a softmax_pe layer's replacement keeps the positional
encodings concatenated to its query/key inputs, W_q, W_k [2E, H, D], as the authors' code does: kind
"linear_pe") with the authors' optimizer (linearizer.py ``optim_lin``: elementwise gradient clip at 1, then
AdamW at a constant lr 1e-3 with weight decay 0.05) on their ``_compute_loss``, the squared error summed over
dims / (2 B T), on fresh batches of 64; then report test loss(model with block l replaced) / test
loss(original).  One block at a time, every other weight frozen (as [C]).  The MLP, LayerNorm and clipping
of the block are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mesacli import model, tasks
from mesacli.probe.common import RunContext, fit_on_fresh_batches, fmt, test_batches
from mesacli.spec import Spec

TITLE = "Linearization"
DESCRIPTION = "per layer, distil a linear-attention replacement"


def apply_with_kinds(params, tokens_BTI, spec: Spec, kinds: tuple[str, ...]):
    """model.apply with the layer kinds given explicitly (so one block can be a linear replacement)."""
    return model.apply(params, tokens_BTI, spec, kinds)[0]


def layer_io(params, tokens_BTI, spec: Spec, layer: int):
    """(input h [B, T, E] of block ``layer``'s attention, its attention output [B, T, E]) in the original model."""
    m = spec.model
    _, aux = model.apply(params, tokens_BTI, spec)
    x = aux["residual_LBTE"][layer]
    block = params["blocks"][layer]
    h = model.layer_norm(x, block["ln_attn"]) if m.layer_norm else x
    delta, _ = model.attention_block(block, h, spec, m.layer_kinds()[layer], qk_norm=m.qk_norm and layer > 0)
    return h, delta


def replacement_kind(kind: str) -> str:
    """The linear layer that replaces a layer of ``kind``: linear_pe for softmax_pe (same inputs), else linear."""
    return "linear_pe" if kind == "softmax_pe" else "linear"


def init_replacement(key, spec: Spec, kind: str = "linear", std: float = 0.05):
    m = spec.model
    e, h, d = m.embed_dim, m.num_heads, m.key_size
    e_qk = 2 * e if kind == "linear_pe" else e
    keys = jax.random.split(key, 4)
    shapes = {"w_q": (e_qk, h, d), "w_k": (e_qk, h, d), "w_v": (e, h, d), "w_o": (h, d, e)}
    return {name: std * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items(), strict=True)}


DISTIL_GRAD_CLIP = 1.0  # [C] experiment_config.optim.grad_clip (optax.clip: elementwise)
DISTIL_WEIGHT_DECAY = 0.05  # [C] experiment_config.optim.weight_decay of 'linearize_full' ('probing_full')
DISTIL_OPTIMIZER = "clip(1) + adamw(wd 0.05), constant lr"  # recorded; records without it used plain Adam


def distil_optimizer(lr: float) -> optax.GradientTransformation:
    """[C] src/optim.py with use_schedule=False: chain(clip(grad_clip), adamw(peak_lr, weight_decay))."""
    return optax.chain(optax.clip(DISTIL_GRAD_CLIP), optax.adamw(lr, weight_decay=DISTIL_WEIGHT_DECAY))


def distil_layer(params, spec: Spec, layer: int, *, steps: int, lr: float = 1e-3, batch_size: int = 64,
                 init: str = "random", log_every: int = 100):
    """Fit a linear-attention block to block ``layer``'s attention output; returns (replacement, history)."""
    m = spec.model
    kind = replacement_kind(m.layer_kinds()[layer])
    if init == "original":
        repl = {k: params["blocks"][layer][k] for k in ("w_q", "w_k", "w_v", "w_o")}
    else:
        repl = init_replacement(jax.random.PRNGKey(spec.train.seed + 31 * layer + 5), spec, kind)
    data_key = jax.random.PRNGKey(spec.train.seed + 9999)

    def loss_fn(r, batch):
        h, target = jax.lax.stop_gradient(layer_io(params, batch.tokens_BTI, spec, layer))
        out, _ = model.attention_block(r, h, spec, kind, qk_norm=m.qk_norm and layer > 0)
        return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, axis=-1))  # [C] _compute_loss: sum / (2 B T)

    repl, history = fit_on_fresh_batches(repl, distil_optimizer(lr), loss_fn, spec, data_key, steps=steps,
                                         batch_size=batch_size, log_every=log_every)
    return repl, history


def swap_in(params, replacement, layer: int):
    blocks = [dict(b) for b in params["blocks"]]
    blocks[layer] = {**{k: v for k, v in blocks[layer].items() if k not in ("lam", "gate_w", "gate_b")},
                     **replacement}
    return {**params, "blocks": blocks}


def run(ctx: RunContext) -> dict:
    from mesacli.probe import figures

    spec, params = ctx.spec, ctx.params
    kinds = spec.model.layer_kinds()
    steps = int(ctx.options.get("distil_steps", 2000))
    init = ctx.options.get("linearize_init", "random")
    lr = float(ctx.options.get("distil_lr", 1e-3))
    batches = test_batches(spec)

    def test_loss(p, layer_kinds):
        fn = jax.jit(lambda p, x: apply_with_kinds(p, x, spec, layer_kinds))
        return float(np.mean([float(tasks.sequence_loss(fn(p, b.tokens_BTI), b.targets_BTS)) for b in batches]))

    original = test_loss(params, kinds)
    rows, histories = [], {}
    for layer in range(spec.model.layers):
        ctx.say(f"linearize: layer {layer + 1}/{spec.model.layers} ({kinds[layer]}), {steps} distillation steps")
        repl, history = distil_layer(params, spec, layer, steps=steps, init=init, lr=lr,
                                     log_every=max(1, steps // 50))
        new_kinds = kinds[:layer] + (replacement_kind(kinds[layer]),) + kinds[layer + 1:]
        loss = test_loss(swap_in(params, repl, layer), new_kinds)
        rows.append({"layer": layer + 1, "kind": kinds[layer], "distil_mse_first": history[0][1],
                     "distil_mse_last": history[-1][1], "loss": loss, "ratio": loss / original})
        histories[f"layer {layer + 1}"] = (np.array([s for s, _ in history]), np.array([v for _, v in history]))
    figures.steps_curves(histories, ctx.out_dir / "linearize_distillation.png",
                         f"{spec.name}: distillation error of the linear replacements")
    return {
        "analysis": "linearize",
        "step": ctx.step,
        "distil_steps": steps,
        "pe_layer_replacement": "linear_pe",  # a softmax_pe layer is replaced by linear attention with its PE
        "distil_lr": lr,
        "distil_optimizer": DISTIL_OPTIMIZER,
        "init": init,
        "original_loss": original,
        "per_layer": rows,
        "ratio": [r["ratio"] for r in rows],
        "paper": {"claim": "replacing a single softmax layer of the trained Softmax-7 by a distilled linear-attention "
                           "layer costs little except in the first layer(s) (Fig. 5A; ratio near 1), i.e. most "
                           "layers behave like linear attention (15k distillation steps per layer)"},
        "notes": f"{steps} steps of clip(1) + AdamW (lr {lr:g} constant, weight decay {DISTIL_WEIGHT_DECAY:g}) per "
                 f"layer on fresh batches of 64 (paper: 15k) of the distillation loss sum over dims / (2 B T); init "
                 f"{init}; test loss on the spec's fixed test batches.",
    }


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    lines = [f"Original test loss {fmt(r['original_loss'])}; {r['distil_steps']} distillation steps per layer "
             f"(init {r['init']}).", "", "| layer | kind | distil MSE first -> last | loss with the layer linearized "
             "| ratio to original |", "|---|---|---|---|---|"]
    lines += [f"| {row['layer']} | {row['kind']} | {fmt(row['distil_mse_first'], 3)} -> "
              f"{fmt(row['distil_mse_last'], 3)} | {fmt(row['loss'])} | {fmt(row['ratio'], 3)} |"
              for row in r["per_layer"]]
    lines += ["", f"Paper: {r['paper']['claim']}.", "", "Figure: linearize_distillation.png."]
    return lines


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    return f"loss ratio {r['ratio']}"
