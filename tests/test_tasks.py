"""Synthetic task statistics: teachers, noise level, initial states, token layout, loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesacli import tasks
from mesacli.spec import TaskSpec, spec_from_dict


@functools.partial(jax.jit, static_argnums=(0, 1))
def sequences(task: TaskSpec, n: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return jax.vmap(lambda k: tasks.sample_sequence(k, task))(keys)


def test_teacher_is_a_fresh_orthogonal_matrix_per_sequence():
    teachers, _ = sequences(TaskSpec(), 200)
    w = np.asarray(teachers.w_HH, np.float64)
    eye = np.broadcast_to(np.eye(10), w.shape)
    np.testing.assert_allclose(w @ np.swapaxes(w, 1, 2), eye, atol=2e-5)
    assert np.abs(w[0] - w[1]).max() > 0.1  # different per sequence
    # Haar: entries have mean 0 and variance 1/n
    assert abs(w.mean()) < 0.01
    assert w.var() == pytest.approx(0.1, rel=0.05)
    # both orientations occur (det +1 and -1) for the Haar measure on O(n)
    dets = np.linalg.det(w)
    assert 0.3 < np.mean(dets > 0) < 0.7


def test_noise_level_and_initial_state():
    task = TaskSpec()
    teachers, s = sequences(task, 256)
    s = np.asarray(s, np.float64)
    w = np.asarray(teachers.w_HH, np.float64)
    resid = s[:, 1:] - np.einsum("bij,btj->bti", w, s[:, :-1])
    assert resid.std() == pytest.approx(0.01, rel=0.03)
    assert abs(resid.mean()) < 1e-3
    h1 = s[:, 0]
    assert np.abs(h1).max() <= 1.0 and h1.var() == pytest.approx(1 / 3, rel=0.1)  # U(-1, 1)
    assert s.shape == (256, task.seq_len + 1, 10)
    _, s_normal = sequences(TaskSpec(init_dist="normal"), 256)
    assert np.asarray(s_normal)[:, 0].var() == pytest.approx(1.0, rel=0.1)
    assert np.abs(np.asarray(s_normal)[:, 0]).max() > 1.5


def test_partially_observed():
    task = TaskSpec(kind="partial", state_dim=15, obs_dim=5, obs_noise=0.01)
    teachers, s = sequences(task, 64)
    assert s.shape == (64, task.seq_len + 1, 5)
    c = np.asarray(teachers.c_SH)
    assert c.shape == (64, 5, 15) and c.std() == pytest.approx(0.5, rel=0.1)
    assert np.abs(c[0] - c[1]).max() > 0.1


def test_contracting_eigenvalues_and_clip():
    task = TaskSpec(kind="contracting")
    teachers, s = sequences(task, 64)
    eig = np.abs(np.linalg.eigvals(np.asarray(teachers.w_HH, np.float64)))
    assert eig.min() > 0.3 - 1e-3 and eig.max() < 0.9 + 1e-3
    np.testing.assert_allclose(eig.max(axis=1), 0.9, atol=1e-3)  # one eigenvalue fixed at the top
    assert np.abs(np.asarray(s)).max() <= 2.0


def test_a_nearly_singular_contracting_teacher_gives_a_finite_clipped_sequence():
    """One draw of U in ~10^5 overflows float32 in U diag(lambda) U^-1; the batch of step 850 of the shipped
    contracting_lsa1 spec holds one, which made a NaN and stopped its training."""
    from mesacli.spec import load_spec
    from mesacli.spec_loader import EXPERIMENTS_DIR

    spec = load_spec(EXPERIMENTS_DIR / "contracting_lsa1.yaml")
    batch = tasks.sample_batch(tasks.train_batch_key(spec, 850), spec, spec.train.batch_size)
    for array in (batch.tokens_BTI, batch.targets_BTS):
        assert np.isfinite(np.asarray(array)).all() and np.abs(np.asarray(array)).max() <= 2.0
    singular = jnp.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]])  # inv: inf / NaN entries
    w = tasks.contracting_teacher(singular, jnp.array([0.3, 0.5, 0.9]))
    assert not np.isnan(np.asarray(w)).any()


def test_fixed_teacher_is_shared():
    teachers, _ = sequences(TaskSpec(kind="fixed_teacher"), 4)
    w = np.asarray(teachers.w_HH)
    np.testing.assert_array_equal(w[0], w[3])
    np.testing.assert_allclose(w[0], np.asarray(jax.random.orthogonal(jax.random.PRNGKey(42), 10)))


def test_nonlinear_transition():
    task = TaskSpec(kind="nonlinear", init_scale=0.25)
    teachers, s = sequences(task, 32)
    s = np.asarray(s, np.float64)
    assert np.abs(s[:, 0]).max() <= 0.25
    feats = jax.jit(jax.vmap(jax.vmap(lambda h: tasks.teacher_features(task, h))))(jnp.asarray(s[:, :-1], jnp.float32))
    feats = np.asarray(feats, np.float64)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)  # unit-norm MLP output
    resid = s[:, 1:] - np.einsum("bij,btj->bti", np.asarray(teachers.w_HH), feats)
    assert resid.std() == pytest.approx(0.01, rel=0.05)


def _legacy_threefry_normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """numpy transcription of jax.random.normal(PRNGKey(seed), shape, float32) as JAX < 0.5 computed it (threefry
    random bits without the partitionable layout): key (seed >> 32, seed & 0xffffffff); the bits of n numbers are
    threefry2x32(key, [0..n-1] padded to even length and split in halves x0 | x1), output out0 | out1; uniform
    u = bits >> 9 | 0x3f800000 read as float, minus 1, mapped to [nextafter(-1, 0), 1); normal = sqrt(2) erfinv(u)."""
    from scipy.special import erfinv

    n = int(np.prod(shape))
    k0, k1 = np.uint32(seed >> 32), np.uint32(seed & 0xFFFFFFFF)
    ks = [k0, k1, np.uint32(k0 ^ k1 ^ np.uint32(0x1BD11BDA))]
    count = np.arange(n + n % 2, dtype=np.uint32)
    x = [count[: len(count) // 2].copy(), count[len(count) // 2:].copy()]
    rotations = [(13, 15, 26, 6), (17, 29, 16, 24)]

    def rounds(rot):
        for r in rot:
            x[0] = x[0] + x[1]
            x[1] = (x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))
            x[1] = x[0] ^ x[1]

    with np.errstate(over="ignore"):
        x[0] = x[0] + ks[0]
        x[1] = x[1] + ks[1]
        for i in range(5):
            rounds(rotations[i % 2])
            x[0] = x[0] + ks[(i + 1) % 3]
            x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
    bits = np.concatenate(x)[:n]
    u = ((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.0)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = np.maximum(lo, u * (np.float32(1.0) - lo) + lo)
    return (np.sqrt(2.0) * erfinv(u.astype(np.float64))).reshape(shape)


def test_legacy_normal_is_the_pre_0_5_jax_stream_whatever_the_default():
    """The numpy transcription reproduces a value JAX's own quickstart printed with JAX < 0.5
    (random.normal(PRNGKey(0), (10,))), and tasks.legacy_normal matches it under either threefry layout default."""
    quickstart = [-0.3721109, 0.26423115, -0.18252768, -0.7368197, -0.44030377,
                  -0.1521442, -0.67135346, -0.5908641, 0.73168886, 0.5673026]
    np.testing.assert_allclose(_legacy_threefry_normal(0, (10,)), quickstart, rtol=1e-6, atol=1e-6)
    default = jax.config.jax_threefry_partitionable
    try:
        for partitionable in (True, False):
            jax.config.update("jax_threefry_partitionable", partitionable)
            tasks.legacy_normal.cache_clear()
            np.testing.assert_allclose(tasks.legacy_normal(421, (10, 40)), _legacy_threefry_normal(421, (10, 40)),
                                       rtol=1e-5, atol=1e-6)
    finally:
        jax.config.update("jax_threefry_partitionable", default)
        tasks.legacy_normal.cache_clear()


def test_nonlinear_teacher_mlp_is_the_authors():
    """MLP*(h) = GELU_tanh(h^T A') B' with A' = 1.1 N(0, 1) [n_h, n_m] from PRNGKey(421) and B' [n_m, n_h] from
    PRNGKey(422), as the authors' data generator draws and applies them (paper-spec 1), in float64 numpy.  The
    normals are the authors' JAX stream (pre-0.5 threefry layout, numpy transcription above), not this JAX's
    default one: with the latter, e.g. exact ridge LSQ on s_t gives 0.021 at t = 50 instead of 0.015 (Fig. 7C)."""
    task = TaskSpec(kind="nonlinear")
    a_auth = 1.1 * _legacy_threefry_normal(421, (10, 40))
    b_auth = 1.1 * _legacy_threefry_normal(422, (40, 10))
    h = np.random.default_rng(0).uniform(-1, 1, size=(8, 10))
    x = h @ a_auth
    m = (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))) @ b_auth
    want = m / np.linalg.norm(m, axis=-1, keepdims=True)
    got = jax.vmap(lambda v: tasks.teacher_features(task, v))(jnp.asarray(h, jnp.float32))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5)


def test_constructed_tokens_layout_and_mask():
    spec = spec_from_dict({"task": {"token_format": "constructed", "seq_len": 6}})
    batch = tasks.sample_batch(jax.random.PRNGKey(0), spec, 3)
    obs, tok = np.asarray(batch.obs_BTS), np.asarray(batch.tokens_BTI)
    assert tok.shape == (3, 6, 40)
    np.testing.assert_array_equal(tok[..., :10], 0)
    np.testing.assert_array_equal(tok[..., 10:20], obs)
    np.testing.assert_array_equal(tok[..., 20:30], obs)
    np.testing.assert_array_equal(tok[:, 1:, 30:], obs[:, :-1])
    np.testing.assert_array_equal(tok[:, 0, 30:], 0)  # s_0 = 0
    np.testing.assert_array_equal(np.asarray(batch.targets_BTS)[:, :-1], obs[:, 1:])  # targets are s_{t+1}
    masked = spec_from_dict({"task": {"token_format": "constructed", "seq_len": 6, "mask_slots": [0, 1]}})
    tok_m = np.asarray(tasks.sample_batch(jax.random.PRNGKey(0), masked, 3).tokens_BTI)
    np.testing.assert_array_equal(tok_m[..., :20], 0)
    np.testing.assert_array_equal(tok_m[..., 20:], tok[..., 20:])


def test_batches_are_pure_functions_of_the_key():
    spec = spec_from_dict({})
    a = tasks.sample_batch(tasks.train_batch_key(spec, 7), spec, 4)
    b = tasks.sample_batch(tasks.train_batch_key(spec, 7), spec, 4)
    c = tasks.sample_batch(tasks.train_batch_key(spec, 8), spec, 4)
    np.testing.assert_array_equal(a.tokens_BTI, b.tokens_BTI)
    assert np.abs(np.asarray(a.tokens_BTI) - np.asarray(c.tokens_BTI)).max() > 0


def test_loss_is_half_squared_error_summed_over_dims():
    pred = jnp.zeros((2, 3, 4))
    target = jnp.ones((2, 3, 4)).at[1].set(3.0)
    np.testing.assert_allclose(tasks.per_position_loss(pred, target), [0.5 * (4 + 36) / 2] * 3)
    assert float(tasks.sequence_loss(pred, target)) == pytest.approx(10.0)


def test_first_position_loss_of_the_zero_predictor():
    """With h_1 ~ U(-1, 1) and orthogonal W*, E 1/2 ||s_2||^2 = 1/2 * 10 / 3 ~ 1.667 (paper-spec: t=1 loss 1.675)."""
    spec = spec_from_dict({})
    batch = jax.jit(tasks.sample_batch, static_argnums=(1, 2))(jax.random.PRNGKey(3), spec, 2048)
    curve = np.asarray(tasks.per_position_loss(jnp.zeros_like(batch.targets_BTS), batch.targets_BTS))
    assert curve[0] == pytest.approx(10 / 6 + 0.5 * 10 * 1e-4, rel=0.03)
