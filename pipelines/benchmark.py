"""Throughput benchmark: the pipeline against sentence-transformers' `encode`, in one command.

    python pipelines/benchmark.py                          # 20,000 docs, the default config
    python pipelines/benchmark.py --docs 2000 --report out/bench.json
    python pipelines/benchmark.py --config configs/models/smollm2-135m-prompteol.yaml --set model.dtype=float16
    python pipelines/benchmark.py --scale --report out/scale.json     # cost against the number of shards
    python pipelines/benchmark.py --engines torch,onnx,onnx:int8,openvino,openvino:int8 --baseline-python .venv-st/bin/python

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
rates count the rows committed after the first shard over the time to the last commit; with the
memory phase, "marginal" rates are the rows a run on --docs adds over the one on --docs /
--memory-scale, per second it adds: start-up, preparation and model load cancel out, and unlike
the steady rate they do not depend on how the commits of a few large shards bunch at the end.

It prints rows/s, tokens/s, their ratios, padding efficiency, peak memory and the model's FLOP
rate (and utilisation on a known GPU), and writes them as JSON with --report. Peak memory is the
sum of the resident set sizes of this process and every process it started (the local Ray cluster:
raylet, GCS, workers), sampled every 0.2 s while a phase runs.

--scale measures what a run costs against the number of shards instead: the same --scale-rows rows
as each of --scale-shards shard counts with the no-op model, the same --scale-model-rows rows with
the real model, then a plan of --plan-shards shards that are all up to date (embedded once first,
no-op). Each point runs in a process of its own, so its driver peak RSS is its own; it prints per
point the wall time, the time per shard and per row, the plan time and the driver's peak RSS, and
the ratios of the largest shard count to the smallest. --workdir may be an object store URI
(s3://bucket/prefix: corpus and outputs go there) and --set ray.address=... runs it on a cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import __version__
from operators.config.schema import ConfigError, ModelConfig, PipelineConfig
from operators.evaluation.benchmark_report import ST_BACKEND, add_ratios, engine_ratios, phase_result, scale_ratios, summarize, write_report
from operators.evaluation.throughput import PeakMemory, corpus_texts, device_name, run_baseline, write_corpus, write_corpus_uri
from operators.execution.scale_cluster import ScaleCluster
from operators.execution.stages import embed, init_ray, read_shards, tokenize, write_shards
from operators.io.storage import get_fs, read_parquet
from operators.io.writers import WriteOutcome
from operators.model.prepare import prepare
from operators.model.resolution import local_source
from operators.run import cli
from operators.run.bookkeeping import RunRecord, record_outputs
from operators.run.planning import plan_run

logger = logging.getLogger("corpus_embed.benchmark")


def pipeline_phase(cfg: PipelineConfig, corpus: Path | str, out: Path | str, noop: bool = False, fresh: bool = True) -> dict:
    """The corpus pipeline's embedding chain, read to commit, on `corpus` into `out`:
    prepare -> plan -> read -> tokenize -> embed -> write -> record (no gate, publish or sinks).
    fresh: remove `out` first; else a second call on it measures a run with nothing to do."""
    if fresh:
        remove_tree(str(out), cfg.output.storage)
    cfg = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"uri": str(corpus), "format": "jsonl"}),
        "output": cfg.output.model_copy(update={"uri": str(out)}),
    })
    with PeakMemory() as mem:
        record = RunRecord.begin(cfg)
        with record.timed("plan_s"):
            prepared = prepare(cfg)
            plan = plan_run(cfg, prepared)
        with record.running(cfg):
            if plan.todo:
                init_ray(cfg)
                ds = read_shards(cfg, plan)
                ds = tokenize(ds, cfg, prepared, inputs=len(plan.todo))
                ds = embed(ds, cfg, prepared, "noop" if noop else "embed", blocks=plan.blocks)
                outcome = write_shards(ds, cfg, plan, prepared)
                del ds  # the dataset holds its actor pools: let them go before anything below can raise
            else:
                outcome = WriteOutcome()
            record_outputs(cfg, plan, outcome, record)
    return dict(phase_result(record, mem.peak), driver_peak_rss_bytes=mem.own_peak, peak_pss_bytes=mem.pss_peak, shards=len(plan.shards),
                shards_embedded=record.counts.shards_embedded, plan_s=record.durations["plan_s"])


def benchmark(cfg: PipelineConfig, args: argparse.Namespace) -> dict:
    if args.scale_point:
        result = scale_point(cfg, json.loads(args.scale_point))
        write_report(result, args.report)
        return result
    if args.scale:
        return scale_benchmark(cfg, args)
    if args.engines:
        return engines_benchmark(cfg, args)
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
        if "noop" in phases:  # the marginal rates: what the extra rows cost, start-up cancelled out
            report["noop_small"] = dict(pipeline_phase(cfg, workdir / "corpus-small", workdir / "out-noop-small", noop=True), docs=small)
    logger.info("pipeline: end to end on %d docs", docs)
    report["pipeline"] = pipeline_phase(cfg, workdir / "corpus", workdir / "out")
    if "baseline" in phases:
        logger.info("baseline: sentence-transformers encode on the same %d texts", docs)
        try:
            report["baseline"] = run_baseline(cfg, prepared.resolved, texts)
        except Exception as e:  # a model sentence-transformers cannot load: say so, keep the rest
            report["baseline"] = {"error": f"{type(e).__name__}: {e}"}
    return add_ratios(report, prepared.resolved)


# -- --engines: the pipeline on each engine against sentence-transformers on each backend -----------

def engine_settings(variant: str, calibration: str | None) -> dict:
    """`engine[:int8[:static]]` as model settings; static calibrates on `calibration`."""
    engine, _, rest = variant.partition(":")
    quant, _, static = rest.partition(":")
    if engine not in ("torch", "onnx", "openvino") or quant not in ("", "int8") or static not in ("", "static"):
        raise ConfigError(f"--engines: {variant!r} is not engine[:int8[:static]] with engine torch, onnx or openvino")
    settings: dict = {"engine": engine, "quantization": "int8" if quant else "none"}
    if static:
        if not calibration:
            raise ConfigError(f"--engines: {variant} calibrates on text: give --calibration-corpus")
        settings["calibration_corpus"] = calibration
    return settings


def engines_benchmark(cfg: PipelineConfig, args: argparse.Namespace) -> dict:
    """Each --engines variant through the whole pipeline on the same corpus, after a warm-up run
    on 200 docs that makes its export (once per node, cached: what every later run finds), and
    sentence-transformers' encode on the matching backends in --baseline-python, side by side."""
    variants = [v.strip() for v in args.engines.split(",") if v.strip()]
    # validated as ModelConfigs: the settings' own checks run before any work
    configs = {v: cfg.model_copy(update={"model": ModelConfig.model_validate({**cfg.model.model_dump(), **engine_settings(v, args.calibration_corpus)})})
               for v in variants}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="corpus-embed-bench-"))
    try:
        texts = corpus_texts(cfg, args.docs)
        write_corpus(texts, workdir / "corpus", args.shard_docs)
        write_corpus(texts[: min(args.docs, 200)], workdir / "corpus-warmup", args.shard_docs)
        report: dict = {"package_version": __version__, "date": time.strftime("%Y-%m-%d"), "model": cfg.model.name,
                        "docs": args.docs, "cpus": os.cpu_count(), "engines": {}}
        init_ray(cfg)
        for v, c in configs.items():
            logger.info("engine %s: warm-up and export, then %d docs", v, args.docs)
            warm = pipeline_phase(c, workdir / "corpus-warmup", workdir / f"out-warmup-{v}")
            run = pipeline_phase(c, workdir / "corpus", workdir / f"out-{v.replace(':', '-')}")
            report["engines"][v] = dict(run, warmup_s=warm["seconds"])
        if "baseline" not in args.skip:
            report["sentence_transformers"] = st_baselines(cfg, texts, sorted({ST_BACKEND[v] for v in variants}, key=list(ST_BACKEND).index),
                                                           args.baseline_python, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    write_report(engine_ratios(report), args.report)
    return report


def st_baselines(cfg: PipelineConfig, texts: list[str], backends: list[str], python: str, workdir: Path) -> dict:
    """pipelines/st_baseline.py in `python`'s environment (its backends need their own: make bench-env)."""
    prepared = prepare(cfg)
    with open(workdir / "texts.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    got = subprocess.run(
        [python, str(Path(__file__).with_name("st_baseline.py")), "--model", local_source(prepared.resolved), "--texts", str(workdir / "texts.jsonl"),
         "--backends", ",".join(backends), "--max-length", str(prepared.resolved.max_length), "--workdir", str(workdir)],
        stdout=subprocess.PIPE, check=False, text=True,
    )
    if got.returncode:
        return {"error": f"{python} pipelines/st_baseline.py exited {got.returncode} (its errors are above); make bench-env sets up its environment"}
    return json.loads(got.stdout.strip().splitlines()[-1])


# -- --scale: cost against the number of shards ---------------------------------------------------


def scale_benchmark(cfg: PipelineConfig, args: argparse.Namespace) -> dict:
    counts = sorted({int(n) for n in args.scale_shards.split(",") if n.strip()})
    if not counts or counts[0] < 1 or args.scale_rows < counts[-1] or args.plan_shards < 0 or args.giant_rows < 0:
        raise ConfigError("--scale-shards: positive shard counts, each at most --scale-rows; --plan-shards, --giant-rows >= 0")
    if args.kill_every and args.nodes < 2:
        raise ConfigError("--kill-every needs --nodes 2 or more: it kills worker nodes")
    runs = [(n, args.scale_rows, True) for n in counts]
    runs += [(n, args.scale_model_rows, False) for n in counts if args.scale_model_rows >= n]
    if args.giant_rows:  # one shard of giant_rows against one of a tenth of it
        runs += [(1, max(1, args.giant_rows // 10), True), (1, args.giant_rows, True)]
    report: dict = {"package_version": __version__, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                    "model": cfg.model.name, "nodes": args.nodes, "s3": args.s3, "kill_every_s": args.kill_every, "points": []}
    def run_point(point: dict, extra: list[str]) -> dict:
        return child_point(cfg, args, point, extra)

    def checked(point: dict) -> dict:  # every point's output: exactly one row per valid input row
        result = where.run(run_point, point)
        if not point.get("again"):
            result["exactly_once"] = check_exactly_once(cfg, point_paths(point)[1], point["rows"])
        return result

    with ScaleCluster(args) as where:
        for shards, rows, noop in runs:
            report["points"].append(checked({"shards": shards, "rows": rows, "noop": noop, "workdir": where.workdir}))
        if args.plan_shards:
            point = {"shards": args.plan_shards, "rows": args.plan_shards, "noop": True, "workdir": where.workdir, "setup": True}
            report["points"].append(checked(point))  # embeds them all (no-op): the output the plan finds up to date
            report["plan"] = checked(dict(point, again=True, setup=False))
    write_report(scale_ratios(report), args.report)
    return report


def check_exactly_once(cfg: PipelineConfig, out: str, rows: int) -> bool:
    """Every vector file's ids together: `rows` of them, none twice (the benchmark corpus has no
    bad rows)."""
    fs, path = get_fs(out, cfg.output.storage)
    ids = 0
    unique: set[str] = set()
    for name in sorted(fs.glob(f"{path.rstrip('/')}/*.parquet")):
        col = read_parquet(fs, name, columns=["id"]).column("id").to_pylist()
        ids += len(col)
        unique.update(col)
    return ids == len(unique) == rows


def point_paths(point: dict) -> tuple[str, str]:
    """(the corpus, the output) of a scale point under its workdir."""
    root, shards, rows = point["workdir"].rstrip("/"), point["shards"], point["rows"]
    return f"{root}/corpus-{shards}x{rows}", f"{root}/out-{shards}x{rows}-{'noop' if point['noop'] else 'model'}"


def child_point(cfg: PipelineConfig, args: argparse.Namespace, point: dict, extra: list[str] = ()) -> dict:
    """One scale point in a fresh interpreter (its own driver, its own peak RSS; the local Ray
    cluster it starts ends with it), on a corpus this process writes first (once per shape).
    Its log goes to <tmp>/corpus-embed-scale-<shards>x<rows>.log."""
    corpus, _ = point_paths(point)
    fs, path = get_fs(corpus, cfg.input.storage)
    if not fs.exists(path):
        logger.info("writing %d rows as %d shards to %s", point["rows"], point["shards"], corpus)
        write_corpus_uri(corpus_texts(cfg, point["rows"]), corpus, point["shards"], cfg.input.storage)
    argv = [sys.executable, str(Path(__file__).resolve())] + (["--config", args.config] if args.config else [])
    for item in args.set:
        argv += ["--set", item]
    argv += list(extra)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        argv += ["--scale-point", json.dumps(point), "--report", out.name]
        log = Path(tempfile.gettempdir()) / f"corpus-embed-scale-{point['shards']}x{point['rows']}.log"
        logger.info("scale point %s (log: %s)", {k: v for k, v in point.items() if k != "workdir"}, log)
        with open(log, "w") as f:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            said = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.startswith("error:")]
            raise RuntimeError(f"scale point failed (exit {rc}): {said[-1] if said else 'no error line'}; see {log}")
        return json.loads(Path(out.name).read_text())


def scale_point(cfg: PipelineConfig, point: dict) -> dict:
    """Run the pipeline on the point's corpus; with `again`, on the output an earlier point left
    (all up to date: the plan alone)."""
    corpus, out = point_paths(point)
    result = pipeline_phase(cfg, corpus, out, noop=point["noop"], fresh=not point.get("again"))
    return dict(result, noop=point["noop"], again=bool(point.get("again")), setup=bool(point.get("setup")), rows_in=point["rows"])


def remove_tree(uri: str, storage) -> None:
    fs, path = get_fs(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--docs", type=int, default=20000, help="corpus size in documents (default 20000)")
    p.add_argument("--shard-docs", type=int, default=2000, help="documents per input shard (default 2000)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--workdir", help="where the corpus and outputs go (default: a temporary folder, removed after)")
    p.add_argument("--skip", action="append", default=[], choices=["baseline", "noop", "memory"], help="leave a phase out (repeatable)")
    p.add_argument("--memory-scale", type=int, default=10, help="the memory phase runs on docs / this (default 10)")
    p.add_argument("--scale", action="store_true", help="measure cost against the number of shards instead (see above)")
    p.add_argument("--scale-shards", default="100,1000,10000", help="shard counts of the scale runs (default 100,1000,10000)")
    p.add_argument("--scale-rows", type=int, default=200_000, help="rows of each no-op scale run (default 200000)")
    p.add_argument("--scale-model-rows", type=int, default=20_000, help="rows of each real-model scale run; 0: none (default 20000)")
    p.add_argument("--plan-shards", type=int, default=100_000, help="up-to-date shards the plan point lists; 0: none (default 100000)")
    p.add_argument("--giant-rows", type=int, default=0, help="also run one shard of this many rows against one of a tenth (0: none)")
    p.add_argument("--nodes", type=int, default=1, help="--scale on a Ray cluster of this many nodes on this machine (default 1: local)")
    p.add_argument("--s3", action="store_true", help="--scale with corpus and outputs on S3 (moto on 127.0.0.1)")
    p.add_argument("--kill-every", type=float, default=0, help="--scale: kill a worker node every this many seconds (needs --nodes >= 2)")
    p.add_argument("--engines", help="the pipeline on each engine variant instead, e.g. torch,onnx,onnx:int8,openvino,openvino:int8 "
                   "(engine[:int8[:static]]), against sentence-transformers' encode on the matching backends")
    p.add_argument("--baseline-python", default=sys.executable, help="--engines: the interpreter of the sentence-transformers baselines "
                   "(its onnx/openvino backends need their own environment: make bench-env, then .venv-st/bin/python)")
    p.add_argument("--calibration-corpus", help="--engines: the text static int8 variants (engine:int8:static) calibrate on")
    p.add_argument("--scale-point", help=argparse.SUPPRESS)  # one point, run by --scale in a child process


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, argv, benchmark, summarize, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
