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
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import __version__
from operators.config import ConfigError, PipelineConfig, load_config
from operators.models import ModelLoadError, local_source, resolve_model
from operators.readers import read_shard
from operators.storage import InputError, list_shards

logger = logging.getLogger("corpus_embed.benchmark")

# Dense bf16/fp16 tensor-core peaks (TFLOP/s), for model FLOP utilisation on known GPUs.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


class PeakMemory:
    """Peak summed RSS of this process and its descendants while the `with` block runs."""

    def __init__(self, interval: float = 0.2, tree: bool = True):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.tree = tree
        self.peak = 0
        self._stop = threading.Event()

    def sample(self) -> int:
        import psutil

        procs = [self.proc] + (self.proc.children(recursive=True) if self.tree else [])
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.peak = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def device_name(cfg: PipelineConfig) -> str:
    import torch

    if cfg.model.device != "cpu" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {os.cpu_count()} cores"


def peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    for key, value in GPU_PEAK_TFLOPS.items():
        if key in device:
            return value
    return None


def corpus_texts(cfg: PipelineConfig, docs: int) -> list[str]:
    """The config's input texts (valid rows, in shard order), cycled to `docs` documents."""
    texts: list[str] = []
    for shard in list_shards(cfg.input.uri, cfg.input.format, cfg.input.storage):
        for block in read_shard(shard, cfg.input):
            rows = zip(block.column("text").to_pylist(), block.column("reason").to_pylist(), block.column("eof").to_pylist())
            texts += [t for t, reason, eof in rows if reason is None and not eof]
    if not texts:
        raise InputError(f"input.uri: no valid text rows in {cfg.input.uri} to build a benchmark corpus from")
    return [texts[i % len(texts)] for i in range(docs)]


def write_corpus(texts: list[str], folder: Path, shard_docs: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(texts), shard_docs)):
        with open(folder / f"part-{n:05d}.jsonl", "w") as f:
            for i, t in enumerate(texts[start : start + shard_docs], start):
                f.write(json.dumps({"id": f"doc-{i}", "text": t}) + "\n")


def run_pipeline(cfg: PipelineConfig, corpus: Path, out: Path, noop: bool = False) -> dict:
    from pipelines.embed_corpus import padding_efficiency, run

    shutil.rmtree(out, ignore_errors=True)
    run_cfg = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"uri": str(corpus), "format": "jsonl"}),
        "output": cfg.output.model_copy(update={"uri": str(out)}),
    })
    with PeakMemory() as mem:
        summary = run(run_cfg, noop=noop)
    secs = summary["seconds"]
    return {
        "rows": summary["rows_written"], "seconds": secs, "rows_per_s": summary["rows_written"] / secs,
        "tokens": summary["tokens"], "tokens_per_s": summary["tokens"] / secs,
        "padding_efficiency": padding_efficiency(summary), "peak_rss_bytes": mem.peak,
        "steady_rows_per_s": summary.get("steady_rows_per_s"),
    }


def run_baseline(cfg: PipelineConfig, resolved, texts: list[str]) -> dict:
    """sentence-transformers' encode over `texts`, same folder, dtype and device; model load untimed."""
    import torch
    from sentence_transformers import SentenceTransformer

    from operators.embed import TORCH_DTYPES, pick_device

    source = local_source(resolved)
    model_kwargs: dict = {"torch_dtype": TORCH_DTYPES[cfg.model.dtype]}
    tokenizer_kwargs: dict = {}
    if resolved.gguf_file:
        model_kwargs["gguf_file"] = tokenizer_kwargs["gguf_file"] = resolved.gguf_file
    device = pick_device(cfg.model.device).type
    st = SentenceTransformer(source, device=device, model_kwargs=model_kwargs, tokenizer_kwargs=tokenizer_kwargs)
    if st.tokenizer.pad_token is None:
        st.tokenizer.pad_token = st.tokenizer.eos_token
    st.max_seq_length = resolved.max_length
    st.encode(texts[:64])  # warm-up
    tokens = sum(min(len(ids), resolved.max_length) for ids in st.tokenizer(texts, truncation=False)["input_ids"])
    with PeakMemory(tree=False) as mem:
        started = time.perf_counter()
        st.encode(texts, batch_size=32 if device == "cpu" else 256)
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - started
    del st
    return {"rows": len(texts), "seconds": secs, "rows_per_s": len(texts) / secs, "tokens": tokens,
            "tokens_per_s": tokens / secs, "peak_rss_bytes": mem.peak}


def model_flops_per_token(resolved) -> float | None:
    """Forward FLOPs per token: 2 x the non-embedding parameters (attention scores left out: small
    at sentence lengths)."""
    if not resolved.layer_parameters:
        return None
    return 2.0 * resolved.layer_parameters


