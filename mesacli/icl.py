"""Few-shot in-context regression with a frozen next-token model (paper-spec section 5; paper Fig. 8/18).

A prompt lives in observation space R^{n_s}: s_1..s_L = [P_1..P_P, x_1, y_1, (EOS), x_2, y_2, (EOS), ...], cut
back to the model's ``seq_len``, and is turned into model tokens by ``tasks.make_tokens`` (raw or constructed).
Labels y_i = W* x_i + 0.01 eps with a Haar-orthogonal W* per prompt (the task sampler's code), x_i ~ U(-1, 1)^n
(authors' code [C], the default) or N(0, I) (paper [P]).  The model's prediction for y_i is its next-token
prediction at the x_i position; the metric is 1/2 ||y_i - f(prompt up to x_i)||^2 per example i.

Baselines (numpy, float64) on the same (x, y) data:
- autoregressive ridge LSQ on all consecutive pairs of the plain prompt [x_1, y_1, x_2, ...], including the
  spurious (y_i -> x_{i+1}) pairs (the paper's "LSQ control"); its early bump is dominated by a few nearly
  singular prompts, so the median over prompts is reported beside the mean;
- proper ridge LSQ on the pairs (x_j, y_j), j < i;
- one-step GD from W = 0 on the pairs (x_j, y_j), j < i, with one line-searched learning rate eta.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mesacli import model, tasks
from mesacli.errors import MesaError
from mesacli.spec import Spec, TaskSpec

PROMPT_KINDS = ("plain", "eos", "tuned")
X_DISTS = ("uniform", "normal")
LABEL_NOISE = 0.01
# Randomness streams: fold_in(fold_in(PRNGKey(seed), tag), index); eval, tuning and eta search never overlap.
KEY_TAGS = {"eval": 101, "tune": 102, "search": 103, "init": 104}
REPORT_EXAMPLES = (1, 5, 10, 20, 40, 68)


def icl_key(purpose: str, seed: int, index: int | jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), KEY_TAGS[purpose]), index)


# ----------------------------------------------------------------------------- prompt layout


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """Where things sit in a prompt of ``length`` observation vectors (0-based positions).

    prefix P_k at k (k < prefix_len); example i (0-based) starts at prefix_len + stride * i with x_i, then y_i, then
    EOS if ``eos``.  The model's prediction for y_i is read at the x_i position.
    """

    n_examples: int
    eos: bool
    prefix_len: int
    length: int  # after cutting back to seq_len

    @property
    def stride(self) -> int:
        return 3 if self.eos else 2

    @property
    def x_positions(self) -> np.ndarray:
        return self.prefix_len + self.stride * np.arange(self.n_examples)

    @property
    def y_positions(self) -> np.ndarray:
        return self.x_positions + 1

    @property
    def eos_positions(self) -> np.ndarray:
        return self.x_positions + 2 if self.eos else np.zeros(0, dtype=int)


def max_examples(seq_len: int, eos: bool, prefix_len: int) -> int:
    """Examples whose x_i position fits in the context: P + stride * (i - 1) < T."""
    return max(0, math.ceil((seq_len - prefix_len) / (3 if eos else 2)))


def make_layout(seq_len: int, n_examples: int | None, eos: bool, prefix_len: int = 0) -> PromptLayout:
    """The layout of ``n_examples`` examples (None: as many as fit), cut back to ``seq_len``."""
    most = max_examples(seq_len, eos, prefix_len)
    what = f"{'EOS' if eos else 'plain'} prompts" + (f" with a {prefix_len}-token prefix" if prefix_len else "")
    if most == 0:
        raise MesaError(f"the model's context (seq_len {seq_len}) has no room for an example after a "
                        f"{prefix_len}-token prefix; use a shorter --prefix-len")
    if n_examples is None:
        n_examples = most
    if n_examples < 1 or n_examples > most:
        raise MesaError(f"the model's context (seq_len {seq_len}) holds at most {most} examples for {what}; "
                        f"asked for {n_examples}")
    stride = 3 if eos else 2
    return PromptLayout(n_examples, eos, prefix_len, min(seq_len, prefix_len + stride * n_examples))


def check_task_hosts_prompt(task: TaskSpec) -> int:
    """n_s if the run's task can host (x, y) regression prompts in its observation space, else MesaError."""
    if task.kind == "partial" or task.obs_dim != task.state_dim:
        raise MesaError(f"task kind '{task.kind}' observes obs_dim={task.obs_dim} of state_dim={task.state_dim}: "
                        f"in-context regression needs x and y of one size, the observation size of a fully "
                        f"observed task")
    return task.obs_dim


