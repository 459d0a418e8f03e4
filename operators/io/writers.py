"""Vector shards: stage parts, prove a shard complete, commit it atomically (manifest.py keeps
the manifest).

Layout under `output.uri`:

    <output_name>.parquet            one vector shard per input shard: columns id, embedding
    _rejected/<output_name>.parquet  rows that could not be embedded: id, shard, line, reason, raw
    manifest.json                    every shard: input fingerprint and row counts
    _staging/<run_id>/               parts of shards in flight; removed when committed

A shard is committed only once its parts hold every record 1..N of the input shard (N comes
from the reader's end-of-shard row): rows in = rows written + rows rejected, or no commit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import posixpath
import re
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.config.secrets import redact, redact_text
from operators.io.incremental import PreviousShard, fill_reused, id_hashes
from operators.io.storage import commit_file, file_fingerprint, read_parquet

METADATA_KEY = b"corpus_embed"
REJECTED_DIR = "_rejected"
STAGING_DIR = "_staging"
REJECTED_SCHEMA = pa.schema(
    [("id", pa.string()), ("shard", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)


class IncompleteShardError(RuntimeError):
    """A shard's parts do not cover its records exactly: something was lost or duplicated."""


class DuplicateIdError(IncompleteShardError):
    """input.duplicate_ids=fail and a shard holds an id twice."""


@dataclass
class Part:
    path: str
    first_line: int
    last_line: int
    rows: int  # record rows, eof excluded
    eof_total: int | None  # the shard's record count, when this part holds the eof row
    failure: str | None = None  # the eof row's reason when the reader could not finish the shard
    seed: str | None = None  # the eof row's commit record (ShardStats JSON): what the commit needs of the plan


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
    rows_duplicate: int = 0  # rows whose id came earlier in the shard (kept or rejected: input.duplicate_ids)
    deleted_ids: list = field(default_factory=list)  # ids in the previous vector file and no longer here
    read_errors: int = 0
    rejected_reasons: dict = field(default_factory=dict)  # reason_key -> rows rejected for it
    output_fingerprint: dict = field(default_factory=dict)  # size + etag/mtime of the committed vector file
    committed_at: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    def seed(self) -> str:
        """The empty record as the eof row carries it to whichever write task commits the shard."""
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_seed(cls, seed: str) -> "ShardStats":
        return cls(**json.loads(seed))


def reason_key(reason: str) -> str:
    """A rejection reason without its particulars (line, byte offset, parser message), to count
    rows by: "malformed JSON: Expecting value: line 1" -> "malformed JSON"."""
    return _PARTICULARS.split(reason, 1)[0].strip() or reason


_PARTICULARS = re.compile(r"[:(]| after record ")


def count_reasons(reasons: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in pc.value_counts(reasons).to_pylist():
        key = reason_key(value["values"])
        counts[key] = counts.get(key, 0) + value["counts"]
    return dict(sorted(counts.items()))


# The per-shard counts a commit records (Parquet footer, manifest) and a run sums.
COUNT_KEYS = ("rows_in", "rows_written", "rows_rejected", "rows_truncated", "tokens", "padded_tokens", "rows_reused", "rows_duplicate")


class RunStopped(RuntimeError):
    """Why a dataset stopped, as text. The original exception is logged and dropped: its traceback
    holds the dataset's executor and with it the actor pools, whose CPUs would then stay reserved
    for as long as anything (a caller catching the run's error) holds it."""

    @classmethod
    def from_error(cls, e: BaseException) -> "RunStopped":
        logging.getLogger("corpus_embed").debug("the dataset stopped", exc_info=e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return cls(redact_text(f"{type(e).__name__}: {first}"))


@dataclass
class WriteOutcome:
    """What a write of many shards left: committed (shard uri -> ShardStats JSON), failed (uri ->
    why), pending (uri -> rows staged and expected when it stopped), and why it stopped, if it did."""

    committed: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    pending: dict[str, dict] = field(default_factory=dict)
    error: RunStopped | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and not self.failed and not self.pending


def vector_schema(dimension: int, value_type: pa.DataType) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(value_type, dimension)), ("content_hash", pa.string())])


