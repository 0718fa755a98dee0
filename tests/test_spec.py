"""Strict spec loading: every shipped spec loads; typos, wrong types and bad shapes are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mesacli.errors import MesaError
from mesacli.spec import Spec, load_spec, spec_from_dict
from mesacli.spec_loader import spec_to_yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if not p.name.startswith("lm-")) + sorted(
    (ROOT / "mesacli" / "specs").glob("*.yaml"))  # lm-*.yaml: language-model specs (tests/test_lm.py)


def test_specs_are_shipped():
    names = {p.stem for p in SHIPPED}
    for required in ["lsa1_constructed", "lsa2_constructed", "lsa4_constructed", "lsa6_constructed",
                     "mesa1_constructed", "softmax3_full", "softmax7_full", "hybrid_mesa_full",
                     "partial_softmax7", "partial_hybrid_mesa", "nonlinear_softmax7", "nonlinear_hybrid_mesa"]:
        assert required in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_loads_and_says_what_it_reproduces(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert path.read_text().startswith("#"), "each spec opens with a comment saying what it reproduces"
    # the resolved YAML round-trips to the same spec
    assert spec_from_dict(yaml.safe_load(spec_to_yaml(spec))) == spec


def test_paper_models_have_the_paper_shapes():
    lsa1 = load_spec(ROOT / "experiments" / "lsa1_constructed.yaml")
    assert lsa1.model.layer_kinds() == ("linear",) and lsa1.token_dim == 40 and lsa1.task.mask_slots == (0, 1)
    s7 = load_spec(ROOT / "experiments" / "softmax7_full.yaml")
    assert s7.model.layer_kinds() == ("softmax_pe",) + ("softmax",) * 6
    hybrid = load_spec(ROOT / "experiments" / "hybrid_mesa_full.yaml")
    assert hybrid.model.layer_kinds() == ("softmax_pe", "mesa")
    part = load_spec(ROOT / "experiments" / "partial_softmax7.yaml")
    assert (part.task.obs_dim, part.task.state_dim) == (5, 15)


def test_defaults_and_scientific_notation():
    spec = spec_from_dict({"train": {"lr": 1e-4}})
    assert spec == Spec(train=spec.train) and spec.train.lr == 1e-4
    from mesacli.spec_loader import parse_yaml

    assert parse_yaml("lr: 1e-4", "x")["lr"] == pytest.approx(1e-4)
    assert isinstance(parse_yaml("lr: 3E+2", "x")["lr"], float)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"num_head": 2}}, "unknown spec key 'model.num_head' (did you mean 'model.num_heads'?)"),
        ({"trian": {}}, "did you mean 'train'?"),
        ({"model": {"layers": "four"}}, "model.layers: expected an integer"),
        ({"model": {"layers": True}}, "model.layers: expected an integer"),
        ({"model": {"layer_norm": "yes"}}, "model.layer_norm: expected true or false"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"task": {"mask_slots": 3}}, "task.mask_slots: expected a list"),
        ({"model": {"attention": "softmx"}}, "did you mean 'softmax'?"),
        ({"model": {"layers": 0}}, "model.layers: must be positive"),
        ({"model": "big"}, "model: expected a mapping"),
        ({"model": {"mesa_chunk_size": 0}}, "model.mesa_chunk_size: must be positive"),
        ({"model": {"mesa_gamma": 1.5}}, "model.mesa_gamma: the forgetting factor must lie in (0, 1]"),
        ({"model": {"mesa_lambda_init": -1.0}}, "model.mesa_lambda_init: must be positive"),
        ({"model": {"mesa_forget": "gated"}}, "did you mean 'gate'?"),
    ],
)
def test_bad_values_are_one_line_errors(data, message):
    with pytest.raises(MesaError) as err:
        spec_from_dict(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"task": {"token_format": "constructed"}, "model": {"embed_dim": 30}}, "must equal the token size (40"),
        ({"task": {"kind": "linear", "obs_dim": 5}, "model": {"input_proj": True}}, "must equal task.state_dim"),
        ({"task": {"token_format": "raw", "mask_slots": [0]}}, "only applies to task.token_format: constructed"),
        ({"task": {"token_format": "constructed", "mask_slots": [4]}, "model": {"embed_dim": 40}}, "slot 4"),
        ({"model": {"embed_dim": 5, "input_proj": True}}, "smaller than task.obs_dim"),
        ({"model": {"embed_dim": 11, "input_proj": True, "output_proj": True, "first_layer": "softmax_pe"}},
         "must be even"),
    ],
)
def test_impossible_shapes(data, message):
    with pytest.raises(MesaError) as err:
        spec_from_dict(data)
    assert message in str(err.value)


def test_overrides():
    spec = spec_from_dict({}, ["model.layers=4", "train.lr=2e-4", "task.mask_slots=[]", "model.act_clip=null"])
    assert spec.model.layers == 4 and spec.train.lr == 2e-4 and spec.task.mask_slots == ()
    assert spec.model.act_clip is None
    with pytest.raises(MesaError, match="expected KEY=VALUE"):
        spec_from_dict({}, ["model.layers"])
    with pytest.raises(MesaError, match="did you mean 'model.layers'"):
        spec_from_dict({}, ["model.layer=4"])


def test_file_errors(tmp_path):
    with pytest.raises(MesaError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layers: [1, 2\n")
    with pytest.raises(MesaError, match=r"YAML syntax error \(line"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(MesaError, match="must be a mapping"):
        load_spec(listy)
