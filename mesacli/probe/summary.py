"""RUN_DIR/probe/summary.md: the key numbers of every analysis present, next to the paper's claims.

Each analysis writes its own section (``summary(result)`` in its module, see ``mesacli.probe.registry``).
"""

from __future__ import annotations

import json
from pathlib import Path

from mesacli.probe import registry
from mesacli.spec import Spec


def write_summary(out_dir: Path, spec: Spec, skipped: dict[str, str] | None = None) -> Path:
    """Rebuild summary.md from every <analysis>.json in ``out_dir``."""
    m = spec.model
    lines = [f"# Probe summary: {spec.name}", "",
             f"Model: {m.layers} layer(s) {'/'.join(dict.fromkeys(m.layer_kinds()))} attention, {m.num_heads} heads, "
             f"embed {m.embed_dim}, {spec.task.token_format} tokens; task {spec.task.kind}, n_s = "
             f"{spec.task.obs_dim}, T = {spec.task.seq_len}. Paper claims refer to arXiv 2309.05858 "
             "(see paper-spec section 4).", ""]
    for name in registry.ANALYSES:
        path = out_dir / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        analysis = registry.module(name)
        lines += [f"## {analysis.TITLE} (`{name}`, step {r.get('step')})", ""]
        lines += analysis.summary(r)
        if r.get("notes"):
            lines += ["", f"_Notes: {r['notes']}_"]
        lines.append("")
    if skipped:
        lines += ["## Not applicable to this run", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()] + [""]
    path = out_dir / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
