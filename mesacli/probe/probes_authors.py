"""The linear probes across depth (``probes``, paper-spec 4.4) on the authors' own probing data.

The paper's probe curves (Fig. 4E/F, 6A/B) were fitted on the authors' batches: one batch of 256 sequences from
each of PRNGKey(1), (11), ..., (11111) (``tasks.authors_test_batch``, the test sequences of its loss curves).
This analysis fits the same probes, with the same targets and settings, on those batches (the first ``--seeds``
of them, at most 5, ``--batch-size`` sequences each; the defaults 5 x 256 are the authors'), so that a gap to
the paper's probe values can be told apart from the draw of the probing data: on LSA-6's input layer it gives
the paper's 0.61 and 0.054 (t = 10, 20) where our own batches give 0.672 and 0.0556.
"""

from __future__ import annotations

from mesacli.probe import linprobe
from mesacli.probe.common import RunContext
from mesacli.spec import Spec

TITLE = "Linear probes across depth, on the authors' probing data"
DESCRIPTION = "the linear probes of `probes` fitted on the authors' batches (seeds 1 .. 11111)"
ANALYSIS = "probes_authors"


def check_applicable(spec: Spec) -> None:
    """MesaError unless the authors' test batches cover the spec's task."""
    from mesacli import tasks

    tasks.check_authors_test_batches(spec.task)


def run(ctx: RunContext) -> dict:
    from mesacli import tasks

    seeds = tasks.AUTHORS_TEST_SEEDS[:ctx.seeds]  # the authors' data has 5 batches: --seeds above 5 uses 5
    record = linprobe.fit_probes(ctx, [tasks.authors_test_batch(ctx.spec.task, seed, ctx.batch_size)
                                       for seed in seeds], ANALYSIS)
    record["data"] = {"authors_seeds": list(seeds), "sequences_per_seed": ctx.batch_size}
    record["notes"] += " Data: the authors' batches (tasks.authors_test_batch) of the listed seeds."
    return record


summary = linprobe.summary
headline = linprobe.headline
