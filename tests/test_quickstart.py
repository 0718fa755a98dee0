"""The embedded default job: its specs, its result table, and (slow) the real thing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mesacli import quickstart
from tests.conftest import tiny_spec


def test_quickstart_specs_share_their_test_batches():
    lsa, mesa = quickstart.quickstart_specs()
    assert lsa.model.layer_kinds() == ("linear",) and mesa.model.layer_kinds() == ("mesa",)
    assert lsa.task == mesa.task and lsa.train.eval_seed == mesa.train.eval_seed
    assert lsa.train.batch_size == mesa.train.batch_size  # same fixed test batches for every row


def test_quickstart_writes_rows_json_and_figure(tmp_path, monkeypatch):
    specs = [tiny_spec(name="tiny_lsa", train={"steps": 3}),
             tiny_spec(name="tiny_mesa", model={"attention": "mesa"}, train={"steps": 3})]
    monkeypatch.setattr(quickstart, "quickstart_specs", lambda: specs)
    rows = quickstart.run_quickstart(tmp_path, progress=False)
    assert [r.kind for r in rows] == ["model", "model", "baseline", "baseline"]
    assert rows[2].name.startswith("GD-1 (eta=")
    back = quickstart.load_rows(tmp_path / "quickstart.json")
    assert [r.name for r in back] == [r.name for r in rows]
    np.testing.assert_allclose(back[0].curve, rows[0].curve, rtol=1e-6)
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    assert json.loads((tmp_path / "quickstart.json").read_text())["rows"][0]["steps"] == 3


@pytest.mark.slow
def test_full_quickstart_reproduces_the_paper_ordering(tmp_path):
    """LSA-1 ~ GD-1 (Proposition 1) and Mesa-1 well below both (about 2.5 minutes on 2 cores)."""
    rows = {r.name: float(np.mean(r.curve)) for r in quickstart.run_quickstart(tmp_path, progress=False)}
    gd1 = next(v for k, v in rows.items() if k.startswith("GD-1"))
    ridge = next(v for k, v in rows.items() if k.startswith("ridge"))
    assert abs(rows["quickstart_lsa1"] - gd1) < 0.02 * gd1
    assert rows["quickstart_mesa1"] < 0.3 * gd1
    assert ridge < rows["quickstart_mesa1"]
