"""Helpers shared by the tests (conftest.py holds the fixtures): paths, corpora, the bad-input
catalogue, the S3 fault proxy, small builders. No test module imports another."""

from __future__ import annotations

import bz2
import gzip
import http.client
import io
import json
import lzma
import os
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from operators.config.loading import load_config
from operators.config.schema import ExtractionConfig, ModelConfig
from operators.io.readers import READ_SCHEMA
from operators.io.storage import read_parquet
from operators.model.resolution import resolve_model
from operators.model.tokenize import EmbedSpec

REPO = Path(__file__).resolve().parents[1]


# The benchmark data: a mirror of the sources (operators/io/sources.py), from the setting users have.
# Unset, the tests that need real benchmark data skip, naming it; .ci/run sets it where a mirror lies
# beside the clone.
MIRROR = Path(os.environ["CORPUS_EMBED_MIRROR"]) if os.environ.get("CORPUS_EMBED_MIRROR") else None
needs_mirror = pytest.mark.skipif(
    MIRROR is None, reason="needs the benchmark data: set CORPUS_EMBED_MIRROR (or eval.mirror) to a mirror of the "
    "sources (python pipelines/fill_mirror.py --mirror DIR fills one)")
WIKI_VALID = "wikitext-2-raw-v1/validation"  # the named fit corpus, read through the mirror


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (JSON-encoded) or raw lines (str/bytes written verbatim)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


