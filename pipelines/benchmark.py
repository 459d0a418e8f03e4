"""Throughput benchmark: the pipeline against sentence-transformers' `encode`, in one command.

    python pipelines/benchmark.py                          # 20,000 docs, the default config
    python pipelines/benchmark.py --docs 2000 --report out/bench.json
    python pipelines/benchmark.py --config configs/models/smollm2-135m-prompteol.yaml --set model.dtype=float16

On one corpus (the config's input texts, cycled to --docs documents and written as JSONL shards
of --shard-docs) and one model, it runs:

  pipeline  the corpus pipeline end to end, read to write (plan, read, tokenize, embed, commit);
  baseline  sentence-transformers' `encode` over the same texts in this process, with the model's
            dtype and device (model load excluded), the way a user would otherwise embed them;
  noop      the pipeline's data path with a no-op model (zero vectors): the ceiling I/O and Ray set;
  memory    the pipeline on --docs / --memory-scale documents, for peak memory against corpus size.

A no-op warm-up on 200 docs runs first: on a fresh cluster it starts the worker processes that
read, tokenize and write, so every phase after it starts equal.
Pipeline rates are end to end (the embedding actors' start and model load included); "steady"
rates count the rows committed after the first shard over the time to the last commit.

It prints rows/s, tokens/s, their ratios, padding efficiency, peak memory and the model's FLOP
rate (and utilisation on a known GPU), and writes them as JSON with --report. Peak memory is the
sum of the resident set sizes of this process and every process it started (the local Ray cluster:
raylet, GCS, workers), sampled every 0.2 s while a phase runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import __version__, cli
from operators.bookkeeping import RunRecord, record_outputs
from operators.config import ConfigError, PipelineConfig
from operators.execution import embed, init_ray, read_shards, tokenize, write_shards
from operators.planning import plan_run
from operators.prepare import prepare
from operators.throughput import (
    PeakMemory,
    add_ratios,
    corpus_texts,
    device_name,
    format_report,
    phase_result,
    run_baseline,
    write_corpus,
    write_report,
)

logger = logging.getLogger("corpus_embed.benchmark")


def pipeline_phase(cfg: PipelineConfig, corpus: Path, out: Path, noop: bool = False) -> dict:
    """The corpus pipeline's embedding chain, read to commit, on `corpus` into `out`:
    prepare -> plan -> read -> tokenize -> embed -> write -> record (no gate, publish or sinks)."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"uri": str(corpus), "format": "jsonl"}),
        "output": cfg.output.model_copy(update={"uri": str(out)}),
    })
    with PeakMemory() as mem:
        record = RunRecord.begin(cfg)
        prepared = prepare(cfg)
        plan = plan_run(cfg, prepared)
        with record.running(cfg):
            ds = read_shards(cfg, plan)
            ds = tokenize(ds, cfg, prepared, inputs=len(plan.todo))
            ds = embed(ds, cfg, prepared, "noop" if noop else "embed", blocks=plan.blocks)
            outcome = write_shards(ds, cfg, plan, prepared)
            del ds  # the dataset holds its actor pools: let them go before anything below can raise
            record_outputs(cfg, plan, outcome, record)
    return phase_result(record, mem.peak)


def benchmark(cfg: PipelineConfig, args: argparse.Namespace) -> dict:
    if args.docs < 1 or args.shard_docs < 1 or args.memory_scale < 1:
        raise ConfigError("--docs, --shard-docs and --memory-scale must be positive")
    phases = {"baseline", "noop", "memory"} - set(args.skip)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="corpus-embed-bench-"))
    try:
        report = phases_on(cfg, args.docs, args.shard_docs, workdir, phases, args.memory_scale)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    write_report(report, args.report)
    return report


def phases_on(cfg: PipelineConfig, docs: int, shard_docs: int, workdir: Path, phases: set[str], memory_scale: int) -> dict:
    prepared = prepare(cfg)
    texts = corpus_texts(cfg, docs)
    write_corpus(texts, workdir / "corpus", shard_docs)
    report: dict = {
        "package_version": __version__, "date": time.strftime("%Y-%m-%d"), "device": device_name(cfg),
        "model": cfg.model.name, "dtype": cfg.model.dtype, "pooling": cfg.extraction.pooling, "docs": docs,
        "shard_docs": shard_docs, "cpus": os.cpu_count(),
    }
    init_ray(cfg)  # a running cluster is the normal case; its start-up is not part of any phase
    # Warm-up: the first run on a fresh cluster starts the worker processes that read, tokenize
    # and write. Reported on its own, then every phase starts equal.
    write_corpus(texts[: min(docs, 200)], workdir / "corpus-warmup", shard_docs)
    report["warmup"] = pipeline_phase(cfg, workdir / "corpus-warmup", workdir / "out-warmup", noop=True)
    if "noop" in phases:
        logger.info("noop: the data path with a no-op model")
        report["noop"] = pipeline_phase(cfg, workdir / "corpus", workdir / "out-noop", noop=True)
    if "memory" in phases:
        small = max(1, docs // memory_scale)
        write_corpus(texts[:small], workdir / "corpus-small", shard_docs)
        logger.info("memory reference: the pipeline on %d docs", small)
        report["pipeline_small"] = dict(pipeline_phase(cfg, workdir / "corpus-small", workdir / "out-small"), docs=small)
        report["memory_scale"] = memory_scale
    logger.info("pipeline: end to end on %d docs", docs)
    report["pipeline"] = pipeline_phase(cfg, workdir / "corpus", workdir / "out")
    if "baseline" in phases:
        logger.info("baseline: sentence-transformers encode on the same %d texts", docs)
        try:
            report["baseline"] = run_baseline(cfg, prepared.resolved, texts)
        except Exception as e:  # a model sentence-transformers cannot load: say so, keep the rest
            report["baseline"] = {"error": f"{type(e).__name__}: {e}"}
    return add_ratios(report, prepared.resolved)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--docs", type=int, default=20000, help="corpus size in documents (default 20000)")
    p.add_argument("--shard-docs", type=int, default=2000, help="documents per input shard (default 2000)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--workdir", help="where the corpus and outputs go (default: a temporary folder, removed after)")
    p.add_argument("--skip", action="append", default=[], choices=["baseline", "noop", "memory"], help="leave a phase out (repeatable)")
    p.add_argument("--memory-scale", type=int, default=10, help="the memory phase runs on docs / this (default 10)")


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, argv, benchmark, format_report, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
