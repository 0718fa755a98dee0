"""Synthetic sequence tasks (paper-spec section 1), generated on device and stateless.

Every batch is a pure function of a PRNG key; training uses ``fold_in(data_key, step)``, evaluation
``fold_in(PRNGKey(eval_seed), i)``.  A new teacher W* (and C*) is drawn for every sequence.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mesacli.errors import MesaError
from mesacli.spec import Spec, TaskSpec


class Batch(NamedTuple):
    tokens_BTI: jax.Array  # model inputs e_1..e_T
    targets_BTS: jax.Array  # s_2..s_{T+1}
    obs_BTS: jax.Array  # s_1..s_T (the raw observations behind the tokens)


class Teacher(NamedTuple):
    """One sequence's generative model: h' = W f(h) + noise, s = C h + noise."""

    w_HH: jax.Array
    c_SH: jax.Array


@functools.cache
def legacy_normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """jax.random.normal(PRNGKey(seed), shape) (float32) as JAX drew it before 0.5.0, whatever this JAX's default.

    JAX 0.5.0 turned ``jax_threefry_partitionable`` on, which lays the threefry counters out differently: the same
    key now gives other numbers for any non-scalar shape.  A fixed draw taken from the authors' code (which predates
    it) must be drawn in the old layout to be their draw.  Computed eagerly (also when called under jit/vmap)."""
    with jax.ensure_compile_time_eval(), jax.threefry_partitionable(False):
        out = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape))
    out.setflags(write=False)
    return out


def nonlinear_mlp_weights(task: TaskSpec) -> tuple[jax.Array, jax.Array]:
    """The fixed teacher MLP* of the nonlinear task: A (n_m x n_h) and B (n_h x n_m), so that MLP*(h) = B GELU(A h).

    Drawn as the authors' code draws them (paper-spec 1): A^T = mlp_scale N(0, 1) of shape [n_h, n_m] from
    PRNGKey(mlp_seed) and B^T of shape [n_m, n_h] from PRNGKey(mlp_seed + 1), applied there as GELU(h^T A^T) B^T.
    The normals are those of the authors' JAX (legacy_normal: the pre-0.5 threefry layout); this JAX's default
    layout gives another teacher, on which e.g. exact ridge LSQ on s_t reaches 0.021 instead of 0.015 at t = 50."""
    a_t = task.mlp_scale * jnp.asarray(legacy_normal(task.mlp_seed, (task.state_dim, task.mlp_hidden)))
    b_t = task.mlp_scale * jnp.asarray(legacy_normal(task.mlp_seed + 1, (task.mlp_hidden, task.state_dim)))
    return a_t.T, b_t.T


def teacher_features(task: TaskSpec, h_H: jax.Array) -> jax.Array:
    """f*(h): identity, or the unit-norm teacher MLP output B GELU(A h) / ||.|| for the nonlinear task (GELU in
    its tanh form, jax.nn.gelu's default, as in the authors' code)."""
    if task.kind != "nonlinear":
        return h_H
    a, b = nonlinear_mlp_weights(task)
    m = b @ jax.nn.gelu(a @ h_H, approximate=True)
    return m / jnp.linalg.norm(m)


def contracting_teacher(u_HH: jax.Array, eig_H: jax.Array) -> jax.Array:
    """W = U diag(lambda) U^-1 (App. E.1).  A nearly singular U (about one draw in 10^5) overflows float32 in
    U^-1: W is kept free of NaN (its huge entries only push the states to the clip), else one NaN sequence
    ends a training run."""
    return jnp.nan_to_num(u_HH @ jnp.diag(eig_H) @ jnp.linalg.inv(u_HH), nan=0.0)


def sample_teacher(key: jax.Array, task: TaskSpec) -> Teacher:
    n = task.state_dim
    key_w, key_c, key_eig, key_perm = jax.random.split(key, 4)
    if task.kind == "fixed_teacher":
        w = jax.random.orthogonal(jax.random.PRNGKey(task.teacher_seed), n)
    elif task.kind == "contracting":
        # W = U diag(lambda) U^{-1}: 9 eigenvalues ~ U[low, high] plus one at high, in random order.
        eig = jax.random.uniform(key_eig, (n,), minval=task.eig_low, maxval=task.eig_high).at[0].set(task.eig_high)
        eig = jax.random.permutation(key_perm, eig)
        w = contracting_teacher(jax.random.normal(key_w, (n, n)), eig)
    else:
        w = jax.random.orthogonal(key_w, n)  # Haar-random orthogonal
    if task.kind == "partial":
        c = task.obs_matrix_std * jax.random.normal(key_c, (task.obs_dim, n))
    else:
        c = jnp.eye(n)
    return Teacher(w, c)


def sample_sequence(key: jax.Array, task: TaskSpec) -> tuple[Teacher, jax.Array]:
    """Observations s_1..s_{T+1} of one sequence, shape [T+1, n_s]."""
    key_teacher, key_h1, key_noise, key_obs = jax.random.split(key, 4)
    teacher = sample_teacher(key_teacher, task)
    n = task.state_dim
    clip = 2.0 if task.kind == "contracting" else task.state_clip
    if task.init_dist == "uniform":
        h1 = jax.random.uniform(key_h1, (n,), minval=-task.init_scale, maxval=task.init_scale)
    else:
        h1 = task.init_scale * jax.random.normal(key_h1, (n,))
    noise_TH = task.state_noise * jax.random.normal(key_noise, (task.seq_len, n))

    def transition(h, eps):
        h_next = teacher.w_HH @ teacher_features(task, h) + eps
        if task.kind == "contracting":  # +inf and -inf terms of a huge W sum to NaN: map it into the clip range
            h_next = jnp.nan_to_num(h_next, nan=0.0)
        h_next = jnp.clip(h_next, -clip, clip)
        return h_next, h_next

    _, h_rest = jax.lax.scan(transition, h1, noise_TH)
    h_all = jnp.concatenate([h1[None], h_rest], axis=0)  # [T+1, n_h]
    s_all = h_all @ teacher.c_SH.T
    if task.obs_noise > 0:
        s_all = s_all + task.obs_noise * jax.random.normal(key_obs, s_all.shape)
    return teacher, s_all


def make_tokens(task: TaskSpec, obs_BTS: jax.Array) -> jax.Array:
    """Raw tokens e_t = s_t, or constructed tokens e_t = [0, s_t, s_t, s_{t-1}] (s_0 = 0) with masked slots zeroed."""
    if task.token_format == "raw":
        return obs_BTS
    prev = jnp.pad(obs_BTS, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    slots = [jnp.zeros_like(obs_BTS), obs_BTS, obs_BTS, prev]
    slots = [jnp.zeros_like(s) if i in task.mask_slots else s for i, s in enumerate(slots)]
    return jnp.concatenate(slots, axis=-1)


def sample_batch(key: jax.Array, spec: Spec, batch_size: int) -> Batch:
    keys = jax.random.split(key, batch_size)
    _, s_all = jax.vmap(lambda k: sample_sequence(k, spec.task))(keys)
    obs = s_all[:, :-1]
    return Batch(make_tokens(spec.task, obs), s_all[:, 1:], obs)


def data_key(seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
    """The key of the training batch of ``step`` for ``seed``: fold_in(fold_in(PRNGKey(seed), 1), step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 1), step)