def sample_sentences(n: int) -> list[str]:
    """Real English sentences from the bundled sample corpus."""
    lines = (REPO / "configs" / "sample_corpus" / "part-000.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    return (texts * (n // len(texts) + 1))[:n]


def fit_corpus(folder, n: int = 400) -> str:
    """A raw text file of `n` real sentences to fit whitening on in logic tests (Wikitext's stand-in)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fit.txt"
    path.write_text("\n".join(sample_sentences(n)) + "\n")
    return str(path)


def save_tiny(folder, model, tokenizer_path) -> str:
    from transformers import AutoTokenizer

    model.eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
    return str(folder)




# -- catalogue: The bad-input catalogue as data: records and files an attacker or a broken producer hands the


def good(i: int) -> bytes:
    return json.dumps({"id": f"ok-{i}", "text": f"A sentence that embeds, number {i}."}).encode()


RECORDS: list[tuple[str, bytes, str | None]] = [
    ("malformed JSON", b'{"id": "b", "text": "unterminated', "malformed JSON"),
    ("trailing garbage", b'{"text": "a"} trailing', "malformed JSON"),
    ("null text", b'{"text": null}', "null text"),
    ("int text", b'{"text": 42}', "non-string text (int)"),
    ("list text", b'{"text": ["a"]}', "non-string text (list)"),
    ("object text", b'{"text": {"a": 1}}', "non-string text (dict)"),
    ("bool text", b'{"text": true}', "non-string text (bool)"),
    ("empty text", b'{"text": ""}', "empty text"),
    ("whitespace text", b'{"text": " \\t\\n "}', "empty text"),
    ("missing field", b'{"body": "x"}', "missing field 'text'"),
    ("latin-1 byte", b'{"text": "caf\xe9"}', "undecodable bytes"),
    ("bad continuation byte", b'{"text": "\xe2\x28\xa1"}', "undecodable bytes"),
    ("overlong UTF-8", b'{"text": "\xc0\xaf"}', "undecodable bytes"),
    ("JSON list", b"[1, 2, 3]", "not a JSON object (list)"),
    ("JSON string", b'"just a string"', "not a JSON object (str)"),
    ("JSON number", b"3.5", "not a JSON object (float)"),
    ("JSON null", b"null", "not a JSON object (NoneType)"),
    ("blank line", b"", "empty line"),
    ("spaces line", b"    ", "empty line"),
    ("lone surrogate in text", b'{"id": "s1", "text": "x \\ud83d"}', "not valid Unicode: a lone surrogate in the text"),
    ("lone surrogate in id", b'{"id": "\\udc00", "text": "fine text"}', "not valid Unicode: a lone surrogate in the id"),
    ("nested 5,000 deep", b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed JSON: nested too deeply"),
    ("NUL escapes in text", b'{"text": "nul \\u0000 inside"}', None),
    ("zero-width text", b'{"text": "\\u200b"}', None),
    ("null id", b'{"id": null, "text": "derived id"}', None),
    ("object id", b'{"id": {"a": 1}, "text": "object id"}', None),
    ("duplicate JSON keys", b'{"text": "first", "text": "second"}', None),
    ("NaN field", b'{"text": "has NaN", "score": NaN}', None),
    ("CRLF ending", b'{"text": "windows line"}\r', None),
    ("100 KB text", json.dumps({"text": "long " * 20000}).encode(), None),
    ("astral characters", json.dumps({"text": "emoji \U0001f600 and \U00020000"}, ensure_ascii=False).encode(), None),
    ("right-to-left and combining", json.dumps({"text": "\u202eabc e\u0301"}, ensure_ascii=False).encode(), None),
]


def records_file() -> bytes:
    """Every RECORDS line, each between two good lines (so a rejection never eats a neighbour)."""
    lines = [good(0)]
    for i, (_, raw, _) in enumerate(RECORDS, 1):
        lines += [raw, good(i)]
    return b"\n".join(lines) + b"\n"


@dataclass(frozen=True)
class FileCase:
    name: str  # file name in the corpus folder
    data: bytes
    embedded: int  # records that embed
    rejected: int  # records rejected (a shard read error counts one)
    read_error: bool = False


def _jsonl(n: int, prefix: str) -> bytes:
    return b"".join(json.dumps({"id": f"{prefix}-{i}", "text": f"row {i} of {prefix} " * 8}).encode() + b"\n" for i in range(n))


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _corrupt_deflate() -> bytes:
    data = bytearray(gzip.compress(_jsonl(400, "gz")))
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    return bytes(data)


def _corrupt_xz() -> bytes:
    data = bytearray(lzma.compress(_jsonl(50, "xz")))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _corrupt_bz2() -> bytes:
    data = bytearray(bz2.compress(_jsonl(50, "bz")))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def file_cases() -> list[FileCase]:
    good_pq = _parquet(pa.table({"id": [f"p{i}" for i in range(20)], "text": [f"parquet row {i}" for i in range(20)]}))
    n_records = 1 + 2 * len(RECORDS)
    n_bad = sum(1 for _, _, r in RECORDS if r)
    return [
        FileCase("records.jsonl", records_file(), n_records - n_bad, n_bad),
        FileCase("bom.jsonl", b"\xef\xbb\xbf" + _jsonl(3, "bom"), 3, 0),
        FileCase("bom.txt", b"\xef\xbb\xbfa first line\nsecond\n", 2, 0),
        FileCase("empty.jsonl", b"", 0, 0),
        FileCase("blank-lines.jsonl", b"\n\n\n", 0, 3),
        FileCase("truncated.jsonl.gz", gzip.compress(_jsonl(400, "t"))[:1500], 0, 1, True),  # rows before the cut embed
        FileCase("corrupt-deflate.jsonl.gz", _corrupt_deflate(), 0, 1, True),
        FileCase("not-gzip.jsonl.gz", b'{"text": "plain text with a .gz name"}\n', 0, 1, True),
        FileCase("invalid.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\x00garbage" * 20, 0, 1, True),
        FileCase("corrupt.jsonl.xz", _corrupt_xz(), 0, 1, True),
        FileCase("corrupt.jsonl.bz2", _corrupt_bz2(), 0, 1, True),
        FileCase("garbage.parquet", b"this is no parquet file at all" * 10, 0, 1, True),
        FileCase("truncated.parquet", good_pq[: len(good_pq) // 2], 0, 1, True),
        FileCase("int-text.parquet", _parquet(pa.table({"text": pa.array([1, 2], pa.int64())})), 0, 2),
        FileCase("no-text-column.parquet", _parquet(pa.table({"body": ["a", "b", "c"]})), 0, 3),
        FileCase("invalid-utf8.txt", b"good line\n\xff\xfe bad\nanother\n", 2, 1),
        FileCase("x" * 245 + ".jsonl", _jsonl(2, "long-name"), 2, 0),  # 251 bytes: the longest a file name may be
        FileCase("ünïcødé név 名前.jsonl", _jsonl(2, "unicode"), 2, 0),
    ]


# Cases whose embedded count depends on where the bytes break: at least this many rows before it.
AT_LEAST = {"truncated.jsonl.gz", "corrupt-deflate.jsonl.gz", "corrupt.jsonl.xz", "corrupt.jsonl.bz2"}


# -- s3_faults: A fault-injecting HTTP proxy in front of the moto S3 server, for tests only.


HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class S3FaultProxy:
    def __init__(self, upstream: str, rule=None, max_faults: int = 10_000, timeout: float = 30.0):
        target = urlsplit(upstream)
        assert target.hostname in ("127.0.0.1", "localhost"), "the fault proxy only fronts a local server"
        self.upstream = (target.hostname, target.port)
        self.rule = rule or (lambda method, path, n: None)
        self.max_faults = max_faults
        self.timeout = timeout
        self.requests: Counter = Counter()
        self.faults: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                fault = proxy._decide(self.command, self.path)
                if fault is not None:
                    status, code = fault
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>injected by the test proxy</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)  # a HEAD's length is the object's, not its empty body's
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, method: str, path: str):
        with self._lock:
            self.requests[method] += 1
            if sum(self.faults.values()) >= self.max_faults:
                return None
            fault = self.rule(method, path, self.requests[method])
            if fault is not None:
                self.faults[fault[1]] += 1
            return fault

    def __enter__(self) -> "S3FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def random_faults(rate: float, seed: int = 0, methods=("GET", "HEAD", "PUT")):
    """A rule failing `rate` of the requests at random with throttling and 5xx answers."""
    rng = random.Random(seed)
    kinds = [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")]

    def rule(method, path, n):
        if method in methods and rng.random() < rate:
            return rng.choice(kinds)
        return None

    return rule


def batch(texts, reasons=None):
    n = len(texts)
    reasons = reasons or [None] * n
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "text": [None if r else t for t, r in zip(texts, reasons)],
            "shard": ["s"] * n,
            "line": list(range(1, n + 1)),
            "reason": reasons,
            "raw": [None] * n,
            "eof": [False] * n,
        },
        schema=READ_SCHEMA,
    )




def spec_for(name, *, dtype="float32", batch_size=None, max_batch_tokens=16384, model_kw=None, **ex):
    model = ModelConfig(name=name, dtype=dtype, batch_size=batch_size, max_batch_tokens=max_batch_tokens, **(model_kw or {}))
    extraction = ExtractionConfig(**ex)
    return EmbedSpec(model, extraction, resolve_model(model, extraction))


def texts_of_mixed_length(n=120):
    base = sample_sentences(n)
    # lengths from 1 word to well past a 64-token budget: buckets of very different widths
    return [" ".join([t] * (1 + i % 4)) if i % 7 else t.split()[0] for i, t in enumerate(base)]




BAD_JSONL = [
    {"id": "a", "text": "A fine sentence."},
    '{"id": "b", "text": "unterminated',  # malformed JSON
    {"id": "c", "text": None},  # null
    {"id": "d", "text": 42},  # non-string
    {"id": "e", "text": "   "},  # empty after strip
    {"id": "f", "body": "wrong field"},  # missing text field
    b'{"id": "g", "text": "caf\xe9"}',  # latin-1 byte: not UTF-8
    "[1, 2, 3]",  # not an object
    "",  # blank line
    {"text": "no id here"},  # derived id
    {"id": 7, "text": "numeric id"},
]


EXPECTED_REASONS = {
    2: "malformed JSON",
    3: "null text",
    4: "non-string text (int)",
    5: "empty text",
    6: "missing field 'text'",
    7: "undecodable bytes",
    8: "not a JSON object (list)",
    9: "empty line",
}




def config(tmp_path, input_uri, output_uri, model, *extra):
    tree = {
        "input": {"uri": str(input_uri), "rows_per_block": 64},
        "output": {"uri": str(output_uri)},
        "model": {"name": model, "batch_size": 32},
        "extraction": {"pooling": "mean", "normalize": True},
        # one model actor, tokenization fused into the reads: fewer processes to start per run on 2
        # cores. test_local_end_to_end_with_bad_rows and test_s3_input_and_output run the default pools.
        "ray": {"batch_size": 64, "max_actors": 1, "tokenize_on": "tasks"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path, list(extra)), path


def read_vectors(fs, out_dir) -> dict[str, np.ndarray]:
    vectors = {}
    for p in sorted(fs.glob(f"{out_dir.rstrip('/')}/*.parquet")):
        t = read_parquet(fs, p)
        for i, v in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()):
            assert i not in vectors, f"duplicate id {i}"
            vectors[i] = np.asarray(v, dtype=np.float32)
    return vectors


def make_corpus(root: Path, shards: int, rows: int, bad: bool = False) -> Path:
    texts = sample_sentences(shards * rows)
    for k in range(shards):
        recs = [{"id": f"s{k}-{i}", "text": texts[k * rows + i]} for i in range(rows)]
        write_jsonl(root / f"part-{k:02d}.jsonl", recs + (BAD_JSONL if bad and k == 0 else []))
    return root




def commit_in_process(cfg, prepared, plan):
    """The write path without Ray, for unit tests of planning and bookkeeping: each shard of
    `plan.todo` read, embedded by the no-op model (zero vectors, real counts), staged and
    committed; returns the WriteOutcome the Ray sink would."""
    import posixpath
    import uuid

    from operators.io.incremental import PreviousShard, mark_reuse
    from operators.io.readers import read_shard
    from operators.io.storage import get_fs
    from operators.io.writers import STAGING_DIR, WriteOutcome, commit_shard, stage_part
    from operators.model.vectors import ARROW_FLOATS, NoopEmbedder

    fs, out_dir = get_fs(plan.out_uri, cfg.output.storage)
    staging = posixpath.join(out_dir, STAGING_DIR, uuid.uuid4().hex[:8])
    model = NoopEmbedder(prepared.spec())
    outcome = WriteOutcome()
    for shard in plan.todo:
        previous = PreviousShard.open(fs, posixpath.join(out_dir, shard.output_name), index_only=True) if shard.rel in plan.changed else None
        parts = [stage_part(fs, staging, shard.output_name.removesuffix(".parquet"), model(mark_reuse(b, previous)))
                 for b in read_shard(shard, cfg.input, plan.stats_for(shard).seed())]
        stats = commit_shard(fs, out_dir, staging, plan.stats_for(shard), parts, prepared.dimension,
                             ARROW_FLOATS[cfg.output.dtype], prepared.provenance, cfg.input.duplicate_ids)
        outcome.committed[shard.public_uri] = stats.to_json()
    return outcome


def make_bench(root):
    """A tiny mirror in the sources' layout (hf/datasets/<repo>/<file>, senteval/...), with the
    MIRROR.json pipelines/fill_mirror.py writes: STSBenchmark and STS13 (20 pairs), SciFact (12
    documents, 4 queries), Banking77 (30 texts), SentEval MR and TREC."""
    from operators.evaluation.eval_data import SENTEVAL_FILES
    from operators.io.sources import MANIFEST, sha256_of

    s = sample_sentences(120)
    rng = np.random.default_rng(1)
    files = {}

    def put(rel, data: bytes, repo="x", revision="r"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = {"repo": repo, "revision": revision, "sha256": sha256_of(str(path))}

    pairs = "".join(json.dumps({"sentence1": s[i], "sentence2": s[i + 1], "score": round(float(rng.uniform(0, 5)), 2)}) + "\n" for i in range(0, 40, 2))
    put("hf/datasets/mteb/stsbenchmark-sts/test.jsonl.gz", gzip.compress(pairs.encode()), "mteb/stsbenchmark-sts", "b0fddb56ed78048fa8b90373c8a3cfc37b684831")
    put("hf/datasets/mteb/sts13-sts/test.jsonl.gz", gzip.compress(pairs.encode()), "mteb/sts13-sts", "7e90230a92c190f1bf69ae9002b8cea547a64cca")
    docs = [{"_id": str(100 + i), "title": f"Title {i}", "text": s[40 + i]} for i in range(12)]
    queries = [{"_id": str(q), "text": s[60 + q]} for q in range(4)]
    qrels = "query-id\tcorpus-id\tscore\r\n" + "".join(f"{q}\t{100 + 3 * q}\t1\r\n" for q in range(4))
    scifact = ("mteb/scifact", "d56462d0e63a25450459c4f213e49ffdb866f7f9")
    put("hf/datasets/mteb/scifact/corpus.jsonl", "".join(json.dumps(d) + "\n" for d in docs).encode(), *scifact)
    put("hf/datasets/mteb/scifact/queries.jsonl", "".join(json.dumps(q) + "\n" for q in queries).encode(), *scifact)
    put("hf/datasets/mteb/scifact/qrels/test.tsv", qrels.encode(), *scifact)
    banking = "".join(json.dumps({"text": t, "label": i % 3, "label_text": f"c{i % 3}"}) + "\n" for i, t in enumerate(s[60:90]))
    put("hf/datasets/mteb/banking77/test.jsonl", banking.encode(), "mteb/banking77", "0fd18e25b25c072e09e0d92ab615fda904d66300")
    pos, neg = SENTEVAL_FILES["mr"]
    put(pos.in_mirror, "".join(t + "\n" for t in s[:30]).encode(), pos.repo, pos.revision)
    put(neg.in_mirror, "".join(t + "\n" for t in s[30:60]).encode(), neg.repo, neg.revision)
    train, test = SENTEVAL_FILES["trec"]
    put(train.in_mirror, "".join(f"A{i % 2}:x {t}\n" for i, t in enumerate(s[:40])).encode(), train.repo, train.revision)
    put(test.in_mirror, "".join(f"A{i % 2}:x {t}\n" for i, t in enumerate(s[40:60])).encode(), test.repo, test.revision)
    (root / MANIFEST).write_text(json.dumps({"files": files}))
    return root


def make_pairs(path, n: int = 20):
    """A pair file (score<TAB>sentence1<TAB>sentence2, header) of `n` real sentence pairs, random gold."""
    s = sample_sentences(2 * n)
    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("score\tsentence1\tsentence2\n" + "".join(f"{rng.uniform(0, 5):.2f}\t{s[2 * i]}\t{s[2 * i + 1]}\n" for i in range(n)))
    return path


def refuse_after(monkeypatch, cls, method: str, allowed: int, error: Exception) -> None:
    """A store that lets `allowed` calls of `method` through, then raises `error` on every one
    after (a write refused mid-sync); monkeypatch.undo() puts the real method back."""
    real, calls = getattr(cls, method), []

    def refusing(self, *a, **k):
        calls.append(1)
        if len(calls) > allowed:
            raise error
        return real(self, *a, **k)

    monkeypatch.setattr(cls, method, refusing)


def bag_of_words(dim: int = 64, batch: int = 16, calls: list | None = None):
    """A real, deterministic embedding function for evaluation tests without a model or Ray: the
    sum of per-word random vectors (seeded by the word). `calls` collects each call's text count."""
    import zlib

    cache: dict[str, np.ndarray] = {}

    def word(w: str) -> np.ndarray:
        if w not in cache:
            cache[w] = np.random.default_rng(zlib.crc32(w.encode())).normal(size=dim)
        return cache[w]

    def embed(texts):
        return np.stack([sum((word(w) for w in t.lower().split()), np.zeros(dim)) + 1e-3 for t in texts]).astype(np.float32)

    def embed_fn(keys, texts):
        if calls is not None:
            calls.append(len(texts))
        for i in range(0, len(texts), batch):
            yield keys[i : i + batch], embed(texts[i : i + batch])

    embed_fn.embed = embed
    return embed_fn
