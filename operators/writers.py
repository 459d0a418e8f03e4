"""Vector shards: stage parts, prove a shard complete, commit it atomically, keep the manifest.

Layout under `output.uri`:

    <output_name>.parquet            one vector shard per input shard: columns id, embedding
    _rejected/<output_name>.parquet  rows that could not be embedded: id, shard, line, reason, raw
    manifest.json                    every shard: input fingerprint and row counts
    _staging/<run_id>/               parts of shards in flight; removed when committed

A shard is committed only once its parts hold every record 1..N of the input shard (N comes
from the reader's end-of-shard row): rows in = rows written + rows rejected, or no commit.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import __version__
from operators.incremental import fill_reused, read_previous
from operators.storage import commit_file, write_text_atomic

METADATA_KEY = b"corpus_embed"
MANIFEST = "manifest.json"
REJECTED_DIR = "_rejected"
STAGING_DIR = "_staging"
REJECTED_SCHEMA = pa.schema(
    [("id", pa.string()), ("shard", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)


class IncompleteShardError(RuntimeError):
    """A shard's parts do not cover its records exactly: something was lost or duplicated."""


@dataclass
class Part:
    path: str
    first_line: int
    last_line: int
    rows: int  # record rows, eof excluded
    eof_total: int | None  # the shard's record count, when this part holds the eof row


@dataclass
class ShardStats:
    input: str  # input shard URI
    rel: str
    output: str  # output file name under output.uri
    input_fingerprint: dict
    config_fingerprint: str
    rows_in: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rows_truncated: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # tokens + the padding of their forward batches
    incremental: bool = False  # the shard changed since a run with this config: reuse unchanged documents
    rows_reused: int = 0  # vectors kept from the previous vector file (same id, same text)
    deleted_ids: list = field(default_factory=list)  # ids in the previous vector file and no longer here
    read_errors: int = 0
    committed_at: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return asdict(self)


# The per-shard counts a commit records (Parquet footer, manifest) and a run sums.
COUNT_KEYS = ("rows_in", "rows_written", "rows_rejected", "rows_truncated", "tokens", "padded_tokens", "rows_reused")


def vector_schema(dimension: int, value_type: pa.DataType) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(value_type, dimension)), ("content_hash", pa.string())])


def stage_part(fs, staging_dir: str, shard_key: str, table: pa.Table) -> Part:
    """Write one shard's rows from one block as a staged part, sorted by line."""
    table = table.sort_by("line")
    eof = table.column("eof").to_numpy(zero_copy_only=False)
    records = table.filter(pa.array(~eof))
    eof_total = int(table.column("line")[int(eof.nonzero()[0][0])].as_py()) if eof.any() else None
    path = posixpath.join(staging_dir, "parts", shard_key, f"{uuid.uuid4().hex}.parquet")
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    lines = records.column("line")
    return Part(
        path=path,
        first_line=int(lines[0].as_py()) if len(lines) else 0,
        last_line=int(lines[-1].as_py()) if len(lines) else 0,
        rows=records.num_rows,
        eof_total=eof_total,
    )


def _ordered_record_tables(fs, parts: list[Part]):
    """Yield the shard's record rows in line order, one table at a time. Parts from separate
    blocks usually hold disjoint line ranges, so they stream in order; overlapping parts (a
    block split across batches) fall back to one in-memory sort."""
    parts = sorted((p for p in parts if p.rows), key=lambda p: p.first_line)
    disjoint = all(a.last_line < b.first_line for a, b in zip(parts, parts[1:]))

    def load(p: Part) -> pa.Table:
        with fs.open(p.path, "rb") as f:
            t = pq.read_table(f)
        return t.filter(pc.invert(t.column("eof")))

    if disjoint:
        for p in parts:
            yield load(p)
    elif parts:
        yield pa.concat_tables([load(p) for p in parts]).sort_by("line")