def train_batch_key(spec: Spec, step: int | jax.Array) -> jax.Array:
    return data_key(spec.train.seed, step)


def eval_batch_key(spec: Spec, index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(spec.train.eval_seed), index)


AUTHORS_TEST_SEEDS = (1, 11, 111, 1111, 11111)  # [C] sequenceloss_eval.py: one test batch per PRNGKey(seed)
# sequences per test batch, as found by reproducing the stored curves on these batches: GD-1 (eta 0.032) of
# Fig. 4C/D to 3 decimals at every listed t with 256 (not 128, 512 or 1024), [C]'s 6-step Prop-2 of Fig. 7C
# (0.0037 / 0.0154) and of Fig. 7B (0.135 / 1.74) with 512 (tests/test_probe_linprobe.py; for the partially
# observed task also run_model_comparisons.ipynb's test_batch_size=512)
AUTHORS_TEST_BATCH = {"linear": 256, "nonlinear": 512, "partial": 512}


def check_authors_test_batches(task: TaskSpec) -> None:
    """MesaError (one line) unless ``authors_test_batch`` covers ``task``: the linear, nonlinear and partially
    observed tasks with h_1 uniform, observation noise on the partially observed task only."""
    noisy = task.obs_noise and task.kind != "partial"
    if task.kind not in AUTHORS_TEST_BATCH or task.init_dist != "uniform" or noisy:
        raise MesaError(f"the authors' test batches are transcribed for the linear, nonlinear and partially observed "
                        f"tasks (h_1 uniform, observation noise on the partially observed task only), not task.kind "
                        f"{task.kind!r} (init_dist {task.init_dist!r}, obs_noise {task.obs_noise})")


def authors_test_batches(task: TaskSpec) -> list[Batch]:
    """The test batches of the paper's curves for ``task``: ``authors_test_batch`` of every AUTHORS_TEST_SEEDS."""
    return [authors_test_batch(task, seed) for seed in AUTHORS_TEST_SEEDS]


