"""Training loop: loss decreases, checkpoints restore exactly, resume follows the same curve, NaN stops."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mesacli import tasks
from mesacli.checkpoint import Checkpoints
from mesacli.errors import MesaError
from mesacli.loop import TrainingDiverged, accumulated_value_and_grad
from mesacli.rundir import read_sessions
from mesacli.sharding import make_mesh
from mesacli.state import init_state, load_params, make_optimizer, make_schedule
from mesacli.train import loss_fn, make_train_step, train
from tests.conftest import tiny_spec


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_one_step_decreases_the_loss_on_its_batch():
    spec = tiny_spec(train={"lr": 1e-3})
    mesh = make_mesh()
    state = init_state(spec, mesh)
    batch = tasks.sample_batch(tasks.train_batch_key(spec, 0), spec, spec.train.batch_size)
    before = float(loss_fn(state["params"], batch, spec))
    new_state, metrics = make_train_step(spec, mesh)(state)
    after = float(loss_fn(new_state["params"], batch, spec))
    assert float(metrics["loss"]) == pytest.approx(before, rel=1e-5)  # the step used the batch of step 0
    assert after < before
    assert int(new_state["step"]) == 1


def test_accumulated_gradient_equals_the_full_batch_gradient():
    """(1/M) sum_m grad L_m over M = 4 micro-batches of 2 equals grad L of the batch of 8."""
    spec = tiny_spec(model={"first_layer": "softmax_pe"})
    params = init_state(spec, make_mesh())["params"]
    batch = tasks.sample_batch(tasks.train_batch_key(spec, 0), spec, 8)
    loss = lambda p, b: loss_fn(p, b, spec)  # noqa: E731
    value, grads = jax.value_and_grad(loss)(params, batch)
    acc_value, acc_grads = accumulated_value_and_grad(loss, params, batch, 2)
    assert float(acc_value) == pytest.approx(float(value), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(acc_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # micro-batch m holds rows m, m + 4: its loss is the loss of those rows
    rows = jax.tree.map(lambda x: x[np.array([1, 5])], batch)
    one = jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:])[:, 1], batch)
    assert float(loss(params, one)) == float(loss(params, rows))


@pytest.mark.parametrize("seeds", [1, 2])
def test_micro_batched_train_step_follows_the_full_batch_run(seeds):
    results = {}
    for micro in (None, 2):
        spec = tiny_spec(model={"first_layer": "softmax_pe"}, train={"micro_batch": micro, "seeds": seeds})
        mesh = make_mesh(replicas=seeds)
        state = init_state(spec, mesh)
        step = make_train_step(spec, mesh)
        for _ in range(3):
            state, metrics = step(state)
        results[micro] = (jax.device_get(state["params"]), np.asarray(metrics["loss"]))
    # Adam normalises each coordinate, so float-rounding differences of near-zero gradients reach ~1e-5
    # of the lr = 1e-2 steps: compare against the update size
    for a, b in zip(jax.tree_util.tree_leaves(results[None][0]), jax.tree_util.tree_leaves(results[2][0]),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(results[None][1], results[2][1], rtol=1e-5)


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(MesaError, match=r"train.micro_batch \(3\) must divide train.batch_size \(8\)"):
        tiny_spec(train={"micro_batch": 3})


def test_training_reduces_test_loss(tmp_path):
    # one teacher W* shared by all sequences: a tiny model can learn it in its weights within 60 steps
    spec = tiny_spec(task={"kind": "fixed_teacher"},
                     train={"steps": 60, "lr": 1e-2, "eval_every": 60, "checkpoint_every": 60, "log_every": 10})
    from mesacli.evaluate import make_evaluator

    initial = make_evaluator(spec, make_mesh())(init_state(spec, make_mesh())["params"]).mean()
    result = train(spec, tmp_path / "run", progress=False)
    assert result.eval_loss < 0.5 * initial
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["eval_loss"] == pytest.approx(result.eval_loss, rel=1e-5)
    # each line times its interval's steps: positive, and no more than the whole run's wall time per step
    assert all(0 < r["step_seconds"] <= result.seconds / 10 for r in rows)
    for name in ["spec.yaml", "eval_curve.json", "loss_per_position.png", "training_curve.png"]:
        assert (tmp_path / "run" / name).exists()
    curve = json.loads((tmp_path / "run" / "eval_curve.json").read_text())
    assert len(curve["per_position_loss"]) == spec.task.seq_len


def test_save_restore_equality(tmp_path):
    spec = tiny_spec()
    mesh = make_mesh()
    state = init_state(spec, mesh)
    step = make_train_step(spec, mesh)
    for _ in range(3):
        state, _ = step(state)
    ckpts = Checkpoints(tmp_path / "ckpt")
    ckpts.save(3, state, {"note": "x"})
    restored, meta = ckpts.restore(init_state(spec, mesh))
    ckpts.close()
    assert meta == {"note": "x"}
    assert_trees_equal(state, restored)


def test_compact_checkpoint_keeps_the_parameters_and_rounds_the_moments_to_bfloat16(tmp_path):
    spec = tiny_spec(model={"embed_dim": 64, "num_heads": 4, "key_size": 32})  # 66k parameters: arrays dominate
    mesh = make_mesh()
    state = init_state(spec, mesh)
    step = make_train_step(spec, mesh)
    for _ in range(3):
        state, _ = step(state)
    full, compact = Checkpoints(tmp_path / "full"), Checkpoints(tmp_path / "compact", moments_dtype="bfloat16")
    full.save(3, state, {"note": "x"})
    compact.save(3, state, {"note": "x"})
    restored, meta = compact.restore(init_state(spec, mesh))
    full.close(), compact.close()
    assert meta == {"note": "x", "moments_dtype": "bfloat16"}
    assert_trees_equal(state["params"], restored["params"])
    assert int(restored["step"]) == 3
    moments = [(a, b) for a, b in zip(jax.tree_util.tree_leaves(state["opt_state"]),
                                      jax.tree_util.tree_leaves(restored["opt_state"]), strict=True) if a.ndim > 0]
    assert moments and all(b.dtype == a.dtype == np.float32 for a, b in moments)
    for a, b in moments:  # each moment is its float32 value rounded to bfloat16 (8 significant bits)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a.astype(jax.numpy.bfloat16).astype(np.float32)))
    assert any(not np.array_equal(a, b) for a, b in moments), "the moments were not rounded"

    def array_bytes(d):  # the arrays' data files (Orbax's OCDBT store), not the fixed-size metadata
        return sum(f.stat().st_size for f in d.rglob("ocdbt.process_*/d/*") if f.is_file())
    # AdamW: parameters + two moments; bfloat16 moments make the arrays 4 + 2 + 2 bytes instead of 4 + 4 + 4
    assert 0 < array_bytes(tmp_path / "compact") < 0.75 * array_bytes(tmp_path / "full")


def test_training_resumes_from_a_compact_checkpoint_with_a_note(tmp_path):
    spec = tiny_spec()
    full = train(spec, tmp_path / "full", progress=False)
    part = train(spec, tmp_path / "resumed", progress=False, stop_at_step=3, moments_dtype="bfloat16")
    assert part.step == 3
    notes = []
    resumed = train(spec, tmp_path / "resumed", progress=False, moments_dtype="bfloat16", warn=notes.append)
    assert resumed.resumed_from == 3 and resumed.step == spec.train.steps
    assert len(notes) == 1 and "bfloat16" in notes[0] and "not bit-identical" in notes[0]
    # sessions.jsonl: one line per session that trained, with the steps and the machine that ran them
    sessions = read_sessions(tmp_path / "resumed")
    assert [(s["from_step"], s["to_step"], s["moments_dtype"]) for s in sessions] == \
        [(0, 3, "bfloat16"), (3, spec.train.steps, "bfloat16")]
    assert all(s["platform"] == jax.devices()[0].platform and s["devices"] == len(jax.devices())
               and s["device_kind"] == jax.devices()[0].device_kind and s["device"] == str(jax.devices()[0])
               and s["seconds"] > 0 and not s["interrupted"] and s["ended"] == "end" and s["date"].endswith("Z")
               for s in sessions)
    assert len({s["session"] for s in sessions}) == 2  # each session rewrote its own line at every checkpoint
    again = train(spec, tmp_path / "resumed", progress=False)  # nothing left to train: no session line
    assert again.step == spec.train.steps and len(read_sessions(tmp_path / "resumed")) == 2
    # the rounded moments change the steps after the resume only a little
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-3 * float(np.abs(a).max()) + 1e-6)


def test_unknown_moments_dtype_is_refused(tmp_path):
    with pytest.raises(MesaError, match="moments dtype"):
        Checkpoints(tmp_path / "x", moments_dtype="float8")


def test_resume_ends_with_the_same_parameters(tmp_path):
    spec = tiny_spec(model={"attention": "mesa"})
    full = train(spec, tmp_path / "full", progress=False)
    part = train(spec, tmp_path / "resumed", progress=False, stop_at_step=3)
    assert part.step == 3 and part.resumed_from is None
    resumed = train(spec, tmp_path / "resumed", progress=False)
    assert resumed.resumed_from == 3 and resumed.step == spec.train.steps
    assert_trees_equal(full.params, resumed.params)
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)), "no duplicated metric lines after resume"
    # the checkpoint metadata carries the resolved spec; load_params restores the final step
    spec_back, params, step = load_params(tmp_path / "resumed")
    assert spec_back == spec and step == spec.train.steps
    assert_trees_equal(params, full.params)


def test_a_longer_run_started_from_a_shorter_one_is_the_same_run(tmp_path):
    # steps 0..3 of a 6-step run are the 3-step run (schedule to decay_steps, data fold_in(seed, step)): starting
    # the 6-step run from the 3-step run's checkpoint ends where training 6 steps from scratch does
    recipe = {"schedule": "warmup_cosine", "warmup_steps": 2, "decay_steps": 10, "lr": 1e-3}
    longer = tiny_spec(train=dict(recipe, steps=6, eval_every=3))
    full = train(longer, tmp_path / "full", progress=False)
    train(tiny_spec(name="short", train=dict(recipe, steps=3)), tmp_path / "short", progress=False)
    extended = train(longer, tmp_path / "long", progress=False, start_from=tmp_path / "short")
    assert extended.resumed_from == 3 and extended.step == 6
    assert_trees_equal(full.params, extended.params)
    log = [json.loads(line)["step"] for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)) and log[0] == 1 and log[-1] == 6, "the short run's metric lines, then its own"
    ckpts = Checkpoints(tmp_path / "long" / "checkpoints", read_only=True)
    assert ckpts.restore_meta(3)["started_from"].endswith("short")
    ckpts.close()
    # provenance: the short run's session (steps 0-3, marked with its run), then the long run's own (3-6)
    sessions = read_sessions(tmp_path / "long")
    assert [(s["from_step"], s["to_step"], s.get("run")) for s in sessions] == [(0, 3, "short"), (3, 6, None)]
    # only a run of the same recipe with fewer steps may be the start
    with pytest.raises(MesaError, match=r"not a shorter run of this spec \(train.lr: 0.001 -> 0.002\)"):
        train(tiny_spec(train=dict(recipe, steps=6, lr=2e-3)), tmp_path / "other", progress=False,
              start_from=tmp_path / "short")
    with pytest.raises(MesaError, match="fewer"):
        train(tiny_spec(train=dict(recipe, steps=2)), tmp_path / "fewer", progress=False,
              start_from=tmp_path / "short")


def test_non_finite_loss_removes_the_checkpoint_whose_loss_was_not_finite(tmp_path):
    # a learning rate of 1e30 makes the parameters huge after one step and their loss overflow at step 2: the
    # checkpoint of step 1 holds finite parameters whose loss is not, so no checkpoint counts as good
    spec = tiny_spec(train={"lr": 1e30, "checkpoint_every": 1, "grad_clip": None, "weight_decay": 0.0})
    with pytest.raises(TrainingDiverged, match="at step 2; training stopped .no good checkpoint was saved"):
        train(spec, tmp_path / "run", progress=False)
    ckpts = Checkpoints(tmp_path / "run" / "checkpoints", read_only=True)
    assert ckpts.latest_step() is None
    ckpts.close()
    assert read_sessions(tmp_path / "run") == []  # the line written at step 1's checkpoint went with it


def test_run_dir_with_another_spec_is_refused(tmp_path):
    spec = tiny_spec(train={"steps": 2})
    train(spec, tmp_path / "run", progress=False)
    with pytest.raises(MesaError, match=r"different spec \(model.layers: 2 -> 3\)"):
        train(tiny_spec(train={"steps": 2}, model={"layers": 3}), tmp_path / "run", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MesaError, match="not a mesacli run directory"):
        train(spec, tmp_path / "other", progress=False)


def test_corrupted_and_missing_checkpoints(tmp_path):
    spec = tiny_spec(train={"steps": 2, "checkpoint_every": 2})
    train(spec, tmp_path / "run", progress=False)
    step_dir = tmp_path / "run" / "checkpoints" / "2"
    for path in step_dir.rglob("*"):
        if path.is_file() and path.parent.name != "meta":
            path.write_bytes(b"garbage")
    with pytest.raises(MesaError, match="corrupted or unreadable"):
        load_params(tmp_path / "run")
    with pytest.raises(MesaError, match="corrupted or unreadable"):
        train(spec, tmp_path / "run", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "spec.yaml").write_text((tmp_path / "run" / "spec.yaml").read_text())
    with pytest.raises(MesaError, match="no checkpoint found"):
        load_params(empty)


def test_schedules_and_clipping():
    cosine = make_schedule(tiny_spec(train={"schedule": "warmup_cosine", "warmup_steps": 10, "decay_steps": 100,
                                            "lr": 1e-3, "end_lr": 1e-5}).train)
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(1e-3)
    assert float(cosine(100)) == pytest.approx(1e-5)
    # element-wise clipping bounds every gradient entry before Adam (as the authors' optax.clip(1.0))
    import jax.numpy as jnp

    elementwise = make_optimizer(tiny_spec(train={"grad_clip": 1.0, "weight_decay": 0.0}).train)
    inner_state = elementwise.init({"w": jnp.zeros(2)})
    _, state = elementwise.update({"w": jnp.array([5.0, -0.5])}, inner_state, {"w": jnp.zeros(2)})
    first_moment = state[1][0].mu["w"]  # (clip, adamw) -> adamw's ScaleByAdamState
    np.testing.assert_allclose(np.asarray(first_moment) / 0.1, [1.0, -0.5], rtol=1e-6)
    by_norm = make_optimizer(tiny_spec(train={"grad_clip": 1.0, "grad_clip_kind": "global_norm"}).train)
    _, state = by_norm.update({"w": jnp.array([3.0, -4.0])}, by_norm.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)})
    np.testing.assert_allclose(np.asarray(state[1][0].mu["w"]) / 0.1, [0.6, -0.8], rtol=1e-6)


def test_multi_layer_constructed_lsa_step_matches_the_authors_formulation():
    """The LSA-k recipe step against an independent reference written the way the authors' code [C] computes it
    (Flax Dense kernels [in, heads*key] split into heads by reshape, causal linear attention with the diagonal,
    residual then clip after every block, prediction = slot 0 of the last block, loss sum/(2BT), optax
    chain(clip(c), adamw(lr, weight_decay))): same initial weights and batches -> same weights after 3 steps.
    Constructed tokens [0, s_t, s_t, s_{t-1}], no input/output projection; the activation clip and the
    element-wise gradient clip (0.1 here, 1.0 in the recipe) are both active."""
    import jax.numpy as jnp
    import optax

    from mesacli import model

    spec = tiny_spec(task={"token_format": "constructed"},
                     model={"layers": 3, "embed_dim": 16, "input_proj": False, "output_proj": False,
                            "init_std": 0.3, "act_clip": 0.6},
                     train={"lr": 1e-2, "weight_decay": 0.1, "grad_clip": 0.1, "schedule": "constant"})
    m, n = spec.model, spec.task.obs_dim
    heads, key = m.num_heads, m.key_size
    mesh = make_mesh()
    state = init_state(spec, mesh)

    def kernels(params):  # [E, H, D] / [H, D, E] -> Dense kernels [E, H*D] / [H*D, E]
        return [{"q": b["w_q"].reshape(m.embed_dim, -1), "k": b["w_k"].reshape(m.embed_dim, -1),
                 "v": b["w_v"].reshape(m.embed_dim, -1), "o": b["w_o"].reshape(-1, m.embed_dim)}
                for b in params["blocks"]]

    def reference_loss(layers, tokens, labels):
        x = tokens
        size, t, _ = x.shape
        for layer in layers:
            q, k, v = ((x @ layer[w]).reshape(size, t, heads, key).transpose(0, 2, 1, 3) for w in "qkv")
            logits = jnp.where(jnp.tril(jnp.ones((t, t))) == 0, 0.0, q @ jnp.swapaxes(k, -2, -1))
            values = (logits @ v).transpose(0, 2, 1, 3).reshape(size, t, heads * key)
            x = jnp.clip(x + values @ layer["o"], -m.act_clip, m.act_clip)
        return jnp.sum((labels - x[:, :, :n]) ** 2) / (2 * size * t)

    tx = optax.chain(optax.clip(0.1), optax.adamw(spec.train.lr, weight_decay=spec.train.weight_decay))
    layers = kernels(jax.device_get(state["params"]))
    opt = tx.init(layers)
    step = make_train_step(spec, mesh)
    clipped, saturated = False, False
    for s in range(3):
        batch = tasks.sample_batch(tasks.train_batch_key(spec, s), spec, spec.train.batch_size)
        tokens = np.asarray(batch.tokens_BTI)
        np.testing.assert_array_equal(tokens[..., :n], 0.0)
        np.testing.assert_array_equal(tokens[:, 1:, 3 * n:], tokens[:, :-1, n:2 * n])
        ref_value, grads = jax.value_and_grad(reference_loss)(layers, batch.tokens_BTI, batch.targets_BTS)
        clipped = clipped or any(bool(jnp.any(jnp.abs(g) > 0.1)) for g in jax.tree_util.tree_leaves(grads))
        updates, opt = tx.update(grads, opt, layers)
        layers = optax.apply_updates(layers, updates)
        state, metrics = step(state)
        assert float(metrics["loss"]) == pytest.approx(float(ref_value), rel=1e-5)
        residual = model.apply(state["params"], batch.tokens_BTI, spec)[1]["residual_LBTE"][1:]
        saturated = saturated or bool(jnp.any(jnp.abs(residual) >= m.act_clip))
    for ours, ref in zip(kernels(jax.device_get(state["params"])), layers, strict=True):
        for w in "qkvo":
            np.testing.assert_allclose(ours[w], ref[w], rtol=1e-4, atol=1e-6)
    assert clipped and saturated  # both clips took part