def commit_shard(
    fs,
    output_dir: str,
    staging_dir: str,
    stats: ShardStats,
    parts: list[Part],
    dimension: int,
    value_type: pa.DataType,
    provenance: dict,
) -> ShardStats:
    """Merge the parts of a complete shard into its vector shard and rejected file, commit both
    atomically, delete the parts, and return the shard's counts."""
    totals = [p.eof_total for p in parts if p.eof_total is not None]
    if len(set(totals)) != 1:
        raise IncompleteShardError(f"{stats.input}: no end-of-shard marker among {len(parts)} staged parts")
    expected = totals[0]
    tmp = posixpath.join(staging_dir, "commit", f"{uuid.uuid4().hex}-{stats.output}")
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    rejected: list[pa.Table] = []
    next_line = 1
    written = truncated = tokens = padded = reused = 0
    schema = vector_schema(dimension, value_type)
    final = posixpath.join(output_dir, stats.output)
    previous = read_previous(fs, final, columns=("id", "embedding")) if stats.incremental else None
    ids_now: list[str] = []
    with fs.open(tmp, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for table in _ordered_record_tables(fs, parts):
            lines = table.column("line").to_numpy()
            # A retried task can stage the same rows twice: keep the first copy of each line.
            keep = lines >= next_line
            keep[1:] &= lines[1:] != lines[:-1]
            table = table.filter(pa.array(keep))
            lines = lines[keep]
            want = np.arange(next_line, next_line + len(lines))
            if not np.array_equal(lines, want):
                missing = int(want[np.argmax(lines != want)])
                raise IncompleteShardError(f"{stats.input}: record {missing} never reached the writer")
            next_line += len(lines)
            bad = pc.is_valid(table.column("reason"))
            ok = table.filter(pc.invert(bad))
            rejected.append(table.filter(bad).select(REJECTED_SCHEMA.names))
            ok, n_reused = fill_reused(ok, previous, schema.field("embedding").type)
            reused += n_reused
            hashes = ok.column("content_hash") if "content_hash" in ok.column_names else pa.nulls(ok.num_rows, pa.string())
            writer.write_table(pa.table(
                {"id": ok.column("id"), "embedding": ok.column("embedding").cast(schema.field("embedding").type), "content_hash": hashes},
                schema=schema,
            ))
            if previous is not None:
                ids_now += ok.column("id").to_pylist()
            written += ok.num_rows
            truncated += int(pc.sum(ok.column("truncated")).as_py() or 0)
            tokens += int(pc.sum(ok.column("n_tokens")).as_py() or 0)
            padded += int(pc.sum(ok.column("padded_tokens")).as_py() or 0)
        if next_line - 1 != expected:
            raise IncompleteShardError(f"{stats.input}: {next_line - 1} of {expected} records reached the writer")
        rejects = pa.concat_tables(rejected) if rejected else REJECTED_SCHEMA.empty_table()
        stats.rows_in = expected
        stats.rows_written = written
        stats.rows_rejected = rejects.num_rows
        stats.rows_truncated = truncated
        stats.tokens = tokens
        stats.padded_tokens = padded
        stats.rows_reused = reused
        if previous is not None:
            now = set(ids_now)
            stats.deleted_ids = [i for i in previous.column("id").to_pylist() if i not in now]
        stats.read_errors = int(pc.sum(pc.starts_with(rejects.column("reason"), "shard read error")).as_py() or 0)
        stats.committed_at = time.time()
        meta = dict(provenance, input={"uri": stats.input, "fingerprint": stats.input_fingerprint})
        meta["counts"] = {k: getattr(stats, k) for k in COUNT_KEYS}
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True)})

    rejected_final = posixpath.join(output_dir, REJECTED_DIR, stats.output)
    if rejects.num_rows:
        rtmp = tmp + ".rejected"
        with fs.open(rtmp, "wb") as f:
            pq.write_table(rejects, f)
        commit_file(fs, rtmp, rejected_final)
    elif fs.exists(rejected_final):
        fs.rm(rejected_final)  # a re-embedded shard that no longer has bad rows
    # The vector shard goes last: its presence is what marks the shard done.
    commit_file(fs, tmp, final)
    for p in parts:
        try:
            fs.rm(p.path)
        except FileNotFoundError:
            pass
    return stats


def read_provenance(fs, path: str) -> dict | None:
    """The provenance stored in a vector shard's Parquet footer, or None if unreadable."""
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
    except Exception:
        return None


def load_manifest(fs, output_dir: str) -> dict:
    path = posixpath.join(output_dir, MANIFEST)
    if not fs.exists(path):
        return {}
    with fs.open(path, "rb") as f:
        data = json.load(f)
    return {entry["rel"]: entry for entry in data.get("shards", [])}


def write_manifest(fs, output_dir: str, entries: dict, config_fingerprint: str) -> str:
    path = posixpath.join(output_dir, MANIFEST)
    doc = {
        "format": "corpus-embed/manifest@1",
        "package_version": __version__,
        "updated_at": time.time(),
        "config_fingerprint": config_fingerprint,
        "shards": [entries[k] for k in sorted(entries)],
    }
    write_text_atomic(fs, path, json.dumps(doc, indent=1, sort_keys=True))
    return path
