"""Throughput measurement, for the benchmark scripts: peak memory of a process tree, the device
and CPU, the benchmark corpus, sentence-transformers' `encode` as the baseline (benchmark_report.py
turns the measurements into ratios and tables).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

from operators.config.schema import PipelineConfig
from operators.io.readers import read_shard
from operators.io.storage import InputError, list_shards
from operators.model.resolution import local_source

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
    from operators.io.storage import get_fs

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

    from operators.model.embed import TORCH_DTYPES, pick_device

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
