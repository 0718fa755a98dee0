"""The embedded default job: a one-layer linear-attention model and a one-layer mesa model on
constructed tokens, next to the one-step GD (Proposition 1) and ridge least-squares baselines.

The two specs ship inside the package (mesacli/specs/); they are short versions of the paper's
LSA-1 and Mesa-1 runs (experiments/lsa1_constructed.yaml, experiments/mesa1_constructed.yaml).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mesacli import baselines, plots
from mesacli.checkpoint import dump_json
from mesacli.model import count_params
from mesacli.spec import Spec, load_spec
from mesacli.train import train

SPEC_DIR = Path(__file__).parent / "specs"
QUICKSTART_SPECS = ("quickstart_lsa1.yaml", "quickstart_mesa1.yaml")
REPORT_POSITIONS = (1, 5, 10, 25, 50)


@dataclasses.dataclass
class Row:
    name: str
    kind: str  # "model" or "baseline"
    curve: np.ndarray
    params: int | None = None
    steps: int | None = None
    seconds: float | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "seq_avg_loss": float(np.mean(self.curve)),
                "per_position_loss": [float(x) for x in self.curve], "params": self.params,
                "steps": self.steps, "train_seconds": self.seconds}


def quickstart_specs() -> list[Spec]:
    return [load_spec(SPEC_DIR / name) for name in QUICKSTART_SPECS]


def run_quickstart(out_dir: str | Path, progress: bool = True) -> list[Row]:
    """Train (or resume) the quick-start models in out_dir/<name>, add the baselines, write
    out_dir/quickstart.json and out_dir/comparison.png.  Returns the result rows."""
    out_dir = Path(out_dir)
    rows = []
    specs = quickstart_specs()
    for spec in specs:
        result = train(spec, out_dir / spec.name, progress=progress)
        rows.append(Row(spec.name, "model", result.eval_curve, count_params(result.params), result.step,
                        result.seconds))
    curves, _ = baselines.baseline_curves(specs[0])
    rows += [Row(name, "baseline", curve) for name, curve in curves.items()]
    dump_json(out_dir / "quickstart.json", {"rows": [r.as_dict() for r in rows]})
    plots.per_position_plot({r.name: r.curve for r in rows}, out_dir / "comparison.png",
                            title="quick start: test loss per position (linear dynamics, constructed tokens)",
                            dashed=tuple(r.name for r in rows if r.kind == "baseline"))
    return rows


def load_rows(path: Path) -> list[Row]:
    data = json.loads(Path(path).read_text())
    return [Row(r["name"], r["kind"], np.array(r["per_position_loss"]), r["params"], r["steps"], r["train_seconds"])
            for r in data["rows"]]
