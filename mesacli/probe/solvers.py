"""Proposition 2 (paper-spec 4.3): truncated Neumann / Chebyshev preconditioned solvers as baselines.

Approximate inverse [C `invert_matrix_chebyshev`], k steps with coefficients alpha_k, beta_k:
  A <- A / ||A||_F;  X_0 = I, term_0 = I;
  term_{k+1} = term_k (I - alpha_k A);  X_{k+1} = X_k + term_{k+1} + beta_k (X_k - X_{k-1});
  return X_k / ||A||_F.
With alpha = 1, beta = 0 this is the truncated Neumann series sum_{j<=k} (I - A)^j (-> A^{-1} as
k grows, since the normalised A has eigenvalues in (0, 1]).  Every X_k is a polynomial in A, so the solver
applies it to a vector with products with A only (``chebyshev_solve``); ``prop2_predictions`` never forms A.

"Proposition-2 (k)" predictor on features phi_t = phi(s_t) (phi_0 = 0): s^_{t+1} = Y X^T Inv_k(X X^T + lambda I)
phi_t over the pairs (x, y) = (phi_{t'-1}, s_{t'}), t' <= t - 1: [C]'s LeastSquaresSequenceSolver (and the
predictor of its learn_parameters_chebyshev), whose data matrix at token t holds shifted_data[:t] (a dummy pair
(0, s_1) and the pairs up to (s_{t-2}, s_{t-1})), so it has one pair fewer than [P]'s L_t (paper-spec 8.8); with
it, the paper's 6-step alpha/beta give the paper's Prop-2 (6 steps) curve on our test batches (t = 50 0.0121,
seq.-avg 0.232).  ``current_pair=True`` adds the pair (phi_{t-1}, s_t) ([P]'s L_t, as mesacli.baselines).
alpha/beta are learned on this predictor's next-token loss (not fitted to the Transformer) with [C]'s recipe
(``learn_coefficients``).  A k-step solver is compared with a (k+1)-layer model.

Features (the regression target stays s_{t+1}):
- raw: phi_t = s_t (fully observed linear tasks: lambda = 1e-3, as the paper);
- concat: phi_t = z_t = [s_t, s_{t-1}, ..., s_{t-w+1}], s_{t'} = 0 for t' < 1 (partially observed task, Fig. 7B:
  w = 16 observations, [C]'s 80 / n_s slots; [P] names k = 5 for its preconditioning probe, not this baseline);
- mlp: phi_t = f*(s_t), the teacher's unit-norm MLP* output (nonlinear task, Fig. 7C; there s_t = h_t).
On the partially observed and the nonlinear task the analysis runs the paper's two baselines each (``variants_for``):
the solver on the informative features and the naive one on s_t.  As [C] (learn_parameters_chebyshev with
part_obs_constr / use_mlp): alpha/beta are learned once, on the informative features at lambda = 1e-3, and reused
for the naive baseline; both solvers then run at lambda = 1e-3, which is what gives the stored Fig. 7B/C numbers
(``variants_for``; the option prop2_lambda_search line-searches lambda on batches separate from the test batches,
as [C]'s opt_lamb).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mesacli import baselines, model, tasks
from mesacli.errors import MesaError
from mesacli.probe.common import RunContext, context_gram, cosine, fit_on_fresh_batches, fmt, test_batches
from mesacli.spec import Spec, TaskSpec

TITLE = "Proposition 2: preconditioned solvers"
DESCRIPTION = "Prop. 2: Neumann / Chebyshev preconditioned solvers vs the model"

# The paper's learned 6-step coefficients, fully observed linear task (paper-spec 4.3, [R]).
PAPER_CHEBYSHEV_LINEAR = ((1.029, 3.855, 3.747, 3.383, 2.988, 2.093), (0.0, 0.640, 0.480, 0.814, 1.668, 2.420))
PAPER_CHEBYSHEV_CONSTRUCTED = ((1.026, 3.251, 3.258, 3.212, 2.694, 1.273), (0.0, 0.679, 0.307, 0.745, 1.836, 2.344))
# [C]'s 6-step alpha/beta learned on the concatenated observations (partially observed task) and on the MLP*
# features (nonlinear task), as hard-coded in its run_model_comparisons.ipynb (which made Fig. 7B/C) and reused
# there for the naive baselines too.  With prop2_train_steps = 0 the analyses use [C]'s coefficients instead of
# learning them: [C]'s recipe (learn_coefficients) gives back PAPER_CHEBYSHEV_LINEAR to 3 decimals on the fully
# observed task (results/softmax7_full), but 20k steps on 80 concatenated features cost about 70 CPU minutes here.
PAPER_CHEBYSHEV_PARTIAL = ((1.0931315, 3.109863, 3.1626225, 3.0759215, 1.9025781, 0.22242576),
                           (0.0, 0.7379088, 0.18275392, 0.7571611, 1.2497796, 2.2919629))
PAPER_CHEBYSHEV_NONLINEAR = ((1.0030721, 4.0157757, 3.866156, 3.3217084, 2.7570639, 2.1692858),
                             (0.0, 0.56304085, 0.566149, 0.9348311, 1.5603266, 2.425832))
PAPER_CHEBYSHEV_BY_TASK = {"linear": PAPER_CHEBYSHEV_LINEAR, "partial": PAPER_CHEBYSHEV_PARTIAL,
                           "nonlinear": PAPER_CHEBYSHEV_NONLINEAR}

FEATURES = ("raw", "concat", "mlp")
PAPER_CONCAT_WINDOW = 16  # observations concatenated for the partially observed task ([C]: 80 / n_s = 16 slots)
LAMBDA_TRAIN = 1e-3  # the ridge lambda at which alpha/beta are learned ([C]) and the fully observed solver's lambda
PAIRS_NOTE = "[C]: t' <= t - 1 (the pairs up to (s_{t-2}, s_{t-1}) and a dummy (0, s_1))"  # records' "pairs"


def lambda_grid(top: float) -> tuple[float, ...]:
    """1e-3, 3e-3, 1e-2, ..., up to ``top``: the line-search grid of lambda (two points per decade)."""
    grid, decade = [], 1e-3
    while decade <= top * (1 + 1e-9):
        grid += [x for x in (decade, 3 * decade) if x <= top * (1 + 1e-9)]
        decade *= 10
    return tuple(float(f"{x:.3g}") for x in grid)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One Prop-2 baseline: its name (the record key and the ledger metric's), features and lambda grid."""

    name: str
    features: str  # raw | concat | mlp
    window: int | None  # concat: observations concatenated
    lambdas: tuple[float, ...]  # line-searched lambda values (one value: fixed)
    paper_t50: float | None = None  # the paper's loss at t = 50 (paper-spec 7), for the summary

    def describe(self) -> str:
        return {"raw": "s_t", "concat": f"{self.window} concatenated observations",
                "mlp": "the normalised MLP* features f*(s_t)"}[self.features]


