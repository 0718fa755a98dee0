"""Language models (mesacli lm): the model's layers and recurrent decoding, training below the unigram
entropy, resume, the shipped specs, and the CLI end to end on tiny specs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mesacli.cli import app
from mesacli.errors import MesaError
from mesacli.layers import sinusoidal_encoding
from mesacli.lm import model
from mesacli.lm.generate import generate
from mesacli.lm.spec import lm_spec_from_dict, load_lm_spec
from mesacli.lm.state import load_lm
from mesacli.lm.train import train_lm
from mesacli.spec_loader import spec_to_yaml

ROOT = Path(__file__).resolve().parent.parent
LM_SPECS = sorted((ROOT / "experiments").glob("lm-*.yaml"))
runner = CliRunner()
VOCAB = 257


def tiny(layers=("softmax", "mesa"), **model_kw) -> dict:
    return {"name": "tiny", "data": {"split_block": 256},
            "model": {"layers": list(layers), "context": 32, "embed_dim": 16, "num_heads": 2, "key_size": 4,
                      "dpfp_nu": 2, "mesa_chunk_size": 8, "dropout": 0.0, **model_kw},
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 2,
                      "checkpoint_every": 2},
            "eval": {"windows": 8, "batch_size": 8, "icl_early": 4, "icl_late": 30}}


def random_params(spec, seed=0):
    """init, then every weight re-drawn larger (N(0, 0.3^2)) so that every layer matters in the comparisons."""
    params = model.init(jax.random.PRNGKey(seed), spec, VOCAB)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) if x.ndim >= 2 else x for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """~24 KB of text with structure a small model can learn: sentences from a 40-word vocabulary."""
    rng = np.random.default_rng(0)
    words = ["mesa", "layer", "learns", "in", "context", "the", "model", "solves", "least", "squares", "token",
             "attention", "softmax", "linear", "gradient", "step", "query", "key", "value", "state", "a", "of",
             "and", "to", "is", "by", "with", "each", "new", "old", "fast", "slow", "data", "loss", "train", "test",
             "small", "large", "one", "two"]
    lines = [" ".join(rng.choice(words, size=rng.integers(4, 12))) + "." for _ in range(800)]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- model


def test_dpfp_features_match_their_definition():
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    nu = 3
    r = np.maximum(np.concatenate([x, -x], axis=-1), 0)
    expected = np.concatenate([r * np.roll(r, i, axis=-1) for i in range(1, nu + 1)], axis=-1)
    out = np.asarray(model.dpfp(jnp.asarray(x), nu))
    assert out.shape == (3, 2 * 5 * nu)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("layers, key_shift", [(("softmax", "linear", "dpfp", "mesa"), False),
                                               (("mesa", "softmax"), True), (("mesanet", "mesa"), True)])
def test_recurrent_decoding_equals_the_parallel_forward(layers, key_shift):
    """decode_step token by token (key/value cache for softmax, constant-size states for linear, dpfp, mesa and
    mesanet) gives the parallel forward's logits at every position."""
    spec = lm_spec_from_dict(tiny(layers, key_shift=key_shift, mlp=True))
    params = random_params(spec)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 20), 0, VOCAB)
    parallel, _ = jax.jit(lambda p, t: model.apply(p, t, spec))(params, tokens)
    pe = sinusoidal_encoding(20, spec.model.embed_dim)
    step = jax.jit(lambda s, tok, pos: model.decode_step(params, spec, s, tok, pos, pe))
    state = model.init_decode_state(params, spec, 2, 20)
    for t in range(20):
        state, logits = step(state, tokens[:, t], jnp.int32(t))
        np.testing.assert_allclose(logits, parallel[:, t], rtol=2e-4, atol=2e-4)
    # the mesa-layer's state is its constant-size (R, G), not a cache that grows with the sequence; mesanet's
    # is (H, G) and the last 3 pre-convolution queries and keys
    mesa_index = layers.index("mesa")
    assert state.layers[mesa_index].r_BHDD.shape == (2, 2, 16, 16)
    if "mesanet" in layers:
        mesanet_state = state.layers[layers.index("mesanet")]
        assert mesanet_state.op.h_BHDD.shape == (2, 2, 4, 4) and mesanet_state.q_conv_BKHD.shape == (2, 3, 2, 4)


