"""Proposition 2 (paper-spec 4.3): truncated Neumann / Chebyshev preconditioned solvers as baselines.

Approximate inverse [C `invert_matrix_chebyshev`], k steps with coefficients alpha_k, beta_k:
  A <- A / ||A||_F;  X_0 = I, term_0 = I;
  term_{k+1} = term_k (I - alpha_k A);  X_{k+1} = X_k + term_{k+1} + beta_k (X_k - X_{k-1});
  return X_k / ||A||_F.
With alpha = 1, beta = 0 this is the truncated Neumann series sum_{j<=k} (I - A)^j (-> A^{-1} as
k grows, since the normalised A has eigenvalues in (0, 1]).

"Proposition-2 (k)" predictor: s^_{t+1} = Y X^T Inv_k(X X^T + lambda I) s_t over the pairs
(x, y) = (s_{t'-1}, s_{t'}), t' <= t (current pair included, as [P]'s L_t and mesacli.baselines; [C]
uses one pair fewer), lambda = 1e-3.  alpha/beta are learned with Adam on this predictor's
next-token loss (not fitted to the Transformer).  A k-step solver is compared with a (k+1)-layer model.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mesacli import baselines, model, tasks
from mesacli.errors import MesaError
from mesacli.probe.common import RunContext, context_gram, cosine, fit_on_fresh_batches, fmt, test_batches
from mesacli.spec import Spec

TITLE = "Proposition 2: preconditioned solvers"
DESCRIPTION = "Prop. 2: Neumann / Chebyshev preconditioned solvers vs the model"

# The paper's learned 6-step coefficients, fully observed linear task (paper-spec 4.3, [R]).
PAPER_CHEBYSHEV_LINEAR = ((1.029, 3.855, 3.747, 3.383, 2.988, 2.093), (0.0, 0.640, 0.480, 0.814, 1.668, 2.420))
PAPER_CHEBYSHEV_CONSTRUCTED = ((1.026, 3.251, 3.258, 3.212, 2.694, 1.273), (0.0, 0.679, 0.307, 0.745, 1.836, 2.344))


def chebyshev_inverse(a_NSS, alphas: Sequence[float], betas: Sequence[float], xp=jnp):
    """Inv_k(A) for a stack of symmetric positive-definite matrices (see the module docstring)."""
    n = a_NSS.shape[-1]
    norm = xp.sqrt(xp.sum(a_NSS**2, axis=(-2, -1), keepdims=True))
    a = a_NSS / norm
    eye = xp.eye(n, dtype=a.dtype)
    x = xp.broadcast_to(eye, a.shape)
    x_prev, term = x, x
    for k in range(len(alphas)):
        term = term @ (eye - alphas[k] * a)
        x, x_prev = x + term + betas[k] * (x - x_prev), x
    return x / norm


def neumann_inverse(a_NSS, steps: int, xp=jnp):
    """The truncated Neumann series: alpha = 1, beta = 0."""
    return chebyshev_inverse(a_NSS, [1.0] * steps, [0.0] * steps, xp=xp)


def chebyshev_preconditioned(obs_BTS: np.ndarray, lam: float, alphas, betas) -> np.ndarray:
    """Inv_k(S_{t-1} S_{t-1}^T + lam I) s_t in float64 (the paper's probe target ii)."""
    a = context_gram(obs_BTS, lam)
    inv = chebyshev_inverse(a, alphas, betas, xp=np)
    return np.einsum("btij,btj->bti", inv, np.asarray(obs_BTS, np.float64))


def prop2_predictions(obs_BTS: jax.Array, alphas, betas, lam: float = 1e-3) -> jax.Array:
    """s^_{t+1} = Y X^T Inv_k(X X^T + lam I) s_t with pairs t' <= t (float32, differentiable in alpha/beta)."""
    prev = jnp.pad(obs_BTS, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    n = obs_BTS.shape[-1]
    xx_BTSS = jnp.cumsum(jnp.einsum("bti,btj->btij", prev, prev), axis=1) + lam * jnp.eye(n)
    yx_BTSS = jnp.cumsum(jnp.einsum("bti,btj->btij", obs_BTS, prev), axis=1)
    z = jnp.einsum("btij,btj->bti", chebyshev_inverse(xx_BTSS, alphas, betas), obs_BTS)
    return jnp.einsum("btij,btj->bti", yx_BTSS, z)


def learn_coefficients(spec: Spec, k: int, *, momentum: bool, steps: int, lr: float = 1e-2, batch_size: int = 128,
                       lam: float = 1e-3, log_every: int = 100):
    """Adam (cosine-decayed lr) on the next-token loss of the k-step solver; alpha_0 = 1, beta_0 = 0.

    momentum=False keeps beta = 0 (learned Neumann / Richardson step sizes).  Fresh batches every step
    from fold_in(PRNGKey(train.seed + 7777), step).  Returns (alphas, betas, [(step, loss)]).
    """
    params = {"alpha": jnp.ones((k,)), "beta": jnp.zeros((k,))}
    tx = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.01))
    data_key = jax.random.PRNGKey(spec.train.seed + 7777)

    def loss_fn(p, batch):
        beta = p["beta"] if momentum else jnp.zeros_like(p["beta"])
        pred = prop2_predictions(batch.obs_BTS, p["alpha"], beta, lam)
        return tasks.sequence_loss(pred, batch.targets_BTS)

    params, history = fit_on_fresh_batches(params, tx, loss_fn, spec, data_key, steps=steps, batch_size=batch_size,
                                           log_every=log_every)
    betas = params["beta"] if momentum else jnp.zeros((k,))
    return [float(a) for a in params["alpha"]], [float(b) for b in betas], history