def build_prompt(x_BNS: jax.Array, y_BNS: jax.Array, layout: PromptLayout, eos_S: jax.Array | None = None,
                 prefix_PS: jax.Array | None = None) -> jax.Array:
    """Observation sequence s_BLS = [prefix, x_1, y_1, (EOS), x_2, ...][:length]; differentiable in EOS/prefix."""
    b, n, s = x_BNS.shape
    if n != layout.n_examples:
        raise ValueError(f"layout is for {layout.n_examples} examples, got {n}")
    parts = [x_BNS, y_BNS]
    if layout.eos:
        if eos_S is None:
            raise ValueError("an EOS layout needs an EOS vector")
        parts.append(jnp.broadcast_to(jnp.asarray(eos_S, x_BNS.dtype), x_BNS.shape))
    seq_BLS = jnp.stack(parts, axis=2).reshape(b, n * layout.stride, s)
    if layout.prefix_len:
        if prefix_PS is None or prefix_PS.shape != (layout.prefix_len, s):
            raise ValueError(f"a prefix layout needs a prefix of shape ({layout.prefix_len}, {s})")
        prefix_BPS = jnp.broadcast_to(jnp.asarray(prefix_PS, x_BNS.dtype), (b, layout.prefix_len, s))
        seq_BLS = jnp.concatenate([prefix_BPS, seq_BLS], axis=1)
    return seq_BLS[:, : layout.length]


# ----------------------------------------------------------------------------- data


@partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def sample_regression(key: jax.Array, n: int, n_examples: int, batch: int, x_dist: str = "uniform",
                      switch_at: int | None = None) -> tuple[jax.Array, jax.Array]:
    """x ~ U(-1, 1)^n [C] or N(0, I) [P]; y_i = W* x_i + 0.01 eps, W* Haar-orthogonal per prompt.

    ``switch_at`` = K: examples K+1.. use a second, independent W* (the continual two-task setting).
    """
    if x_dist not in X_DISTS:
        raise MesaError(f"--x-dist: '{x_dist}' is not one of {', '.join(X_DISTS)}")
    key_x, key_w1, key_w2, key_noise = jax.random.split(key, 4)
    teacher_task = TaskSpec(kind="linear", state_dim=n, obs_dim=n)

    def orthogonal(k):
        return jax.vmap(lambda kk: tasks.sample_teacher(kk, teacher_task).w_HH)(jax.random.split(k, batch))

    if x_dist == "uniform":
        x = jax.random.uniform(key_x, (batch, n_examples, n), minval=-1.0, maxval=1.0)
    else:
        x = jax.random.normal(key_x, (batch, n_examples, n))
    w1 = orthogonal(key_w1)
    y = jnp.einsum("bij,bnj->bni", w1, x)
    if switch_at is not None:
        y2 = jnp.einsum("bij,bnj->bni", orthogonal(key_w2), x)
        y = jnp.where((jnp.arange(n_examples) < switch_at)[None, :, None], y, y2)
    return x, y + LABEL_NOISE * jax.random.normal(key_noise, y.shape)


# ----------------------------------------------------------------------------- the model on prompts