@pytest.mark.parametrize("first", ["mesa", "mesanet"])
def test_the_model_is_causal_and_the_key_shift_looks_one_token_back(first):
    spec = lm_spec_from_dict(tiny((first, "dpfp"), key_shift=True))
    params = random_params(spec)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 24), 0, VOCAB)
    changed = tokens.at[0, 12].set((tokens[0, 12] + 1) % VOCAB)
    apply = jax.jit(lambda t: model.apply(params, t, spec)[0])
    a, b = apply(tokens), apply(changed)
    np.testing.assert_array_equal(a[0, :12], b[0, :12])
    assert float(jnp.max(jnp.abs(a[0, 12:] - b[0, 12:]))) > 1e-4


def test_parameter_count_is_equal_across_layer_kinds():
    counts = {kind: model.count_params(model.init(jax.random.PRNGKey(0), lm_spec_from_dict(tiny(("softmax", kind))),
                                                  VOCAB)) for kind in ("softmax", "linear", "dpfp", "mesa", "mesanet")}
    assert counts["softmax"] == counts["linear"] == counts["dpfp"] == counts["mesa"] - 2  # + lambda per head
    # mesanet has the same q, k, v, o projections and, on top (cannot be equalised): conv taps 2 K H D, gates
    # 2 (E H + H), Lambda H D, RMSNorm scale D and the output gate W_g E H D; tiny: 64 + 68 + 8 + 4 + 128 = 272
    e, h, d, taps = 16, 2, 4, 4
    extra = 2 * taps * h * d + 2 * (e * h + h) + h * d + d + e * h * d
    assert counts["mesanet"] == counts["softmax"] + extra
    no_gate = lm_spec_from_dict(tiny(("softmax", "mesanet"), mesanet_output_gate=False))
    assert model.count_params(model.init(jax.random.PRNGKey(0), no_gate, VOCAB)) == counts["mesanet"] - e * h * d


@pytest.mark.parametrize("layers", [("softmax", "mesa"), ("mesanet",)])
def test_greedy_generation_follows_the_parallel_argmax(layers):
    spec = lm_spec_from_dict(tiny(layers))
    params = random_params(spec, seed=4)

    class Ids:  # a stand-in tokenizer: text = the ids, comma-separated
        vocab_size, eos_id, kind = VOCAB, 256, "ids"

        @staticmethod
        def encode(data):
            return np.frombuffer(data, np.uint8).astype(np.int64)

        @staticmethod
        def decode(ids):
            return ",".join(str(int(i)) for i in ids)

    text = generate(params, spec, Ids, "mesa", max_new_tokens=6, temperature=0.0)
    ids = list(b"mesa")
    apply = jax.jit(lambda tokens: model.apply(params, tokens, spec)[0])  # causal: padding after t changes nothing
    for _ in range(6):
        logits = apply(jnp.array([ids + [0] * (10 - len(ids))]))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    assert text == ",".join(str(i) for i in ids[4:])


# ----------------------------------------------------------------------------- training


def test_a_tiny_lm_learns_below_the_unigram_entropy_and_resumes(corpus_file, tmp_path):
    raw = np.frombuffer(corpus_file.read_bytes(), np.uint8)
    freq = np.bincount(raw, minlength=256) / len(raw)
    unigram_nats = float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())
    data = tiny(("softmax", "mesa"))
    data["data"]["path"] = str(corpus_file)
    data["model"].update(embed_dim=32, key_size=8)
    data["train"].update(steps=150, batch_size=16, lr=1e-2, end_lr=1e-3, warmup_steps=10, eval_every=150,
                         checkpoint_every=75, log_every=25)
    spec = lm_spec_from_dict(data)
    first = train_lm(spec, tmp_path / "run", progress=False, stop_at_step=75)
    assert first.step == 75
    result = train_lm(spec, tmp_path / "run", progress=False)
    assert result.resumed_from == 75 and result.step == 150
    assert result.evaluation.loss < unigram_nats - 0.5, (result.evaluation.loss, unigram_nats)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [25, 50, 75, 100, 125, 150]  # no duplicates after resume
    assert rows[-1]["val_loss"] == pytest.approx(result.evaluation.loss, rel=1e-5)
    assert rows[0]["loss"] > rows[-1]["loss"]
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(record["per_position_loss"]) == 32 and record["tokens_seen"] == 150 * 16 * 32
    assert (tmp_path / "run" / "val_loss_per_position.png").stat().st_size > 0
    spec_back, params, step, _ = load_lm(tmp_path / "run")
    assert spec_back == spec and step == 150