def benchmark(cfg: PipelineConfig, docs: int, shard_docs: int, workdir: Path, phases: set[str], memory_scale: int) -> dict:
    from pipelines.embed_corpus import init_ray

    resolved = resolve_model(cfg.model, cfg.extraction)
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
    report["warmup"] = run_pipeline(cfg, workdir / "corpus-warmup", workdir / "out-warmup", noop=True)
    if "noop" in phases:
        logger.info("noop: the data path with a no-op model")
        report["noop"] = run_pipeline(cfg, workdir / "corpus", workdir / "out-noop", noop=True)
    if "memory" in phases:
        small = max(1, docs // memory_scale)
        write_corpus(texts[:small], workdir / "corpus-small", shard_docs)
        logger.info("memory reference: the pipeline on %d docs", small)
        report["pipeline_small"] = dict(run_pipeline(cfg, workdir / "corpus-small", workdir / "out-small"), docs=small)
    logger.info("pipeline: end to end on %d docs", docs)
    report["pipeline"] = run_pipeline(cfg, workdir / "corpus", workdir / "out")
    if "baseline" in phases:
        logger.info("baseline: sentence-transformers encode on the same %d texts", docs)
        try:
            report["baseline"] = run_baseline(cfg, resolved, texts)
        except Exception as e:  # a model sentence-transformers cannot load: say so, keep the rest
            report["baseline"] = {"error": f"{type(e).__name__}: {e}"}

    p = report["pipeline"]
    report["pipeline_rows_per_s"] = p["rows_per_s"]
    report["pipeline_tokens_per_s"] = p["tokens_per_s"]
    report["padding_efficiency"] = p["padding_efficiency"]
    report["peak_rss_bytes"] = p["peak_rss_bytes"]
    report["baseline_rows_per_s"] = report.get("baseline", {}).get("rows_per_s")
    report["noop_rows_per_s"] = report.get("noop", {}).get("rows_per_s")
    if report["baseline_rows_per_s"]:
        report["pipeline_vs_baseline"] = p["rows_per_s"] / report["baseline_rows_per_s"]
    if report["noop_rows_per_s"]:
        report["noop_vs_pipeline"] = report["noop_rows_per_s"] / p["rows_per_s"]
        n_steady, p_steady = report["noop"].get("steady_rows_per_s"), p.get("steady_rows_per_s")
        report["noop_steady_rows_per_s"] = n_steady
        if n_steady and p_steady:
            report["noop_vs_pipeline_steady"] = n_steady / p_steady
    if "pipeline_small" in report:
        report["peak_rss_ratio_vs_small"] = p["peak_rss_bytes"] / report["pipeline_small"]["peak_rss_bytes"]
        report["memory_scale"] = memory_scale
    per_token = model_flops_per_token(resolved)
    if per_token:
        report["model_parameters_estimate"] = resolved.parameters
        report["model_layer_parameters_estimate"] = resolved.layer_parameters
        report["model_tflops"] = per_token * p["tokens_per_s"] / 1e12
        peak = peak_tflops(report["device"])
        report["model_flops_utilisation"] = report["model_tflops"] / peak if peak else None
    return report


def format_report(r: dict) -> str:
    gib = 1 / 2**30
    lines = [f"device: {r['device']}; model {r['model']} ({r['dtype']}, {r['pooling']}); {r['docs']} docs"]
    for name in ("pipeline", "baseline", "noop", "pipeline_small", "warmup"):
        x = r.get(name)
        if not x:
            continue
        if "error" in x:
            lines.append(f"  {name:15s} unavailable: {x['error']}")
            continue
        steady = f"  steady {x['steady_rows_per_s']:9.1f} rows/s" if x.get("steady_rows_per_s") else ""
        lines.append(
            f"  {name:15s} {x['rows']:>8d} rows in {x['seconds']:7.1f}s  {x['rows_per_s']:9.1f} rows/s  "
            f"{x['tokens_per_s']:10.0f} tokens/s  peak RSS {x['peak_rss_bytes'] * gib:5.2f} GiB{steady}"
        )
    lines.append(f"  padding efficiency (real / padded tokens): {r['padding_efficiency']:.3f}")
    if "pipeline_vs_baseline" in r:
        lines.append(f"  pipeline / sentence-transformers encode: {r['pipeline_vs_baseline']:.2f}x")
    if "noop_vs_pipeline" in r:
        lines.append(f"  no-op data path / pipeline: {r['noop_vs_pipeline']:.1f}x end to end"
                     + (f", {r['noop_vs_pipeline_steady']:.1f}x in steady state" if r.get("noop_vs_pipeline_steady") else ""))
    if "peak_rss_ratio_vs_small" in r:
        lines.append(f"  peak RSS at {r['memory_scale']}x the documents: {r['peak_rss_ratio_vs_small']:.2f}x")
    if "model_tflops" in r:
        util = r.get("model_flops_utilisation")
        lines.append(f"  model FLOP rate: {r['model_tflops'] * 1e3:.1f} GFLOP/s" + (f", {util:.1%} of the GPU's peak" if util else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config: model and extraction (default: configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--docs", type=int, default=20000, help="corpus size in documents (default 20000)")
    p.add_argument("--shard-docs", type=int, default=2000, help="documents per input shard (default 2000)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--workdir", help="where the corpus and outputs go (default: a temporary folder, removed after)")
    p.add_argument("--skip", action="append", default=[], choices=["baseline", "noop", "memory"], help="leave a phase out (repeatable)")
    p.add_argument("--memory-scale", type=int, default=10, help="the memory phase runs on docs / this (default 10)")
    args = p.parse_args(argv)
    if args.docs < 1 or args.shard_docs < 1 or args.memory_scale < 1:
        print("error: --docs, --shard-docs and --memory-scale must be positive", file=sys.stderr)
        return 2
    phases = {"baseline", "noop", "memory"} - set(args.skip)
    try:
        cfg = load_config(args.config, args.set)
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="corpus-embed-bench-"))
        try:
            report = benchmark(cfg, args.docs, args.shard_docs, workdir, phases, args.memory_scale)
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    except (ConfigError, InputError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