def label_losses_BN(params: Any, spec: Spec, layout: PromptLayout, x_BNS, y_BNS, eos_S=None, prefix_PS=None):
    """1/2 ||y_i - f(prompt up to x_i)||^2 per prompt and example, [B, N] (differentiable in EOS and prefix)."""
    obs = build_prompt(x_BNS, y_BNS, layout, eos_S, prefix_PS)
    pred_BLS, _ = model.apply(params, tasks.make_tokens(spec.task, obs), spec)
    pred_BNS = pred_BLS[:, layout.x_positions]
    return 0.5 * jnp.sum((pred_BNS - y_BNS) ** 2, axis=-1)


@lru_cache(maxsize=16)
def _jitted_losses(spec: Spec, layout: PromptLayout):
    return jax.jit(lambda params, x, y, eos, prefix: label_losses_BN(params, spec, layout, x, y, eos, prefix))


def model_losses_BN(params, spec: Spec, layout: PromptLayout, x_BNS, y_BNS, eos_S=None, prefix_PS=None) -> np.ndarray:
    return np.asarray(_jitted_losses(spec, layout)(params, x_BNS, y_BNS, eos_S, prefix_PS), np.float64)


# ----------------------------------------------------------------------------- baselines (float64)


def interleave(x_BNS: np.ndarray, y_BNS: np.ndarray) -> np.ndarray:
    """The plain prompt [x_1, y_1, x_2, y_2, ...] as [B, 2N, S]."""
    b, n, s = x_BNS.shape
    return np.stack([x_BNS, y_BNS], axis=2).reshape(b, 2 * n, s)


