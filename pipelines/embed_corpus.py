"""Embed a sharded text corpus into vector shards on Ray Data.

    python pipelines/embed_corpus.py                       # the embedded default (configs/default.yaml)
    python pipelines/embed_corpus.py --config configs/x.yaml --set input.uri=s3://bucket/corpus/
    ray job submit --working-dir . -- python pipelines/embed_corpus.py --config configs/x.yaml

prepare -> plan -> read -> tokenize -> embed -> write -> record -> gate -> publish -> sinks.
Everything that can be checked (config, model, artifact, input listing, output access, the gate's
data, the sinks) is checked before Ray starts; each shard's vector file is committed as soon as
all its rows are written, so a run that dies keeps what it committed and a re-run finishes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit --working-dir .`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.config.schema import PipelineConfig
from operators.evaluation.scoring import query_side_for
from operators.execution.stages import embed, init_ray, ray_embed_fn, read_shards, tokenize, write_shards
from operators.io.incremental import publish_version
from operators.io.sinks import check_sinks, feed_sinks, require_synced
from operators.io.writers import WriteOutcome
from operators.model.prepare import prepare
from operators.run import cli
from operators.run.bookkeeping import RunRecord, record_outputs
from operators.run.gate import check_gate_data, run_gate
from operators.run.planning import list_input, plan_run


def run(cfg: PipelineConfig, noop: bool = False) -> RunRecord:
    """The whole run; returns its record (also written as the run report). noop=True replaces the
    model by zero vectors: the data path alone, for benchmarks."""
    record = RunRecord.begin(cfg)
    with record.timed("plan_s"):
        shards = list_input(cfg)  # the input's shards, fingerprinted
        prepared = prepare(cfg)  # model, whitening artifact, provenance, config fingerprint
        plan = plan_run(cfg, prepared, shards)  # the shards to embed, reuse, skip and delete
        check_gate_data(cfg)
        check_sinks(cfg)
    record.planned(plan, prepared)
    with record.running(cfg):  # the output's lease held; the run report written however this ends
        outcome = WriteOutcome()
        if plan.todo:
            with record.timed("embed_s"):
                init_ray(cfg)
                ds = read_shards(cfg, plan)
                ds = tokenize(ds, cfg, prepared, inputs=len(plan.todo))
                ds = embed(ds, cfg, prepared, "noop" if noop else "embed", blocks=plan.blocks)
                outcome = write_shards(ds, cfg, plan, prepared)
                del ds  # the dataset holds its actor pools, CPUs reserved: let them go before anything below can raise
        record_outputs(cfg, plan, outcome, record)  # deletions, manifest, counts; raises if incomplete
        if cfg.gate.tasks:
            with record.timed("gate_s"):
                gate = run_gate(cfg, prepared, ray_embed_fn(cfg, prepared), query_side_for(cfg, prepare, ray_embed_fn))
            record.gate = gate.to_json()
            gate.require_passed()  # GateError: nothing published
        record.check_lease()  # a run stalled past its lease, taken over meanwhile, publishes nothing
        record.published, record.previous_version = publish_version(cfg, plan, record.run_id)
        if cfg.sinks:
            with record.timed("sinks_s"):
                record.check_lease()
                record.sinks = feed_sinks(cfg, prepared.fingerprint, prepared.dimension)  # each store to the published output
            require_synced(record.sinks)
    return record


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, argv, lambda cfg, args: run(cfg), RunRecord.summary_line)


if __name__ == "__main__":
    sys.exit(main())