def stage_part(fs, staging_dir: str, shard_key: str, table: pa.Table) -> Part:
    """Write one shard's rows from one block as a staged part, sorted by line."""
    table = table.sort_by("line")
    eof = table.column("eof").to_numpy(zero_copy_only=False)
    records = table.filter(pa.array(~eof))
    eof_at = int(eof.nonzero()[0][0]) if eof.any() else None
    eof_total = None if eof_at is None else int(table.column("line")[eof_at].as_py())
    failure = None if eof_at is None else table.column("reason")[eof_at].as_py()
    seed = None if eof_at is None else table.column("raw")[eof_at].as_py()
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
        failure=failure,
        seed=seed,
    )


def _ordered_record_tables(fs, parts: list[Part]):
    """Yield the shard's record rows in line order, one table at a time. Parts from separate
    blocks usually hold disjoint line ranges, so they stream in order; overlapping parts (a
    block split across batches) fall back to one in-memory sort."""
    parts = sorted((p for p in parts if p.rows), key=lambda p: p.first_line)
    disjoint = all(a.last_line < b.first_line for a, b in zip(parts, parts[1:]))

    def load(p: Part) -> pa.Table:
        t = read_parquet(fs, p.path)
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
    duplicate_ids: str = "reject",
) -> ShardStats:
    """Merge the staged parts of a complete shard into its vector shard (commit_rows), then delete
    the parts."""
    totals = [p.eof_total for p in parts if p.eof_total is not None]
    if len(set(totals)) != 1:
        raise IncompleteShardError(f"{stats.input}: no end-of-shard marker among {len(parts)} staged parts")
    stats = commit_rows(fs, output_dir, staging_dir, stats, totals[0], _ordered_record_tables(fs, parts), dimension,
                        value_type, provenance, duplicate_ids)
    for p in parts:
        try:
            fs.rm(p.path)
        except FileNotFoundError:
            pass
    return stats


def whole_shard(rows: pa.Table) -> tuple[int, pa.Table] | None:
    """(records expected, the record rows) when `rows`, one shard's rows sorted by line, hold the
    shard whole: its eof row (not failed) and each record 1..N exactly once. None otherwise."""
    eof = rows.column("eof").to_numpy(zero_copy_only=False)
    if eof.sum() != 1 or not eof[-1] or rows.column("reason")[rows.num_rows - 1].is_valid:
        return None
    expected = int(rows.column("line")[rows.num_rows - 1].as_py())
    records = rows.slice(0, rows.num_rows - 1)
    if records.num_rows != expected:
        return None
    lines = records.column("line").to_numpy()
    if expected and not (lines[0] == 1 and lines[-1] == expected and (np.diff(lines) == 1).all()):
        return None
    return expected, records