def ar_ridge_predictions(x_BNS: np.ndarray, y_BNS: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """The autoregressive LSQ control: at x_i, Phi = sum s_t s_{t-1}^T (sum s_{t-1} s_{t-1}^T + lam I)^{-1} over all
    consecutive pairs of the plain prompt up to x_i ((x_j, y_j) for j < i and (y_j, x_{j+1}) for j < i); y^_i = Phi x_i.
    """
    from mesacli.baselines import ridge_predictions

    seq = interleave(np.asarray(x_BNS, np.float64), np.asarray(y_BNS, np.float64))
    return ridge_predictions(seq, lam)[:, 0::2]


def _cumulative_before(m_BNIJ: np.ndarray) -> np.ndarray:
    """sum_{j < i} m_j along axis 1 (exclusive prefix sum)."""
    c = np.cumsum(m_BNIJ, axis=1)
    return np.concatenate([np.zeros_like(c[:, :1]), c[:, :-1]], axis=1)


def ridge_xy_predictions(x_BNS: np.ndarray, y_BNS: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """Proper ridge regression on the pairs (x_j, y_j), j < i: W^_i = Y X^T (X X^T + lam I)^{-1}; y^_i = W^_i x_i."""
    x, y = np.asarray(x_BNS, np.float64), np.asarray(y_BNS, np.float64)
    n = x.shape[-1]
    xx = _cumulative_before(np.einsum("bni,bnj->bnij", x, x)) + lam * np.eye(n)
    yx = _cumulative_before(np.einsum("bni,bnj->bnij", y, x))
    z = np.linalg.solve(xx, x[..., None])[..., 0]
    return np.einsum("bnij,bnj->bni", yx, z)


def gd1_direction(x_BNS: np.ndarray, y_BNS: np.ndarray) -> np.ndarray:
    """g_i = sum_{j<i} y_j x_j^T x_i: one GD step from W = 0 on 1/2 sum ||y_j - W x_j||^2 predicts eta g_i."""
    x, y = np.asarray(x_BNS, np.float64), np.asarray(y_BNS, np.float64)
    scores_BNN = np.tril(np.einsum("bis,bjs->bij", x, x), k=-1)  # x_i . x_j for j < i
    return np.einsum("bij,bjs->bis", scores_BNN, y)


def gd1_line_search(x_BNS: np.ndarray, y_BNS: np.ndarray) -> float:
    """The eta minimising sum_{b,i} ||y_i - eta g_i||^2 (quadratic in eta): eta* = <y, g> / <g, g>."""
    g = gd1_direction(x_BNS, y_BNS)
    return float(np.sum(g * np.asarray(y_BNS, np.float64)) / np.sum(g * g))


def losses_BN(pred_BNS: np.ndarray, y_BNS: np.ndarray) -> np.ndarray:
    return 0.5 * np.sum((np.asarray(pred_BNS, np.float64) - np.asarray(y_BNS, np.float64)) ** 2, axis=-1)


# ----------------------------------------------------------------------------- icl-eval


@dataclasses.dataclass
class IclReport:
    spec: Spec
    step: int
    n_examples: int
    curves: dict[str, dict[str, list[float]]]  # name -> {"mean", "std" over seeds, optional "median"}
    model_curves: tuple[str, ...]
    meta: dict
    json_path: Path | None = None
    plot_path: Path | None = None


def prompt_names(prompts: str) -> list[str]:
    names = [p.strip() for p in prompts.split(",") if p.strip()]
    for name in names:
        if name not in PROMPT_KINDS:
            raise MesaError(f"--prompt: '{name}' is not one of {', '.join(PROMPT_KINDS)} (or a comma-separated list)")
    if not names:
        raise MesaError("--prompt: give plain, eos or tuned")
    return list(dict.fromkeys(names))


def check_tuned_on_step(tuned: dict, stage: str, at_step: int, run_dir: Path) -> None:
    """MesaError unless the tuned ``stage`` tokens (from ``prompt_tune.load_tuned``) were tuned on model checkpoint
    ``at_step``: tokens tuned on another checkpoint (e.g. before the run trained further) are not that model's."""
    tuned_on = tuned.get(f"{stage}_model_step")
    if tuned_on != at_step:
        what = "EOS" if stage == "eos" else "prefix"
        raise MesaError(f"the tuned {what} in {run_dir}/prompt_tune was tuned on model step {tuned_on}, "
                        f"but this evaluates step {at_step}: pass --step {tuned_on}, or delete {run_dir}/prompt_tune "
                        f"and run `mesacli prompt-tune {run_dir}` again")


def _seed_stats(per_seed: list[np.ndarray]) -> dict[str, list[float]]:
    arr = np.asarray(per_seed)
    return {"mean": arr.mean(0).tolist(), "std": arr.std(0).tolist()}


def icl_eval(run_dir: str | Path, prompts: str = "plain", *, n_examples: int | None = None, seeds: int = 5,
             batch: int = 128, lam: float = 1e-3, continual: bool = False, switch_at: int | None = None,
             x_dist: str = "uniform", data_seed: int = 0, step: int | None = None, write: bool = True) -> IclReport:
    """Per-example label loss of the frozen model on the chosen prompt kinds and of the baselines, mean and std over
    ``seeds`` data seeds of ``batch`` prompts each; writes RUN_DIR/icl_eval_<prompts>[_continual][_lam..]
    [_xnormal][_step..].json/.png."""
    from mesacli.prompt_tune import load_tuned
    from mesacli.spec import load_spec
    from mesacli.train import SPEC_FILE, load_params, replicas

    run_dir = Path(run_dir)
    names = prompt_names(prompts)
    for value, what in [(seeds, "--seeds"), (batch, "--batch")]:
        if value < 1:
            raise MesaError(f"{what} must be at least 1, got {value}")
    if lam <= 0:
        raise MesaError(f"--lam must be positive (the early LSQ systems are singular without it), got {lam}")
    if x_dist not in X_DISTS:
        raise MesaError(f"--x-dist: '{x_dist}' is not one of {', '.join(X_DISTS)}")
    if not (run_dir / SPEC_FILE).exists():
        raise MesaError(f"{run_dir} is not a mesacli run directory (no {SPEC_FILE})")
    n_s = check_task_hosts_prompt(load_spec(run_dir / SPEC_FILE).task)  # before any JAX work
    spec, params, at_step = load_params(run_dir, step)
    members = replicas(spec, params)  # a run trained with train.seeds = S: every replica is evaluated
    seq_len = spec.task.seq_len

    # The tokens of each prompt kind: plain; EOS (tuned if one was tuned, else the zero vector); tuned EOS + prefix.
    # A multi-seed run has tuned tokens per replica (prompt_tune/seed<k>/).
    def prompt_setups(tuned: dict) -> tuple[dict[str, tuple[str, Any, Any, int]], dict[str, str]]:
        setups, sources = {}, {}
        for name in names:
            if name == "plain":
                setups[name] = ("model (plain)", None, None, 0)
            elif name == "eos":
                eos = tuned.get("eos")
                if eos is not None:
                    check_tuned_on_step(tuned, "eos", at_step, run_dir)
                sources["eos"] = "tuned" if eos is not None else "zero vector (no tuned EOS in this run)"
                setups[name] = ("model (EOS)" if eos is not None else "model (zero EOS)",
                                eos if eos is not None else np.zeros(n_s, np.float32), None, 0)
            else:
                if tuned.get("prefix") is None:
                    raise MesaError(f"no tuned prefix in {run_dir}: run `mesacli prompt-tune {run_dir} --what both` "
                                    f"first")
                check_tuned_on_step(tuned, "prefix", at_step, run_dir)
                sources["tuned"] = f"tuned EOS + tuned {len(tuned['prefix'])}-token prefix"
                setups[name] = ("model (EOS+prefix)", tuned["prefix_eos"], tuned["prefix"], len(tuned["prefix"]))
        return setups, sources

    member_results = {seed: prompt_setups(load_tuned(run_dir, n_s, seed if len(members) > 1 else None))
                      for seed, _ in members}
    member_setups = {seed: result[0] for seed, result in member_results.items()}
    setups, sources = member_results[members[0][0]]  # the first replica's kinds name the curves
    for seed, other in member_setups.items():
        if [(v[0], v[3]) for v in other.values()] != [(v[0], v[3]) for v in setups.values()]:
            raise MesaError(f"the replicas of {run_dir} were prompt-tuned differently (seed {seed}); "
                            f"run `mesacli prompt-tune {run_dir}` so that every replica has the same tokens' kinds")
    layouts = {}
    if n_examples is None:  # as many as every chosen prompt kind can hold
        n_examples = min(max_examples(seq_len, name != "plain", setups[name][3]) for name in names)
    for name in names:
        layouts[name] = make_layout(seq_len, n_examples, name != "plain", setups[name][3])
    if continual or switch_at is not None:  # --switch-at implies the continual setting
        switch_at = max(1, round(n_examples * 21 / 68)) if switch_at is None else switch_at
        if not 1 <= switch_at < n_examples:
            raise MesaError(f"--switch-at must lie in 1..{n_examples - 1}, got {switch_at}")
    else:
        switch_at = None

    # eta of GD-1: line-searched once on separate prompts (never the test prompts).
    xs, ys = sample_regression(icl_key("search", data_seed, 0), n_s, n_examples, max(batch, 256), x_dist, switch_at)
    eta = gd1_line_search(np.asarray(xs), np.asarray(ys))

    per_seed: dict[str, list[np.ndarray]] = {}
    per_replica: dict[str, dict[int, list[np.ndarray]]] = {}
    medians: dict[str, list[np.ndarray]] = {}
    model_names = []
    ar_name = f"AR ridge LSQ, all token pairs (lam={lam:g})"
    for k in range(seeds):
        x, y = sample_regression(icl_key("eval", data_seed, k), n_s, n_examples, batch, x_dist, switch_at)
        xn, yn = np.asarray(x), np.asarray(y)
        for name in names:
            label = setups[name][0]
            if label not in model_names:
                model_names.append(label)
            for replica_seed, replica_params in members:
                _, eos, prefix, _ = member_setups[replica_seed][name]
                losses = model_losses_BN(replica_params, spec, layouts[name], x, y, eos, prefix)
                per_seed.setdefault(label, []).append(losses.mean(0))
                per_replica.setdefault(label, {}).setdefault(replica_seed, []).append(losses.mean(0))
        baseline_losses = {
            ar_name: losses_BN(ar_ridge_predictions(xn, yn, lam), yn),
            f"ridge LSQ on (x, y) pairs (lam={lam:g})": losses_BN(ridge_xy_predictions(xn, yn, lam), yn),
            f"GD-1 on (x, y) pairs (eta={eta:.4f})": losses_BN(eta * gd1_direction(xn, yn), yn),
        }
        for label, losses in baseline_losses.items():
            per_seed.setdefault(label, []).append(losses.mean(0))
            medians.setdefault(label, []).append(np.median(losses, axis=0))
    curves = {label: _seed_stats(values) for label, values in per_seed.items()}
    for label, values in medians.items():
        curves[label]["median"] = np.mean(values, axis=0).tolist()
    if len(members) > 1:  # model curves: mean/std over replicas x data seeds, and each replica's mean
        for label, by_seed in per_replica.items():
            curves[label]["per_replica"] = {str(s): np.mean(v, axis=0).tolist() for s, v in by_seed.items()}
    meta = {
        "run_dir": str(run_dir), "step": at_step, "spec": spec.name, "seq_len": seq_len, "n_s": n_s,
        "prompts": names, "eos_source": sources, "n_examples": n_examples, "seeds": seeds, "batch": batch,
        "lam": lam, "gd1_eta": eta, "x_dist": x_dist, "x_dist_source": "[C] U(-1,1)" if x_dist == "uniform" else
        "[P] N(0,I)", "label_noise": LABEL_NOISE, "continual_switch_at": switch_at, "data_seed": data_seed,
        "step_given": step is not None, "replica_seeds": [s for s, _ in members],
        "metric": "1/2 ||y_i - f(prompt up to x_i)||^2, mean over prompts; mean/std over data seeds; median = "
                  "median over prompts, averaged over seeds",
        "baselines_on": "the same (x, y) data; the AR ridge control on the plain prompt [x1, y1, x2, ...]",
        "layouts": {name: {"eos": lay.eos, "prefix_len": lay.prefix_len, "length": lay.length,
                           "x_positions": lay.x_positions.tolist()} for name, lay in layouts.items()},
    }
    report = IclReport(spec, at_step, n_examples, curves, tuple(model_names), meta)
    if write:
        write_report(report, run_dir)
    return report


def write_report(report: IclReport, run_dir: Path) -> None:
    from mesacli import plots
    from mesacli.checkpoint import dump_json

    meta = report.meta
    tag = "_".join(meta["prompts"]) + ("_continual" if meta["continual_switch_at"] else "")
    tag += (f"_lam{meta['lam']:g}" if meta["lam"] != 1e-3 else "") + ("_xnormal" if meta["x_dist"] == "normal" else "")
    tag += f"_step{report.step}" if meta.get("step_given") else ""
    report.json_path = run_dir / f"icl_eval_{tag}.json"
    report.plot_path = run_dir / f"icl_eval_{tag}.png"
    dump_json(report.json_path, {"meta": report.meta, "curves": report.curves})
    title = (f"{report.spec.name} @ {report.step}: in-context regression, {report.meta['seeds']} seeds x "
             f"{report.meta['batch']} prompts" + (f"\ntask switch (new W*) after example {meta['continual_switch_at']}"
                                                   if meta["continual_switch_at"] else ""))
    plots.icl_plot(report.curves, report.plot_path, title=title, dashed=tuple(
        k for k in report.curves if k not in report.model_curves), switch_at=meta["continual_switch_at"])