def variants_for(task: TaskSpec, window: int = PAPER_CONCAT_WINDOW, search: bool = False) -> list[Variant]:
    """The paper's Prop-2 baselines of a partially observed (Fig. 7B) or nonlinear (Fig. 7C) task; [] for the
    fully observed linear tasks, whose analysis is the raw solver at lambda = 1e-3 (Fig. 6C, 7A).

    lambda = 1e-3 as the stored Fig. 7B/C results: [C]'s notebook builds the solvers with lambda = 10 (partially
    observed) and calls opt_lamb, but its pipeline transcribed on its own test batches (its generator and keys, 512
    sequences x seeds 1..11111) gives the paper's 0.135 / 1.74 (partial: 0.1350 / 1.738) and 0.0037 / 0.0154
    (nonlinear) at lambda = 1e-3 only; lambda = 10 gives 0.1605 / 1.834.  ``search`` line-searches lambda over a
    log grid spanning [C]'s opt_lamb ranges instead (up to 10 for concat, 100 for the naive solver of the partially
    observed task, 1 on the nonlinear task)."""
    def grid(top: float) -> tuple[float, ...]:
        return lambda_grid(top) if search else (LAMBDA_TRAIN,)

    if task.kind == "partial":
        return [Variant("concat", "concat", window, grid(10.0), 0.135),
                Variant("naive", "raw", None, grid(100.0), 1.74)]
    if task.kind == "nonlinear":
        return [Variant("mlp", "mlp", None, grid(1.0), 0.0037),
                Variant("naive", "raw", None, grid(1.0), 0.0154)]
    return []


def concat_features(obs_BTS, window: int, xp=jnp):
    """z_t = [s_t, s_{t-1}, ..., s_{t-window+1}] with s_{t'} = 0 for t' < 1, shape [B, T, window * n_s]."""
    t = obs_BTS.shape[1]
    padded = xp.pad(obs_BTS, ((0, 0), (window - 1, 0), (0, 0)))
    return xp.concatenate([padded[:, window - 1 - j: window - 1 - j + t] for j in range(window)], axis=-1)


def mlp_features(task: TaskSpec, obs_BTS: jax.Array) -> jax.Array:
    """f*(s_t) for every position: tasks.teacher_features (the unit-norm MLP* output) of the nonlinear task."""
    if task.kind != "nonlinear":
        raise MesaError(f"prop2: MLP* features exist on the nonlinear task only, not on '{task.kind}'")
    return jax.vmap(jax.vmap(lambda s: tasks.teacher_features(task, s)))(obs_BTS)


def feature_map(task: TaskSpec, obs_BTS: jax.Array, kind: str, window: int | None = None) -> jax.Array:
    """The solver's input features phi(s_t), shape [B, T, F] (see the module docstring)."""
    if kind == "raw":
        return obs_BTS
    if kind == "concat":
        if window is None or window < 1:
            raise MesaError(f"prop2: concatenated features need a window of at least 1 observation, got {window}")
        return concat_features(obs_BTS, window)
    if kind == "mlp":
        return mlp_features(task, obs_BTS)
    raise MesaError(f"prop2: unknown features '{kind}' (choose from {', '.join(FEATURES)})")


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


def chebyshev_solve(matvec, norm, v, alphas: Sequence[float], betas: Sequence[float]):
    """Inv_k(A) v from the product u -> A u and ||A||_F (``norm``, broadcastable against v): every X_k and term_k
    of ``chebyshev_inverse`` is a polynomial in A, so its recursions carry over to the vectors X_k v and term_k v
    (one product with A per step)."""
    x = x_prev = term = v
    for k in range(len(alphas)):
        term = term - (alphas[k] / norm) * matvec(term)
        x, x_prev = x + term + betas[k] * (x - x_prev), x
    return x / norm


