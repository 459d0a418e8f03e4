"""Throughput measurement, for pipelines/benchmark.py: peak memory of a process tree, the device,
the benchmark corpus, sentence-transformers' `encode` as the baseline, and the report's text.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

from operators.config import PipelineConfig
from operators.models import local_source
from operators.readers import read_shard
from operators.storage import InputError, list_shards

# Dense bf16/fp16 tensor-core peaks (TFLOP/s), for model FLOP utilisation on known GPUs.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


def pss_bytes(pid: int) -> int:
    """A process's proportional set size, from /proc/<pid>/smaps_rollup (the kernel's own sum,
    ~0.3 ms; psutil's memory_full_info parses all of smaps, ~5 ms); 0 where there is none."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak summed RSS of this process and its descendants while the `with` block runs (`peak`),
    of this process alone (`own_peak`: the driver's), and the peak summed PSS (`pss_peak`).

    Summed RSS counts a page shared by k processes k times: Ray's object store is one shared
    mapping that every worker touches, so a longer run's RSS sum grows with the pages each worker
    has touched, not with what the machine holds. PSS charges a shared page 1/k to each, so its
    sum is the memory the processes hold. Sampling is a tax on the run measured, so the process
    list is refreshed once every `every` samples (listing descendants scans /proc: ~3 ms) and PSS
    read once every `pss_every` (a Ray worker's smaps_rollup takes ~5 ms: its mappings are many)."""

    def __init__(self, interval: float = 0.2, tree: bool = True, every: int = 5, pss_every: int = 25):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.tree = tree
        self.every = every
        self.pss_every = pss_every
        self.peak = 0
        self.own_peak = 0
        self.pss_peak = 0
        self._samples = 0
        self._procs = [self.proc]
        self._stop = threading.Event()

    def sample(self) -> int:
        import psutil

        listing, full = self._samples % self.every == 0, self._samples % self.pss_every == 0
        self._samples += 1
        if listing and self.tree:
            try:
                self._procs = [self.proc] + self.proc.children(recursive=True)
            except psutil.Error:
                pass
        total = pss = 0
        for p in self._procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:  # gone since the last listing
                continue
            total += rss
            if p is self.proc:
                self.own_peak = max(self.own_peak, rss)
            if full:
                pss += pss_bytes(p.pid)
        self.pss_peak = max(self.pss_peak, pss)
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
        self._samples = 0  # a last full sample
        self.peak = max(self.peak, self.sample())


def device_name(cfg: PipelineConfig) -> str:
    import torch  # the baseline loads it anyway

    if cfg.model.device != "cpu" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu: {cpu_name()}, {os.cpu_count()} cores"


def cpu_name(flags: bool = False) -> str:
    """The CPU's model name (from /proc/cpuinfo), with its vector extensions when `flags`."""
    cpu, found = platform.processor() or platform.machine(), []
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            found = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in have]
            break
    return f"{cpu} ({' '.join(found) or 'no AVX2'})" if flags else cpu


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


def write_corpus_uri(texts: list[str], uri: str, shards: int, storage) -> str:
    """`texts` as `shards` JSONL shards of about equal rows under any fsspec URI (the scale runs'
    corpus: local or object storage); returns the URI."""
    from operators.storage import get_fs

    fs, root = get_fs(uri, storage)
    fs.makedirs(root, exist_ok=True)
    per, extra = divmod(len(texts), shards)
    start = 0
    for n in range(shards):
        stop = start + per + (n < extra)
        body = "".join(json.dumps({"id": f"doc-{i}", "text": texts[i]}) + "\n" for i in range(start, stop))
        fs.pipe_file(f"{root.rstrip('/')}/part-{n:06d}.jsonl", body.encode())
        start = stop
    return uri


def write_corpus(texts: list[str], folder: Path, shard_docs: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(texts), shard_docs)):
        with open(folder / f"part-{n:05d}.jsonl", "w") as f:
            for i, t in enumerate(texts[start : start + shard_docs], start):
                f.write(json.dumps({"id": f"doc-{i}", "text": t}) + "\n")


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


def phase_result(record, peak_rss_bytes: int) -> dict:
    """A pipeline phase's figures from its run record."""
    c, secs = record.counts, record.seconds
    return {
        "rows": c.rows_written, "seconds": secs, "rows_per_s": c.rows_written / secs, "tokens": c.tokens,
        "tokens_per_s": c.tokens / secs, "padding_efficiency": c.padding_efficiency, "peak_rss_bytes": peak_rss_bytes,
        "steady_rows_per_s": record.steady_rows_per_s,
    }


def marginal_rows_per_s(big: dict, small: dict) -> float | None:
    """The rows a phase adds over the same phase on fewer rows, per second it adds: the fixed costs
    of a run (preparation, actor start, model load) cancel out. None when the larger run was not slower."""
    rows, secs = big["rows"] - small["rows"], big["seconds"] - small["seconds"]
    return rows / secs if rows > 0 and secs > 0 else None


def add_ratios(report: dict, resolved) -> dict:
    """The headline figures and ratios, from the phases a report holds."""
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
        report["pipeline_marginal_rows_per_s"] = marginal_rows_per_s(p, report["pipeline_small"])
    if "noop_small" in report:
        report["noop_marginal_rows_per_s"] = marginal_rows_per_s(report["noop"], report["noop_small"])
        if report["noop_marginal_rows_per_s"] and report["pipeline_marginal_rows_per_s"]:
            report["noop_vs_pipeline_marginal"] = report["noop_marginal_rows_per_s"] / report["pipeline_marginal_rows_per_s"]
    per_token = model_flops_per_token(resolved)
    if per_token:
        report["model_parameters_estimate"] = resolved.parameters
        report["model_layer_parameters_estimate"] = resolved.layer_parameters
        report["model_tflops"] = per_token * p["tokens_per_s"] / 1e12
        peak = peak_tflops(report["device"])
        report["model_flops_utilisation"] = report["model_tflops"] / peak if peak else None
    return report