def authors_test_batch(task: TaskSpec, seed: int, batch_size: int | None = None) -> Batch:
    """The test batch the authors' code draws from PRNGKey(seed), with the random bits of jax < 0.5 (threefry
    layout before ``jax_threefry_partitionable``): their Linear/NonlinearSequenceDataGenerator.create_batch
    transcribed.  Linear: the key split 6 ways (W, h_1, noise = parts 1, 2, 3), h_{t+1} = clip(W h_t + eps);
    nonlinear: split 4 ways, h_{t+1} = W f*(h_t) + eps with f* the unit-norm teacher MLP (+1e-16), no clip.  W is
    Haar-orthogonal and h_1 ~ U(-init_scale, init_scale) per sequence; each sequence's noise keys are
    split(key_b, T + 1)[:-1].  Partially observed ([C] src/data/seq/linear_seq.py, the linear generator with
    eye_obs=False, obs_dim 5, data_dim 15): the linear branch's hidden states, then per sequence
    C = obs_matrix_std N(0, 1) [n_s, n_h] from part 5 and observation noise obs_noise N(0, 1) [B, T + 1, n_s] from
    part 4, s_t = C h_t + noise_t for t = 1 .. T + 1 (inputs s_1..s_T, targets s_2..s_{T+1}).  The paper's
    per-position curves are the mean over AUTHORS_TEST_SEEDS of batches of AUTHORS_TEST_BATCH[kind] sequences (the
    default): evaluating on them compares a model with the paper on the very test sequences of its figures."""
    check_authors_test_batches(task)
    n, batch_size = task.state_dim, batch_size or AUTHORS_TEST_BATCH[task.kind]
    with jax.threefry_partitionable(False):
        keys = jax.random.split(jax.random.PRNGKey(seed), 4 if task.kind == "nonlinear" else 6)
        w_BHH = jax.random.orthogonal(keys[1], n, shape=(batch_size,))
        h1_BH = jax.random.uniform(keys[2], (batch_size, n), minval=-task.init_scale, maxval=task.init_scale)

        def sequence(w_HH, h1_H, key):
            def step(h, k):
                eps = task.state_noise * jax.random.normal(k, (n,))
                if task.kind == "nonlinear":
                    a, b = nonlinear_mlp_weights(task)
                    m = b @ jax.nn.gelu(a @ h, approximate=True)
                    h = w_HH @ (m / (jnp.linalg.norm(m) + 1e-16)) + eps
                else:
                    h = jnp.clip(w_HH @ h + eps, -task.state_clip, task.state_clip)
                return h, h

            _, rest = jax.lax.scan(step, h1_H, jax.random.split(key, task.seq_len + 1)[:-1])
            return jnp.concatenate([h1_H[None], rest])

        states_BTH = jax.vmap(sequence)(w_BHH, h1_BH, jax.random.split(keys[3], batch_size))
        if task.kind == "partial":
            c_BSH = task.obs_matrix_std * jax.random.normal(keys[5], (batch_size, task.obs_dim, n))
            noise_BTS = task.obs_noise * jax.random.normal(keys[4], (batch_size, task.seq_len + 1, task.obs_dim))
            seq_BTS = jnp.einsum("bsh,bth->bts", c_BSH, states_BTH) + noise_BTS
        else:
            seq_BTS = states_BTH  # fully observed: s_t = h_t
    obs = seq_BTS[:, :-1]
    return Batch(make_tokens(task, obs), seq_BTS[:, 1:], obs)


def per_position_loss(pred_BTS: jax.Array, target_BTS: jax.Array) -> jax.Array:
    """Paper Eq. 1 without the time average: (1/2B) sum_b ||s_{t+1} - f_t||^2, shape [T]."""
    return 0.5 * jnp.mean(jnp.sum((pred_BTS - target_BTS) ** 2, axis=-1), axis=0)


def sequence_loss(pred_BTS: jax.Array, target_BTS: jax.Array) -> jax.Array:
    """Paper Eq. 1: half squared error summed over dimensions, averaged over batch and time."""
    return jnp.mean(per_position_loss(pred_BTS, target_BTS))


def eval_batches(spec: Spec, batch_size: int | None = None, sharding: NamedSharding | None = None
                 ) -> list[Batch]:
    """The fixed test batches: keys fold_in(PRNGKey(eval_seed), i), i < eval_batches (placed with
    ``sharding`` if given, e.g. over a mesh spanning several processes)."""
    size = batch_size or spec.train.batch_size
    sample = jax.jit(lambda key: sample_batch(key, spec, size), out_shardings=sharding)
    return [sample(eval_batch_key(spec, i)) for i in range(spec.train.eval_batches)]