_prop2_jit = jax.jit(prop2_predictions, static_argnames="lam")


def solver_predictions(batches: list[tasks.Batch], alphas, betas, lam: float = 1e-3) -> list[np.ndarray]:
    """The k-step solver's predictions on each batch ([B, T, n_s] each)."""
    a, b = jnp.asarray(alphas, jnp.float32), jnp.asarray(betas, jnp.float32)
    return [np.asarray(_prop2_jit(batch.obs_BTS, a, b, lam=lam)) for batch in batches]


def model_predictions(params, spec: Spec, batches: list[tasks.Batch]) -> list[np.ndarray]:
    """The model's predictions f_t on each batch."""
    fn = jax.jit(lambda p, tokens: model.apply(p, tokens, spec)[0])
    return [np.asarray(fn(params, b.tokens_BTI)) for b in batches]


def prediction_cosines(reference: list[np.ndarray], other: list[np.ndarray]) -> np.ndarray:
    """Per position t: the mean over test sequences of cos(f_t, g_t) (the batches' lists pair up)."""
    return np.mean(np.concatenate([cosine(a, b) for a, b in zip(reference, other, strict=True)]), axis=0)


def loss_curve(preds: list[np.ndarray], batches: list[tasks.Batch]) -> np.ndarray:
    """Per-position loss (paper Eq. 1, float64) of per-batch predictions, averaged over the batches."""
    return np.mean([baselines.per_position_loss(p, np.asarray(b.targets_BTS))
                    for p, b in zip(preds, batches, strict=True)], axis=0)


def check_applicable(spec: Spec) -> None:
    if spec.task.kind in ("partial", "nonlinear"):
        raise MesaError(f"prop2 solvers run on fully observed linear tasks; this run's task is '{spec.task.kind}' "
                        f"(the partial/nonlinear variants of paper-spec 4.3 are not implemented)")