def chebyshev_apply(a_NFF, v_NF, alphas: Sequence[float], betas: Sequence[float], xp=jnp):
    """Inv_k(A) v for a stack of matrices A, equal to chebyshev_inverse(A) @ v."""
    norm = xp.sqrt(xp.sum(a_NFF**2, axis=(-2, -1)))[..., None]
    return chebyshev_solve(lambda u: xp.einsum("...ij,...j->...i", a_NFF, u), norm, v_NF, alphas, betas)


def neumann_inverse(a_NSS, steps: int, xp=jnp):
    """The truncated Neumann series: alpha = 1, beta = 0."""
    return chebyshev_inverse(a_NSS, [1.0] * steps, [0.0] * steps, xp=xp)


def chebyshev_preconditioned(obs_BTS: np.ndarray, lam: float, alphas, betas) -> np.ndarray:
    """Inv_k(S_{t-1} S_{t-1}^T + lam I) s_t in float64 (the paper's probe target ii)."""
    a = context_gram(obs_BTS, lam)
    return chebyshev_apply(a, np.asarray(obs_BTS, np.float64), alphas, betas, xp=np)


def _pair_system(phi_BTF, lam: float, current_pair: bool, xp):
    """The solvers' regression at every position t: the inputs x_{t'} = phi_{t'-1} (phi_0 = 0), the causal mask
    [t, t'] of the pairs of position t ([C]'s t' <= t - 1; t' <= t with ``current_pair``), u_t -> A_t u_t and
    ||A_t||_F [B, T, 1] for A_t = X X^T + lam I over those pairs, without the [T, F, F] Gram stack:
    A_t u = sum_{t'} x_{t'} (x_{t'} . u) + lam u is a causally masked product with X (as linear attention), and
    ||A_t||_F^2 = sum_{t1, t2} (x_{t1} . x_{t2})^2 + 2 lam sum_{t'} ||x_{t'}||^2 + lam^2 F (sums over the pairs of
    position t).  ``xp`` is jax.numpy (float32, differentiable) or numpy (float64)."""
    x = xp.pad(phi_BTF, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    t = phi_BTF.shape[1]
    causal = xp.tril(xp.ones((t, t), phi_BTF.dtype), 0 if current_pair else -1)

    def matvec(u_BTF):  # A_t u_t at every position t
        return xp.einsum("bts,bsf->btf", xp.einsum("btf,bsf->bts", u_BTF, x) * causal, x) + lam * u_BTF

    def upto(v_BT):  # sums over the pairs of position t of per-pair terms
        total = xp.cumsum(v_BT, axis=1)
        return total if current_pair else xp.pad(total, ((0, 0), (1, 0)))[:, :-1]

    gram = xp.einsum("btf,bsf->bts", x, x)
    diag = xp.diagonal(gram, axis1=1, axis2=2)
    new_sq = 2 * xp.sum(xp.tril(gram**2, -1), axis=-1) + diag**2  # the terms that pair t' adds
    norm_sq = upto(new_sq) + 2 * lam * upto(diag) + lam**2 * phi_BTF.shape[-1]
    return x, causal, matvec, xp.sqrt(norm_sq)[..., None]


def _read_out(z_BTF, x_BTF, causal, obs_BTS, xp):
    """Y X^T z_t at every position: sum over the pairs (x_{t'}, s_{t'}) of position t of s_{t'} (x_{t'} . z_t)."""
    return xp.einsum("bts,bsi->bti", xp.einsum("btf,bsf->bts", z_BTF, x_BTF) * causal, obs_BTS)


def prop2_predictions(obs_BTS: jax.Array, alphas, betas, lam: float = LAMBDA_TRAIN,
                      features_BTF: jax.Array | None = None, current_pair: bool = False) -> jax.Array:
    """s^_{t+1} = Y X^T Inv_k(X X^T + lam I) phi_t with pairs (phi_{t'-1}, s_{t'}), t' <= t - 1 ([C]; t' <= t with
    ``current_pair``), phi_0 = 0 (float32, differentiable in alpha/beta); phi = ``features_BTF`` (default: s_t)."""
    phi = obs_BTS if features_BTF is None else features_BTF
    x, causal, matvec, norm = _pair_system(phi, lam, current_pair, jnp)
    return _read_out(chebyshev_solve(matvec, norm, phi, alphas, betas), x, causal, obs_BTS, jnp)


# ----------------------------------------------------------------------------- the best k-step solver
#
# Every Inv_k above is p(A') / ||A||_F with p a polynomial of degree <= k in A' = A / ||A||_F (alpha/beta only pick
# which one), and the predictions are linear in p.  So the next-token loss (paper Eq. 1) is a convex quadratic in
# p's coefficients: the degree-k polynomial of least loss has a closed form (least squares over k + 1 numbers), and
# no k-step Chebyshev or Neumann solver with the same pairs and lambda does better on the data it is fitted on.
# Basis: the shifted Chebyshev polynomials P_j(u) = T_j(2u - 1), well conditioned on the spectrum (0, 1] of A'.

def polynomial_basis_predictions(obs_BTS, k: int, lam: float = LAMBDA_TRAIN, current_pair: bool = False
                                 ) -> np.ndarray:
    """[B, T, n_s, k + 1] (float64): Y X^T P_j(A'_t) s_t / ||A_t||_F for j = 0 .. k, over prop2_predictions'
    pairs (raw features).  The solver p = sum_j c_j P_j predicts this array times c."""
    obs = np.asarray(obs_BTS, np.float64)
    x, causal, matvec, norm = _pair_system(obs, lam, current_pair, np)

    def shifted(u):  # (2 A' - I) u
        return 2 * matvec(u) / norm - u

    z = [obs, shifted(obs)][:k + 1]  # P_0 s, P_1 s, then P_{j+1} = 2 (2A' - I) P_j - P_{j-1}
    while len(z) < k + 1:
        z.append(2 * shifted(z[-1]) - z[-2])
    return np.stack([_read_out(z_j / norm, x, causal, obs, np) for z_j in z], axis=-1)


def fit_best_polynomial(batches: list[tasks.Batch], k: int, lam: float = LAMBDA_TRAIN) -> tuple[np.ndarray, float]:
    """The coefficients c (in the P_j basis) of the degree-k solver of least next-token loss on ``batches`` (the
    normal equations, float64), and that loss."""
    gram, rhs, sq, rows = np.zeros((k + 1, k + 1)), np.zeros(k + 1), 0.0, 0
    for batch in batches:
        basis = polynomial_basis_predictions(batch.obs_BTS, k, lam)
        y = np.asarray(batch.targets_BTS, np.float64)
        gram += np.einsum("btsi,btsj->ij", basis, basis)
        rhs += np.einsum("btsi,bts->i", basis, y)
        sq, rows = sq + float(np.sum(y**2)), rows + y.shape[0] * y.shape[1]
    coefficients = np.linalg.solve(gram, rhs)
    return coefficients, 0.5 * (sq - float(rhs @ coefficients)) / rows  # Eq. 1 at the optimum


def chebyshev_polynomial(alphas: Sequence[float], betas: Sequence[float]) -> np.ndarray:
    """The coefficients in the P_j basis of the polynomial p with Inv_k(A) = p(A') / ||A||_F (``chebyshev_inverse``
    with these alpha/beta), length k + 1."""
    from numpy.polynomial import Polynomial, chebyshev

    if len(alphas) != len(betas):
        raise ValueError(f"{len(alphas)} alphas but {len(betas)} betas")
    u = Polynomial([0.0, 1.0])  # chebyshev_solve's recursion on polynomials in u = A' (A' v -> u p, ||A||_F = 1)
    p = chebyshev_solve(lambda q: q * u, 1.0, Polynomial([1.0]), alphas, betas)
    in_w = p(Polynomial([0.5, 0.5]))  # p(u) as a polynomial in w = 2u - 1
    coefficients = np.zeros(len(alphas) + 1)
    found = chebyshev.poly2cheb(in_w.coef)
    coefficients[:len(found)] = found
    return coefficients


# [C]'s recipe for alpha/beta (learn_parameters_chebyshev with src/optim.py's default Optimizer()): AdamW
# (weight decay 0.05) after elementwise clipping at 1, lr warmup-cosine 0 -> 3e-4 in 500 steps -> 1e-5 at
# 40k steps, batch 256 (the experiments' data.batch_size), alpha = 1, beta = 0 to start; 20k steps for 6 steps
# (the fully observed, partially observed and nonlinear solvers) and 80k for the 2-step solver of Softmax-3.
PAPER_LR, PAPER_WARMUP, PAPER_DECAY_STEPS, PAPER_END_LR = 3e-4, 500, 40_000, 1e-5
PAPER_WEIGHT_DECAY, PAPER_CLIP, PAPER_BATCH = 0.05, 1.0, 256


def paper_optimizer(lr: float = PAPER_LR) -> optax.GradientTransformation:
    """[C]'s optimiser for the solver coefficients (src/optim.py, Optimizer() with its defaults)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, PAPER_WARMUP, PAPER_DECAY_STEPS, PAPER_END_LR)
    return optax.chain(optax.clip(PAPER_CLIP), optax.adamw(schedule, weight_decay=PAPER_WEIGHT_DECAY))


def paper_train_steps(k: int) -> int:
    """[C]'s number of training steps for a k-step solver (run_probing_experiments_full_fledged.ipynb)."""
    return 80_000 if k == 2 else 20_000


def learn_coefficients(spec: Spec, k: int, *, momentum: bool, steps: int, lr: float = PAPER_LR,
                       batch_size: int = PAPER_BATCH, lam: float = LAMBDA_TRAIN, log_every: int = 100,
                       features: str = "raw", window: int | None = None, current_pair: bool = False):
    """alpha/beta of the k-step solver on ``features``, learned on its next-token loss (paper Eq. 1) with [C]'s
    recipe (``paper_optimizer``, lr = its peak); alpha_0 = 1, beta_0 = 0.

    momentum=False keeps beta = 0 (learned Neumann / Richardson step sizes).  Fresh batches every step
    from fold_in(PRNGKey(train.seed + 7777), step).  Returns (alphas, betas, [(step, loss)]).
    """
    params = {"alpha": jnp.ones((k,)), "beta": jnp.zeros((k,))}
    tx = paper_optimizer(lr)
    data_key = jax.random.PRNGKey(spec.train.seed + 7777)
    feature_map(spec.task, jnp.zeros((1, 1, spec.task.obs_dim)), features, window)  # a bad choice fails here

    def loss_fn(p, batch):
        beta = p["beta"] if momentum else jnp.zeros_like(p["beta"])
        phi = None if features == "raw" else feature_map(spec.task, batch.obs_BTS, features, window)
        pred = prop2_predictions(batch.obs_BTS, p["alpha"], beta, lam, phi, current_pair)
        return tasks.sequence_loss(pred, batch.targets_BTS)

    params, history = fit_on_fresh_batches(params, tx, loss_fn, spec, data_key, steps=steps, batch_size=batch_size,
                                           log_every=log_every)
    betas = params["beta"] if momentum else jnp.zeros((k,))
    return [float(a) for a in params["alpha"]], [float(b) for b in betas], history


@functools.partial(jax.jit, static_argnames=("task", "features", "window", "current_pair"))
def _predict(obs_BTS, alphas, betas, lam, task: TaskSpec, features: str, window: int | None, current_pair: bool):
    phi = None if features == "raw" else feature_map(task, obs_BTS, features, window)
    return prop2_predictions(obs_BTS, alphas, betas, lam, phi, current_pair)


def solver_predictions(batches: list[tasks.Batch], alphas, betas, lam: float = LAMBDA_TRAIN, *,
                       task: TaskSpec | None = None, features: str = "raw", window: int | None = None,
                       current_pair: bool = False) -> list[np.ndarray]:
    """The k-step solver's predictions on each batch ([B, T, n_s] each); features other than raw need the task."""
    a, b = jnp.asarray(alphas, jnp.float32), jnp.asarray(betas, jnp.float32)
    return [np.asarray(_predict(batch.obs_BTS, a, b, jnp.float32(lam), task if features != "raw" else None,
                                features, window, current_pair)) for batch in batches]


def ridge_pair_predictions(obs_BTS: np.ndarray, lam: float, features_BTF: np.ndarray | None = None,
                           current_pair: bool = False) -> np.ndarray:
    """Exact ridge LSQ (float64) over the solver's pairs: [C]'s LeastSquaresSequenceSolver with an exact inverse
    (pairs t' <= t - 1); with ``current_pair`` mesacli.baselines.ridge_predictions (t' <= t)."""
    s = np.asarray(obs_BTS, np.float64)
    phi = s if features_BTF is None else np.asarray(features_BTF, np.float64)
    if current_pair:
        return baselines.ridge_predictions(s, lam, features_BTF=phi)
    x = np.pad(phi, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # x_{t'} = phi_{t'-1}
    # sums over t' <= t - 1: the inclusive sums shifted by one position (none at t = 1)
    xx = np.pad(np.cumsum(np.einsum("bti,btj->btij", x, x), axis=1), ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
    yx = np.pad(np.cumsum(np.einsum("bti,btj->btij", s, x), axis=1), ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
    z = np.linalg.solve(xx + lam * np.eye(phi.shape[-1]), phi[..., None])[..., 0]
    return np.einsum("btij,btj->bti", yx, z)


def ridge_feature_predictions(batches: list[tasks.Batch], task: TaskSpec, variant: Variant, lam: float,
                              chunk: int = 32, current_pair: bool = False) -> list[np.ndarray]:
    """Exact ridge LSQ (float64, ``ridge_pair_predictions``) on the variant's features, ``chunk`` sequences at a
    time."""
    out = []
    for batch in batches:
        obs = np.asarray(batch.obs_BTS, np.float64)
        phi = np.asarray(feature_map(task, batch.obs_BTS, variant.features, variant.window), np.float64)
        out.append(np.concatenate([ridge_pair_predictions(obs[i:i + chunk], lam, phi[i:i + chunk], current_pair)
                                   for i in range(0, len(obs), chunk)]))
    return out


def line_search_lambda(batches: list[tasks.Batch], task: TaskSpec, variant: Variant, alphas, betas
                       ) -> tuple[float, list[float | None]]:
    """The lambda of ``variant.lambdas`` with the least sequence-averaged loss of the solver on ``batches``;
    returns (lambda, the loss of every grid value, None where the solver's predictions are not finite)."""
    losses = []
    for lam in variant.lambdas:
        preds = solver_predictions(batches, alphas, betas, lam, task=task, features=variant.features,
                                   window=variant.window)
        loss = float(np.mean(loss_curve(preds, batches)))
        losses.append(loss if np.isfinite(loss) else None)
    finite = [(loss, lam) for loss, lam in zip(losses, variant.lambdas, strict=True) if loss is not None]
    if not finite:
        raise MesaError(f"prop2 {variant.name}: the solver diverged at every lambda of {list(variant.lambdas)}")
    return min(finite)[1], losses


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


def model_curve_name(spec: Spec) -> str:
    """The model's curve name in the records ("model (7 layers)")."""
    layers = spec.model.layers
    return f"model ({layers} layer{'s' if layers > 1 else ''})"


def _model_curve(ctx: RunContext) -> tuple[str, np.ndarray]:
    from mesacli.evaluate import make_evaluator
    from mesacli.sharding import make_mesh

    return model_curve_name(ctx.spec), make_evaluator(ctx.spec, make_mesh())(ctx.params)


def solver_steps(ctx: RunContext) -> int:
    """k: the option prop2_k, by default one step fewer than the model has layers."""
    k = int(ctx.options.get("prop2_k", ctx.spec.model.layers - 1))
    if k < 0:
        raise MesaError(f"prop2: the number of solver steps k must be >= 0, got {k}")
    return k


def _settings(ctx: RunContext) -> tuple[int, int, float]:
    k = solver_steps(ctx)
    return (k, int(ctx.options.get("prop2_train_steps", paper_train_steps(k))),
            float(ctx.options.get("prop2_lr", PAPER_LR)))


SEARCH_BATCHES = 2  # lambda line search: the first batches of the GD-1 search set (512 sequences, as [C]'s opt_lamb)


def run(ctx: RunContext) -> dict:
    variants = variants_for(ctx.spec.task, int(ctx.options.get("prop2_window", PAPER_CONCAT_WINDOW)),
                            bool(ctx.options.get("prop2_lambda_search", False)))
    return _run_variants(ctx, variants) if variants else _run_raw(ctx)


def _curves_and_cosines(ctx, spec, batches, preds: dict, curves: dict, title: str) -> dict:
    """Adds each prediction's per-position loss to ``curves``, plots them (prop2_loss.png) and returns each
    prediction's cosine with the model's predictions ({} without a trained model)."""
    from mesacli.probe import figures

    curves.update({name: loss_curve(p, batches) for name, p in preds.items()})
    cosines = {}
    if ctx.params is not None:
        model_preds = model_predictions(ctx.params, spec, batches)
        cosines = {name: prediction_cosines(model_preds, p) for name, p in preds.items()}
    figures.loss_curves(curves, ctx.out_dir / "prop2_loss.png",
                        f"{spec.name}: {title}" + (" vs the model" if cosines else ""))
    return cosines


def learned_curve_name(k: int) -> str:
    """The learned k-step Chebyshev solver's curve name in the prop2 records of the fully observed tasks."""
    return f"Chebyshev k={k} (learned alpha, beta)"


def raw_predictions(batches: list[tasks.Batch], k: int, learned: tuple | None, lam: float, eta: float
                    ) -> dict[str, list[np.ndarray]]:
    """The fully observed task's solvers on s_t, by curve name: GD-1 with step ``eta``, k Neumann steps, k
    Chebyshev steps with the ``learned`` (alphas, betas) (None: not learned), the paper's 6-step coefficients when
    k = 6, and exact ridge LSQ over [C]'s pairs, all at ridge ``lam``."""
    obs = [np.asarray(b.obs_BTS) for b in batches]
    preds = {f"GD-1 (eta={eta:.4f}, line-searched)": [baselines.gd1_predictions(o, eta) for o in obs],
             f"Neumann k={k} (alpha=1)": solver_predictions(batches, [1.0] * k, [0.0] * k, lam)}
    if learned is not None:
        preds[learned_curve_name(k)] = solver_predictions(batches, *learned, lam)
    if k == 6:
        preds["Chebyshev k=6 (paper's alpha, beta)"] = solver_predictions(batches, *PAPER_CHEBYSHEV_LINEAR, lam)
    preds[f"exact ridge LSQ (lam={lam:g})"] = [ridge_pair_predictions(o, lam) for o in obs]
    return preds


def variant_predictions(batches: list[tasks.Batch], task: TaskSpec, found: dict[str, dict]
                        ) -> dict[str, list[np.ndarray]]:
    """The partially observed / nonlinear task's baselines, by curve name: for each variant record of ``found``
    (name -> its features, window, lambda, alpha, beta and curve names), the solver and exact ridge LSQ on its
    features."""
    preds = {}
    for name, v in found.items():
        variant = Variant(name, v["features"], v["window"], (v["lambda"],))
        preds[v["curve"]] = solver_predictions(batches, v["alpha"], v["beta"], v["lambda"], task=task,
                                               features=v["features"], window=v["window"])
        preds[v["ridge_curve"]] = ridge_feature_predictions(batches, task, variant, v["lambda"])
    return preds


def _run_raw(ctx: RunContext) -> dict:
    """Fully observed linear tasks: GD-1, Neumann (alpha = 1) and learned Chebyshev solvers on s_t at
    lambda = 1e-3, exact ridge LSQ over the solvers' pairs."""
    from mesacli.probe import figures

    spec = ctx.spec
    layers = spec.model.layers
    k, steps, lr = _settings(ctx)
    lam = LAMBDA_TRAIN
    curves = dict([_model_curve(ctx)]) if ctx.params is not None else {}
    if k > 0 and steps > 0:
        ctx.say(f"prop2: learning {k}-step Chebyshev alpha/beta ({steps} AdamW steps, [C]'s recipe)")
        a_c, b_c, hist_c = learn_coefficients(spec, k, momentum=True, steps=steps, lr=lr, lam=lam,
                                              log_every=max(1, steps // 50))
    else:  # k = 0: Inv_0(A) = I / ||A||_F has no coefficients (a GD step with a normalised learning rate)
        a_c, b_c, hist_c = [1.0] * k, [0.0] * k, []
    batches = test_batches(spec)
    eta = baselines.gd1_search_eta(spec)
    preds = raw_predictions(batches, k, (a_c, b_c) if hist_c else None, lam, eta)
    cosines = _curves_and_cosines(ctx, spec, batches, preds, curves, f"Proposition-2 solvers (k={k} steps)")
    if hist_c:
        figures.steps_curves({"Chebyshev (learned alpha, beta)": tuple(map(np.array, zip(*hist_c, strict=True)))},
                             ctx.out_dir / "prop2_training.png", f"{spec.name}: learning the solver coefficients")
    else:  # nothing learned: no training figure (nor an older one)
        (ctx.out_dir / "prop2_training.png").unlink(missing_ok=True)
    return {
        "analysis": "prop2",
        "step": ctx.step,
        "model_free": ctx.params is None,
        "features": "raw",
        "k": k,
        "model_layers": layers,
        "train_steps": steps,
        "lr": lr,
        "lambda": lam,
        "pairs": PAIRS_NOTE,
        "learned": {"chebyshev": {"alpha": a_c, "beta": b_c}},
        "history": {"chebyshev": hist_c},  # [(step, training loss)]
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
                           "(20k AdamW steps; 80k for the 2-step solver)"},
        "notes": f"alpha/beta learned with [C]'s recipe for {steps} steps (AdamW, lr warmup-cosine peak {lr:g}, "
                 "batch 256); the solvers and the exact ridge LSQ use [C]'s pairs (one fewer than L_t; GD-1 keeps "
                 "the current pair, as [C]'s GDSequenceSolver); test losses and prediction cosines on the spec's "
                 "fixed test batches; GD-1's eta line-searched on separate batches (as mesacli eval).",
    }


def _run_variants(ctx: RunContext, variants: list[Variant]) -> dict:
    """Partially observed / nonlinear tasks: the paper's Prop-2 baselines (``variants_for``), each with alpha/beta
    learned on its features and lambda line-searched, plus exact ridge LSQ on the same features and lambda."""
    from mesacli.probe import figures

    spec, task = ctx.spec, ctx.spec.task
    k, steps, lr = _settings(ctx)
    batches = test_batches(spec)
    search = test_batches(spec, seed_offset=1)[:SEARCH_BATCHES]
    curves = dict([_model_curve(ctx)]) if ctx.params is not None else {}
    found, histories = {}, {}
    # As [C]: alpha/beta learned once, on the first baseline's informative features (concatenated observations /
    # MLP* features), and reused for the naive baseline on s_t.
    first = variants[0]
    paper = PAPER_CHEBYSHEV_BY_TASK.get(task.kind) if k == 6 else None
    if k > 0 and steps > 0:
        ctx.say(f"prop2: learning {k}-step Chebyshev alpha/beta on {first.describe()} ({steps} AdamW steps, "
                "[C]'s recipe)")
        alphas, betas, history = learn_coefficients(spec, k, momentum=True, steps=steps, lr=lr, lam=LAMBDA_TRAIN,
                                                    log_every=max(1, steps // 50), features=first.features,
                                                    window=first.window)
        source = "learned"
    elif paper is not None:  # no training steps: [C]'s coefficients for this task
        (alphas, betas), history, source = map(list, paper), [], "[C]'s"
    else:
        alphas, betas, history, source = [1.0] * k, [0.0] * k, [], "Neumann"
    histories[first.name] = history
    for v in variants:
        ctx.say(f"prop2 {v.name}: line search of lambda over {list(v.lambdas)}")
        lam, search_losses = line_search_lambda(search, task, v, alphas, betas)
        label = f"Prop-2 {v.name}: Chebyshev k={k} on {v.describe()} (lam={lam:g})"
        ridge_label = f"exact ridge LSQ, {v.name}: on {v.describe()} (lam={lam:g})"
        found[v.name] = {"features": v.features, "window": v.window, "lambda": lam, "lambda_grid": list(v.lambdas),
                         "lambda_search_loss": search_losses, "alpha": alphas, "beta": betas,
                         "coefficients": source, "coefficients_from": first.name, "curve": label,
                         "ridge_curve": ridge_label, "paper_t50": v.paper_t50}
    preds = variant_predictions(batches, task, found)
    cosines = _curves_and_cosines(ctx, spec, batches, preds, curves, f"Proposition-2 baselines (k={k} steps)")
    if any(histories.values()):
        figures.steps_curves({name: tuple(map(np.array, zip(*h, strict=True))) for name, h in histories.items() if h},
                             ctx.out_dir / "prop2_training.png", f"{spec.name}: learning the solver coefficients")
    else:  # nothing learned: no training figure (nor an older one)
        (ctx.out_dir / "prop2_training.png").unlink(missing_ok=True)
    n_search = sum(len(b.obs_BTS) for b in search)
    return {
        "analysis": "prop2",
        "step": ctx.step,
        "model_free": ctx.params is None,
        "k": k,
        "model_layers": spec.model.layers,
        "train_steps": steps,
        "lr": lr,
        "lambda_train": LAMBDA_TRAIN,
        "lambda_search_sequences": n_search,
        "pairs": PAIRS_NOTE,
        "variants": found,
        "history": histories,  # [(step, training loss)] of the learned alpha/beta (by the variant they were learned on)
        "seq_avg_loss": {name: float(np.mean(c)) for name, c in curves.items()},
        "per_position_loss": {name: np.asarray(c).tolist() for name, c in curves.items()},
        "prediction_cosine": {name: {"mean": float(c[1:].mean()), "per_position": c.tolist()}
                              for name, c in cosines.items()},
        "paper": {"claim": "Fig. 7B/C, t = 50: Prop-2 on 16 concatenated observations 0.135 and naive Prop-2 on "
                           "s_t 1.74 (partially observed); Prop-2 on the MLP* features 0.0037 and naive linear Prop-2 "
                           "0.0154 (nonlinear); [C]'s stored curves are at lambda = 1e-3 (its notebook names lambda = "
                           "10, line-searched, for the partially observed task)"},
        "coefficients": source,
        "notes": (f"alpha/beta learned on the {first.name} features with [C]'s recipe for {steps} steps (AdamW, lr "
                  f"warmup-cosine peak {lr:g}, batch 256) at lambda = {LAMBDA_TRAIN:g}" if source == "learned" else
                  f"alpha/beta: {source} (no training steps)") + " and reused for every baseline (as [C]); "
                 + (f"lambda line-searched with them on {n_search} sequences separate from the test batches (as "
                    "[C]'s opt_lamb, on a log grid)" if any(len(v.lambdas) > 1 for v in variants) else
                    f"lambda = {LAMBDA_TRAIN:g}, as [C]'s stored curves (prop2_lambda_search: line-searched)")
                 + "; [C]'s pairs (one fewer than L_t), also for the exact ridge LSQ; the target is s_{t+1} ([C]'s "
                 "MLP* baseline regresses s_{t+1}/||s_{t+1}||).",
    }


def _figures(r: dict) -> str:
    learned = any(r.get("history", {}).values())
    return "prop2_loss.png, prop2_training.png" if learned else "prop2_loss.png"


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    if "variants" in r:
        return _variant_summary(r)
    lines = [f"k = {r['k']} solver steps vs the {r['model_layers']}-layer model; alpha/beta learned for "
             f"{r['train_steps']} AdamW steps with [C]'s recipe (paper: 20k; 80k for 2 steps); [C]'s pairs.", "",
             "| model / solver | seq.-avg test loss | cosine(model, solver predictions), mean over t >= 2 |",
             "|---|---|---|"]
    cosines = r.get("prediction_cosine", {})
    lines += [f"| {name} | {fmt(v)} | {fmt(cosines[name]['mean'], 3) if name in cosines else '-'} |"
              for name, v in r["seq_avg_loss"].items()]
    lines += ["", f"Learned Chebyshev alpha = {[round(a, 3) for a in r['learned']['chebyshev']['alpha']]}, "
                  f"beta = {[round(b, 3) for b in r['learned']['chebyshev']['beta']]}.",
              f"Paper: {r['paper']['claim']}.", "", f"Figures: {_figures(r)}."]
    return lines


def _variant_summary(r: dict) -> list[str]:
    curves = r["per_position_loss"]
    last = len(next(iter(curves.values())))
    source = r.get("coefficients", "learned")
    how = (f"learned once for {r['train_steps']} AdamW steps ([C]'s recipe) at lambda = {r['lambda_train']:g} "
           "(paper: 20k)" if source == "learned" else f"{source} (not learned here)")
    searched = any(len(v["lambda_grid"]) > 1 for v in r["variants"].values())
    lam = (f"lambda line-searched on {r['lambda_search_sequences']} separate sequences" if searched else
           f"lambda = {r['lambda_train']:g} as [C]'s stored curves")
    lines = [f"k = {r['k']} Chebyshev steps; alpha/beta {how}, reused for every baseline; {lam}; [C]'s pairs.", "",
             f"| baseline | features | lambda | loss t={last} | seq.-avg | exact ridge t={last} | paper t=50 |",
             "|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        what = {"raw": "s_t", "concat": f"{v['window']} concatenated s", "mlp": "MLP*(s)"}[v["features"]]
        lines.append(f"| {name} | {what} | {v['lambda']:g} | {fmt(curves[v['curve']][-1])} | "
                     f"{fmt(float(np.mean(curves[v['curve']])))} | {fmt(curves[v['ridge_curve']][-1])} | "
                     f"{fmt(v['paper_t50'])} |")
    model = [name for name in curves if name.startswith("model")]
    if model:
        lines += ["", f"{model[0]}: t={last} {fmt(curves[model[0]][-1])}, seq.-avg {fmt(r['seq_avg_loss'][model[0]])}."]
    lines += ["", f"Paper: {r['paper']['claim']}.", "", f"Figures: {_figures(r)}."]
    return lines


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    if "variants" in r:
        curves = r["per_position_loss"]
        return "; ".join(f"{name} (lam={v['lambda']:g}) t={len(curves[v['curve']])} {curves[v['curve']][-1]:.4f}"
                         for name, v in r["variants"].items())
    return "; ".join(f"{k} {v:.4f}" for k, v in r["seq_avg_loss"].items())