def write_report(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def format_report(r: dict) -> str:
    gib = 1 / 2**30
    lines = [f"device: {r['device']}; model {r['model']} ({r['dtype']}, {r['pooling']}); {r['docs']} docs"]
    for name in ("pipeline", "baseline", "noop", "pipeline_small", "noop_small", "warmup"):
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
    if r.get("noop_vs_pipeline_marginal"):
        lines.append(f"  marginal rates (rows over the {r['memory_scale']}x smaller run): pipeline {r['pipeline_marginal_rows_per_s']:.1f} rows/s, "
                     f"no-op {r['noop_marginal_rows_per_s']:.0f} rows/s: {r['noop_vs_pipeline_marginal']:.1f}x")
    if "peak_rss_ratio_vs_small" in r:
        lines.append(f"  peak RSS at {r['memory_scale']}x the documents: {r['peak_rss_ratio_vs_small']:.2f}x")
    if "model_tflops" in r:
        util = r.get("model_flops_utilisation")
        lines.append(f"  model FLOP rate: {r['model_tflops'] * 1e3:.1f} GFLOP/s" + (f", {util:.1%} of the GPU's peak" if util else ""))
    return "\n".join(lines)


def scale_ratios(report: dict) -> dict:
    """Per point: milliseconds per shard and microseconds per row; then for the no-op and the model
    runs of one row count, the most shards against the fewest (driver peak RSS, wall time per row;
    the targets: <= 1.3x and <= 1.5x), and for one giant shard against one of a tenth of its rows
    (peak RSS of every process: the target <= 1.3x; and PSS, which counts the object store's
    shared pages once)."""
    points = report["points"]
    for p in points + ([report["plan"]] if report.get("plan") else []):
        p["ms_per_shard"] = 1e3 * p["seconds"] / max(p["shards"], 1)
        p["us_per_row"] = 1e6 * p["seconds"] / max(p["rows_in"], 1)
    for kind, noop in (("noop", True), ("model", False)):
        same = [p for p in points if p["noop"] == noop and not p.get("setup") and p["shards"] > 1]
        rows = max((p["rows_in"] for p in same), default=0)
        same = [p for p in same if p["rows_in"] == rows]
        if len(same) >= 2:
            lo, hi = min(same, key=lambda p: p["shards"]), max(same, key=lambda p: p["shards"])
            report[f"{kind}_shards"] = [lo["shards"], hi["shards"]]
            report[f"{kind}_driver_rss_ratio"] = hi["driver_peak_rss_bytes"] / lo["driver_peak_rss_bytes"]
            report[f"{kind}_time_per_row_ratio"] = hi["us_per_row"] / lo["us_per_row"]
    giants = sorted((p for p in points if p["shards"] == 1 and p["noop"]), key=lambda p: p["rows_in"])
    if len(giants) >= 2:  # the two largest: --giant-rows and a tenth of it
        report["giant_rows"] = [giants[-2]["rows_in"], giants[-1]["rows_in"]]
        report["giant_peak_rss_ratio"] = giants[-1]["peak_rss_bytes"] / giants[-2]["peak_rss_bytes"]
        if giants[-1].get("peak_pss_bytes") and giants[-2].get("peak_pss_bytes"):
            report["giant_peak_pss_ratio"] = giants[-1]["peak_pss_bytes"] / giants[-2]["peak_pss_bytes"]
    return report


def format_scale_report(r: dict) -> str:
    mib = 1 / 2**20
    lines = [f"scale: {r['cpus']} CPUs, model {r['model']}",
             "  run      shards      rows    wall s  ms/shard  us/row   plan s  driver peak MiB  all procs MiB (RSS, PSS)"]
    for p in r["points"] + ([dict(r["plan"], label="plan")] if r.get("plan") else []):
        label = p.get("label") or ("noop" if p["noop"] else "model")
        lines.append(
            f"  {label:6s} {p['shards']:>8d} {p['rows_in']:>9d} {p['seconds']:9.1f} {p['ms_per_shard']:9.2f} {p['us_per_row']:7.1f}"
            f" {p['plan_s']:8.1f} {p['driver_peak_rss_bytes'] * mib:16.0f} {p['peak_rss_bytes'] * mib:14.0f} {p.get('peak_pss_bytes', 0) * mib:6.0f}"
            + ("  (all up to date)" if p.get("again") and not p.get("shards_embedded") else f"  ({p['attempts']} attempts, {p.get('nodes_killed', 0)} nodes killed)" if p.get("attempts") else "")
        )
    for kind in ("noop", "model"):
        if f"{kind}_shards" in r:
            lo, hi = r[f"{kind}_shards"]
            lines.append(f"  {kind}: {hi} shards vs {lo}: driver peak RSS {r[kind + '_driver_rss_ratio']:.2f}x, "
                         f"wall time per row {r[kind + '_time_per_row_ratio']:.2f}x")
    if "giant_rows" in r:
        lines.append(f"  one shard of {r['giant_rows'][1]} rows vs one of {r['giant_rows'][0]}: peak RSS {r['giant_peak_rss_ratio']:.2f}x"
                     + (f", peak PSS {r['giant_peak_pss_ratio']:.2f}x (shared pages counted once)" if "giant_peak_pss_ratio" in r else ""))
    return "\n".join(lines)