def run(ctx: RunContext) -> dict:
    from mesacli.evaluate import make_evaluator
    from mesacli.probe import figures
    from mesacli.sharding import make_mesh

    spec = ctx.spec
    check_applicable(spec)
    layers = spec.model.layers
    k = int(ctx.options.get("prop2_k", layers - 1))
    if k < 0:
        raise MesaError(f"prop2: the number of solver steps k must be >= 0, got {k}")
    steps = int(ctx.options.get("prop2_train_steps", 2000))
    lr = float(ctx.options.get("prop2_lr", 1e-2))
    lam = 1e-3
    model_curve = make_evaluator(spec, make_mesh())(ctx.params)
    if k > 0 and steps > 0:
        log_every = max(1, steps // 50)
        ctx.say(f"prop2: learning {k}-step Neumann step sizes ({steps} Adam steps)")
        a_n, b_n, hist_n = learn_coefficients(spec, k, momentum=False, steps=steps, lr=lr, lam=lam,
                                              log_every=log_every)
        ctx.say(f"prop2: learning {k}-step Chebyshev alpha/beta ({steps} Adam steps)")
        a_c, b_c, hist_c = learn_coefficients(spec, k, momentum=True, steps=steps, lr=lr, lam=lam,
                                              log_every=log_every)
    else:  # k = 0: Inv_0(A) = I / ||A||_F has no coefficients (a GD step with a normalised learning rate)
        a_n, b_n, hist_n, a_c, b_c, hist_c = [1.0] * k, [0.0] * k, [], [1.0] * k, [0.0] * k, []
    model_name = f"model ({layers} layer{'s' if layers > 1 else ''})"
    batches = test_batches(spec)
    obs = [np.asarray(b.obs_BTS) for b in batches]
    eta = baselines.gd1_search_eta(spec)
    preds = {f"GD-1 (eta={eta:.4f}, line-searched)": [baselines.gd1_predictions(o, eta) for o in obs],
             f"Neumann k={k} (alpha=1)": solver_predictions(batches, [1.0] * k, [0.0] * k, lam)}
    if hist_n:
        preds[f"Neumann k={k} (learned alpha)"] = solver_predictions(batches, a_n, b_n, lam)
        preds[f"Chebyshev k={k} (learned alpha, beta)"] = solver_predictions(batches, a_c, b_c, lam)
    if k == 6:
        preds["Chebyshev k=6 (paper's alpha, beta)"] = solver_predictions(batches, *PAPER_CHEBYSHEV_LINEAR, lam)
    preds[f"exact ridge LSQ (lam={lam:g})"] = [baselines.ridge_predictions(o, lam) for o in obs]
    model_preds = model_predictions(ctx.params, spec, batches)
    curves = {model_name: model_curve, **{name: loss_curve(p, batches) for name, p in preds.items()}}
    cosines = {name: prediction_cosines(model_preds, p) for name, p in preds.items()}
    figures.loss_curves(curves, ctx.out_dir / "prop2_loss.png",
                        f"{spec.name}: Proposition-2 solvers (k={k} steps) vs the model")
    if hist_n:
        figures.steps_curves({"Neumann (learned alpha)": tuple(map(np.array, zip(*hist_n, strict=True))),
                              "Chebyshev (learned alpha, beta)": tuple(map(np.array, zip(*hist_c, strict=True)))},
                             ctx.out_dir / "prop2_training.png", f"{spec.name}: learning the solver coefficients")
    return {
        "analysis": "prop2",
        "step": ctx.step,
        "k": k,
        "model_layers": layers,
        "train_steps": steps,
        "lr": lr,
        "lambda": lam,
        "learned": {"neumann": {"alpha": a_n}, "chebyshev": {"alpha": a_c, "beta": b_c}},
        "history": {"neumann": hist_n, "chebyshev": hist_c},  # [(step, training loss)]
        "seq_avg_loss": {name: float(np.mean(c)) for name, c in curves.items()},
        "per_position_loss": {name: np.asarray(c).tolist() for name, c in curves.items()},
        "gd1_eta": eta,
        # cos(model prediction, solver prediction) per position, mean over test sequences; "mean" over t >= 2
        # (GD-1 predicts 0 at t = 1, since s_0 = 0)
        "prediction_cosine": {name: {"mean": float(c[1:].mean()), "per_position": c.tolist()}
                              for name, c in cosines.items()},
        "paper": {"claim": "a k+1-layer LSA model tracks the Proposition-2 solver with k learned Chebyshev steps, "
                           "between GD-1 and exact ridge LSQ (Fig. 4/12); 6-step learned alpha = "
                           f"{list(PAPER_CHEBYSHEV_LINEAR[0])}, beta = {list(PAPER_CHEBYSHEV_LINEAR[1])} "
                           "(20k Adam steps)"},
        "notes": f"coefficients learned for {steps} Adam steps (the paper used 20k); pairs t' <= t ([P]); "
                 "test losses and prediction cosines on the spec's fixed test batches; GD-1's eta line-searched "
                 "on separate batches (as mesacli eval).",
    }


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    lines = [f"k = {r['k']} solver steps vs the {r['model_layers']}-layer model; coefficients learned for "
             f"{r['train_steps']} Adam steps (paper: 20k).", "",
             "| model / solver | seq.-avg test loss | cosine(model, solver predictions), mean over t >= 2 |",
             "|---|---|---|"]
    cosines = r.get("prediction_cosine", {})
    lines += [f"| {name} | {fmt(v)} | {fmt(cosines[name]['mean'], 3) if name in cosines else '-'} |"
              for name, v in r["seq_avg_loss"].items()]
    lines += ["", f"Learned Chebyshev alpha = {[round(a, 3) for a in r['learned']['chebyshev']['alpha']]}, "
                  f"beta = {[round(b, 3) for b in r['learned']['chebyshev']['beta']]}.",
              f"Paper: {r['paper']['claim']}.", "", "Figures: prop2_loss.png, prop2_training.png."]
    return lines


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    return "; ".join(f"{k} {v:.4f}" for k, v in r["seq_avg_loss"].items())
