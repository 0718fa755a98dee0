"""In-context regression prompts: randomness streams, the prompt layout, sampling the (x, y) data, the model's loss.

A prompt lives in observation space R^{n_s}: s_1..s_L = [P_1..P_P, x_1, y_1, (EOS), x_2, y_2, (EOS), ...], cut
back to the model's ``seq_len``, and is turned into model tokens by ``tasks.make_tokens`` (raw or constructed).
Labels y_i = W* x_i + 0.01 eps with a Haar-orthogonal W* per prompt (the task sampler's code), x_i ~ U(-1, 1)^n
(authors' code [C], the default) or N(0, I) (paper [P]).  The model's prediction for y_i is its next-token
prediction at the x_i position; the metric is 1/2 ||y_i - f(prompt up to x_i)||^2 per example i.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mesacli import model, tasks
from mesacli.errors import MesaError
from mesacli.spec import Spec, TaskSpec

X_DISTS = ("uniform", "normal")
LABEL_NOISE = 0.01
# Randomness streams: fold_in(fold_in(PRNGKey(seed), tag), index); eval, tuning and eta search never overlap.
KEY_TAGS = {"eval": 101, "tune": 102, "search": 103, "init": 104}


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

    if x_dist == "uniform":
        x = jax.random.uniform(key_x, (batch, n_examples, n), minval=-1.0, maxval=1.0)
    else:
        x = jax.random.normal(key_x, (batch, n_examples, n))
    # Both teachers of the continual setting come from ONE batched QR (LAPACK) call: two independent ones run at
    # once on XLA:CPU's intra-op pool, each blocks a worker waiting for its batch split on that same pool, and
    # with two workers (a 2-core machine) nothing is left to run the split: a deadlock.  Each W* is unchanged.
    keys = jax.random.split(key_w1, batch)
    if switch_at is not None:
        keys = jnp.concatenate([keys, jax.random.split(key_w2, batch)])
    w = jax.vmap(lambda kk: tasks.sample_teacher(kk, teacher_task).w_HH)(keys)
    y = jnp.einsum("bij,bnj->bni", w[:batch], x)
    if switch_at is not None:
        y2 = jnp.einsum("bij,bnj->bni", w[batch:], x)
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