def commit_rows(
    fs,
    output_dir: str,
    staging_dir: str,
    stats: ShardStats,
    expected: int,
    tables,
    dimension: int,
    value_type: pa.DataType,
    provenance: dict,
    duplicate_ids: str = "reject",
) -> ShardStats:
    """Write a shard's record rows (`tables`, in line order; copies of a line are dropped) as its
    vector shard and rejected file, after checking they are records 1..expected; commit both
    atomically and return the shard's counts.

    duplicate_ids: what to do with a row whose id came earlier in the shard: "keep" it (counted),
    "reject" it (counted, reason names the first line), or "fail" the shard."""
    seen = SeenIds()  # the shard's ids so far, 24 bytes each: the one per-shard set a commit holds
    duplicates = 0
    tmp = posixpath.join(staging_dir, "commit", f"{uuid.uuid4().hex}.parquet")
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    rejected: list[pa.Table] = []
    next_line = 1
    written = truncated = tokens = padded = reused = 0
    schema = vector_schema(dimension, value_type)
    final = posixpath.join(output_dir, stats.output)
    # a changed shard's previous vectors: an index of its ids, embeddings read a row group at a time
    previous = PreviousShard.open(fs, final) if stats.incremental else None
    with previous or contextlib.nullcontext(), fs.open(tmp, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for table in tables:
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
            table, n_dup = _mark_duplicate_ids(table, seen, duplicate_ids)
            duplicates += n_dup
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
        stats.rows_duplicate = duplicates
        if previous is not None:  # the ids of the previous vector file that are no longer here
            stats.deleted_ids = previous.ids_absent(lambda hashes: seen.first_lines(hashes) == 0)
        stats.read_errors = int(pc.sum(pc.starts_with(rejects.column("reason"), "shard read error")).as_py() or 0)
        stats.committed_at = time.time()
        meta = dict(redacted(json.dumps(provenance, sort_keys=True, default=str)),
                    input=redact({"uri": stats.input, "rel": stats.rel, "fingerprint": stats.input_fingerprint}))
        stats.rejected_reasons = count_reasons(rejects.column("reason"))
        meta["counts"] = {k: getattr(stats, k) for k in (*COUNT_KEYS, "rejected_reasons")}
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
    fs.invalidate_cache(posixpath.dirname(final))
    stats.output_fingerprint = file_fingerprint(fs.info(final))  # later runs check the file against it
    return stats


@functools.lru_cache(maxsize=8)
def redacted(provenance_json: str) -> dict:
    """The provenance a footer carries, redacted once per run rather than once per shard (read only)."""
    return redact(json.loads(provenance_json))


class SeenIds:
    """The ids of a shard seen so far, with the line each first came on, in bounded memory: 128-bit
    hashes (a false match has odds of about n^2 / 2^129) in sorted runs that merge as they grow
    (a log-structured set), 24 bytes an id rather than a Python dict's ~100; a 2,000,000-row
    shard holds ~48 MB here (twice that while its largest runs merge)."""

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes S16, their first lines)

    def first_lines(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash, the line it first came on, or 0 when new."""
        found = np.zeros(len(hashes), dtype=np.int64)
        for run, lines in self.runs:
            at = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            hit = (run[at] == hashes) & (found == 0)
            found[hit] = lines[at[hit]]
        return found

    def add(self, hashes: np.ndarray, lines: np.ndarray) -> None:
        if not len(hashes):
            return
        order = np.argsort(hashes, kind="stable")
        run = (hashes[order], lines[order])
        while self.runs and len(self.runs[-1][0]) <= len(run[0]):  # merge equal-sized runs: O(log n) of them
            prev = self.runs.pop()
            h, ln = np.concatenate([prev[0], run[0]]), np.concatenate([prev[1], run[1]])
            order = np.argsort(h, kind="stable")
            run = (h[order], ln[order])
        self.runs.append(run)


def _mark_duplicate_ids(table: pa.Table, seen: SeenIds, policy: str) -> tuple[pa.Table, int]:
    """Record this block's embeddable ids in `seen`; return the block with repeated ids rejected
    (policy "reject") and their count. Raises DuplicateIdError under "fail"."""
    ok = pc.is_null(table.column("reason")).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(ok)
    if not len(rows):
        return table, 0
    ids = table.column("id").take(pa.array(rows)).to_pylist()
    lines = table.column("line").to_numpy()[rows]
    hashes = id_hashes(ids)
    earlier = seen.first_lines(hashes)  # the lines of earlier blocks
    _, at, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    first = np.where(earlier > 0, earlier, lines[at][inverse.ravel()])  # else the first line within this block
    dup = first != lines
    seen.add(hashes[~dup], lines[~dup])
    n = int(dup.sum())
    if n and policy == "fail":
        i = int(np.flatnonzero(dup)[0])
        raise DuplicateIdError(
            f"id {ids[i]!r} at record {lines[i]} repeats record {first[i]} (input.duplicate_ids=fail); "
            "fix the input or set input.duplicate_ids to reject or keep"
        )
    if n and policy == "reject":
        reasons = table.column("reason").to_pylist()
        for i in np.flatnonzero(dup):
            reasons[rows[i]] = f"duplicate id (first at record {first[i]})"
        table = table.set_column(table.column_names.index("reason"), "reason", pa.array(reasons, pa.string()))
    return table, n
