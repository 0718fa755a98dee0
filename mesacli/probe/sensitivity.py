"""Token binding over training (paper-spec 4.5, Fig. 2/3): how the first layer's output depends on past tokens.

For every checkpoint kept in the run, and positions t in {2, T/2, T} (the paper: 2, 25, 50 with T = 50),
the sensitivity of the layer-1 output (the residual stream after block 1) to each observation,

    sens(t, t') = mean over sequences of || d e^(1)_t / d s_{t'} ||_F,   t' = 1..t,

through the run's own token map (a constructed token holds s_t and s_{t-1}, so both get a direct path).
The paper records it every 100 steps over 3k training steps: train with ``--set train.checkpoint_every=100
--set train.keep_checkpoints=31`` to keep that many points; with the defaults only the last few checkpoints
exist.  Causality makes sens(t, t') = 0 for t' > t (tested).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mesacli import model, tasks
from mesacli.probe.common import RunContext, fmt, probe_batch
from mesacli.spec import Spec

TITLE = "Token binding over training"
DESCRIPTION = "token binding over training: ||d layer-1 output_t / d s_{t'}|| at every kept checkpoint"

SEQUENCES = 64  # sequences per checkpoint (Jacobians are [B, P, E, T, S])


def positions(seq_len: int) -> list[int]:
    """1-based positions t at which the sensitivity is recorded: 2, T/2 and T (paper: 2, 25, 50)."""
    return sorted({t for t in (2, seq_len // 2, seq_len) if 1 <= t <= seq_len})


@functools.lru_cache(maxsize=8)
def _layer1_jacobian(spec: Spec, at: tuple[int, ...]):
    """jit(params, obs_BTS -> d e^(1)_t / d s_{t'} [B, P, E, T, S]) for the 1-based positions ``at``."""
    index = np.asarray(at) - 1

    def layer1(params, obs_TS):
        _, aux = model.apply(params, tasks.make_tokens(spec.task, obs_TS[None]), spec)
        return aux["residual_LBTE"][1][0, index]  # [P, E]

    return jax.jit(jax.vmap(jax.jacrev(layer1, argnums=1), in_axes=(None, 0)))


def layer1_sensitivity(params, spec: Spec, obs_BTS: jax.Array, at: list[int]) -> np.ndarray:
    """sens [P, T]: mean over sequences of ||d e^(1)_t / d s_{t'}||_F for t in ``at`` (1-based), every t'."""
    jac_BPETS = np.asarray(_layer1_jacobian(spec, tuple(at))(params, obs_BTS), np.float64)
    return np.sqrt(np.sum(jac_BPETS**2, axis=(2, 4))).mean(axis=0)


def checkpoint_params(ctx: RunContext):
    """[(step, params)] of every checkpoint kept in the run (this replica's, for a multi-seed run)."""
    from mesacli.checkpoint import Checkpoints
    from mesacli.rundir import CHECKPOINT_DIR, replicas
    from mesacli.state import load_params

    ckpts = Checkpoints(ctx.run_dir / CHECKPOINT_DIR, keep=ctx.spec.train.keep_checkpoints, read_only=True)
    try:
        steps = [s for s in ckpts.all_steps() if s <= ctx.step]
    finally:
        ckpts.close()
    out = []
    for step in steps:
        spec, params, at = load_params(ctx.run_dir, step)
        out.append((at, dict(replicas(spec, params))[ctx.seed]))
    return out


def run(ctx: RunContext) -> dict:
    from mesacli.probe import figures

    spec = ctx.spec
    at = positions(spec.task.seq_len)
    batch = probe_batch(spec, 0, min(SEQUENCES, ctx.batch_size))
    history = []
    for step, params in checkpoint_params(ctx):
        ctx.say(f"sensitivity: checkpoint {step}")
        history.append((step, layer1_sensitivity(params, spec, batch.obs_BTS, at)))
    steps = [s for s, _ in history]
    sens_NPT = np.stack([s for _, s in history])
    figures.sensitivity_curves(steps, at, sens_NPT, ctx.out_dir / "sensitivity.png",
                               f"{spec.name}: ||d layer-1 output_t / d s_t'|| over training")
    last = sens_NPT[-1]
    return {
        "analysis": "sensitivity",
        "step": ctx.step,
        "checkpoints": steps,
        "positions": at,
        "sequences": int(batch.obs_BTS.shape[0]),
        # sensitivity[checkpoint][position][t' - 1]; zero for t' > t by causality
        "sensitivity": sens_NPT.tolist(),
        "final": {str(t): {"s_t": float(last[i, t - 1]), "s_(t-1)": float(last[i, t - 2]) if t > 1 else None,
                           "older_mean": float(last[i, : t - 2].mean()) if t > 2 else None}
                  for i, t in enumerate(at)},
        "paper": {"claim": "over training the first layer's output at t becomes sensitive mainly to s_t and s_(t-1) "
                           "(and a few more past tokens under partial observation), while older tokens stay small "
                           "(Fig. 2/3)"},
        "notes": f"one probe batch of {int(batch.obs_BTS.shape[0])} sequences (data seed 0); one point per kept "
                 "checkpoint (train with a small train.checkpoint_every and a large train.keep_checkpoints for a "
                 "curve).",
    }


def summary(r: dict) -> list[str]:
    """The markdown lines of this analysis in probe/summary.md."""
    lines = [f"Checkpoints: {', '.join(map(str, r['checkpoints']))} ({r['sequences']} sequences). At the last one:", "",
             "| t | to s_t | to s_(t-1) | to older tokens (mean) |", "|---|---|---|---|"]
    lines += [f"| {t} | {fmt(v['s_t'], 3)} | {fmt(v['s_(t-1)'], 3)} | {fmt(v['older_mean'], 3)} |"
              for t, v in r["final"].items()]
    lines += ["", f"Paper: {r['paper']['claim']}.", "", "Figure: sensitivity.png."]
    return lines


def headline(r: dict) -> str:
    """One line of key numbers for the `mesacli probe` table."""
    return "done"