@pytest.mark.slow
def test_a_tiny_lm_with_a_mesanet_layer_trains_with_finite_gradients(corpus_file, tmp_path):
    data = tiny(("mesanet", "softmax"), mesanet_chunk_size=8)
    data["data"]["path"] = str(corpus_file)
    data["train"].update(steps=40, batch_size=8, lr=1e-2, end_lr=1e-3, warmup_steps=4, eval_every=40,
                         checkpoint_every=40, log_every=10)
    spec = lm_spec_from_dict(data)
    params = random_params(spec)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 33), 0, VOCAB)

    def loss(p):
        logits = model.apply(p, tokens[:, :-1], spec)[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    grads = jax.jit(jax.grad(loss))(params)["blocks"][0]
    assert {"conv_q", "w_gamma", "b_beta", "lam_p", "norm_scale", "w_g"} <= set(grads)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
    result = train_lm(spec, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # from ln 257 = 5.55 nats at step 0 (4.0 at step 10) down to about 2.9 at step 40
    assert len(losses) == 4 and losses[-1] < losses[0] and losses[-1] < math.log(VOCAB) - 2, losses
    assert result.evaluation.loss < math.log(VOCAB) - 2


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("path", LM_SPECS, ids=lambda p: p.name)
def test_shipped_lm_specs_load(path):
    spec = load_lm_spec(path)
    assert spec.name == path.stem and spec.data.path is None  # the embedded corpus: runs out of the box
    assert path.read_text().startswith("#")
    assert lm_spec_from_dict(yaml.safe_load(spec_to_yaml(spec))) == spec


def test_shipped_comparisons_have_equal_budgets_and_sizes():
    specs = [load_lm_spec(p) for p in LM_SPECS]
    assert {(s.train.steps, s.train.batch_size, s.model.context) for s in specs} == {(1000, 16, 256)}
    two = {s.name: s for s in specs if s.name.startswith("lm-2l-")}
    kinds = ("softmax", "linear", "dpfp", "mesa", "mesanet")
    assert {s.model.layers for s in two.values()} == {("softmax", k) for k in kinds}
    four = {s.name: s for s in specs if s.name.startswith("lm-4l-")}
    assert {s.model.layers for s in four.values()} == {("softmax", k, k, k) for k in kinds if k != "linear"}
    assert all(s.model.mlp for s in four.values())
    sizes = {(s.model.embed_dim, s.model.num_heads, s.model.key_size) for s in [*two.values(), *four.values()]}
    assert len(sizes) == 1  # the 2- and 4-layer comparisons differ in their layers only


@pytest.mark.parametrize("override, fragment", [
    ("model.layers=[softmax, flash]", "model.layers[1]: 'flash' is not one of softmax, linear, dpfp, mesa, mesanet"),
    ("model.mesanet_solver=cholesky", "model.mesanet_solver: 'cholesky' is not one of exact, cg, cg_fixed"),
    ("model.mesanet_cg_tol=0", "model.mesanet_cg_tol: must lie in (0, 1), got 0.0"),
    ("model.mesanet_cg_tol=1", "model.mesanet_cg_tol: must lie in (0, 1)"),
    ("model.mesanet_chunk_size=0", "model.mesanet_chunk_size: must be positive"),
    ("model.mesanet_output_gate=1", "model.mesanet_output_gate: expected true or false"),
    ("model.mesanet_solvr=cg", "did you mean 'model.mesanet_solver'?"),
    ("model.contxt=3", "unknown spec key 'model.contxt' (did you mean 'model.context'?)"),
    ("eval.icl_late=999", "eval.icl_early (4) < eval.icl_late (999) <= model.context (32)"),
    ("model.key_shift=true", "model.key_shift replaces the first softmax layer"),
    ("data.val_fraction=1.5", "data.val_fraction: must lie in (0, 1)"),
    ("model.layers=[]", "model.layers: list at least one layer kind"),
])
def test_bad_lm_specs_are_clear_errors(override, fragment):
    with pytest.raises(MesaError) as err:
        lm_spec_from_dict(tiny(), [override])
    assert fragment in str(err.value)


def test_specs_of_the_other_kind_say_which_command_runs_them():
    from mesacli.spec import load_spec

    with pytest.raises(MesaError, match="language-model spec"):
        load_spec(LM_SPECS[0])
    with pytest.raises(MesaError, match="synthetic-task spec"):
        load_lm_spec(ROOT / "experiments" / "lsa1_constructed.yaml")


# ----------------------------------------------------------------------------- CLI


def _write_spec(tmp_path: Path, name: str, corpus: Path, layers=("softmax", "mesa")) -> Path:
    data = tiny(layers)
    data["name"] = name
    data["data"]["path"] = str(corpus)
    path = tmp_path / f"{name}.yaml"
    path.write_text("# tiny test spec\n" + yaml.safe_dump(data))
    return path


def test_cli_lm_trains_generates_evaluates_and_compares(corpus_file, tmp_path):
    spec = _write_spec(tmp_path, "tiny-mesa", corpus_file)
    run = tmp_path / "tiny-mesa"
    result = runner.invoke(app, ["lm", str(spec), "--run-dir", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "tiny-mesa" in result.output and "ICL score" in result.output
    assert (run / "eval.json").exists() and (run / "data" / "train.bin").exists()
    result = runner.invoke(app, ["lm", "generate", str(run), "--prompt", "the mesa", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("the mesa")
    # lm eval: the spec's own windows give eval.json's numbers again; --windows re-evaluates on more
    stored, rows = json.loads((run / "eval.json").read_text()), tmp_path / "rows.json"
    result = runner.invoke(app, ["lm", "eval", str(run), "--out", str(rows)])
    assert result.exit_code == 0, result.output
    assert json.loads(rows.read_text())[0]["val_loss"] == pytest.approx(stored["val_loss"], rel=1e-6)
    result = runner.invoke(app, ["lm", "eval", str(run), "--windows", "64", "--out", str(rows)])
    assert result.exit_code == 0 and json.loads(rows.read_text())[0]["windows"] == 64
    result = runner.invoke(app, ["lm", "eval", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.output.startswith("error:")

    # compare: the finished run in <out>/tiny-mesa is reused (same spec), tiny-dpfp is trained
    other = _write_spec(tmp_path, "tiny-dpfp", corpus_file, ("softmax", "dpfp"))
    result = runner.invoke(app, ["lm", "compare", str(spec), str(other), "--out-dir", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["tiny-mesa", "tiny-dpfp"]
    assert rows[0]["val_loss"] == pytest.approx(stored["val_loss"], rel=1e-6)
    assert all(r["steps"] == 4 and r["tokens"] == 4 * 4 * 32 and math.isfinite(r["val_loss"]) for r in rows)
    result = runner.invoke(app, ["lm", "compare", str(spec), str(other), "--steps", "3", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "different spec" in result.output  # a finished run is never retrained silently


@pytest.mark.parametrize("case", ["missing", "empty", "too_short"])  # non-UTF-8 bytes: tests/test_lm_data.py
def test_cli_lm_bad_corpora(case, tmp_path):
    corpus = tmp_path / "text.txt"
    if case == "empty":
        corpus.write_bytes(b"")
    elif case == "too_short":
        corpus.write_bytes(b"short text " * 40)  # 440 bytes: fewer than context + 1 = 301 tokens per split
    if case == "missing":
        corpus = tmp_path / "nowhere.txt"
    spec = _write_spec(tmp_path, "tiny", corpus)
    extra = ["--set", "model.context=300"] if case == "too_short" else []
    result = runner.invoke(app, ["lm", str(spec), "--run-dir", str(tmp_path / "run"), "--no-progress",
                                 "--set", "train.steps=2", "--set", "train.eval_every=2", *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "Traceback" not in result.output
    assert {"missing": "nowhere.txt", "empty": "empty", "too_short": "301"}[case] in lines[-1], lines[-1]

