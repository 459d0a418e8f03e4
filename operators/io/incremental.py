"""Incremental re-embedding: content hashes, reuse marks, versions, deletions and the run log.

A nightly run over a corpus that changed a little:
- unchanged shards (same input fingerprint, same config fingerprint) are skipped;
- changed shards are read again, and each document whose id and content hash match the shard's
  previous vector file is marked `reuse`: the model skips it and the commit copies its earlier
  vector; documents that disappeared from the shard are recorded as deletions;
- new shards are embedded; deleted shards have their vector files removed and every id recorded
  as a deletion.
With `output.versioned`, every config fingerprint writes to its own version folder
`<output.uri>/v-<fingerprint>/`, and `<output.uri>/CURRENT.json` names the published version,
switched only once a run completes (and passes the quality gate): a model or extraction change
re-embeds everything into a new folder while the previous version stays readable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.config.secrets import redact_text
from operators.io.storage import PYTHON_FILE_READ, commit_file, write_text_atomic

logger = logging.getLogger("corpus_embed.incremental")

CURRENT = "CURRENT.json"
RUNS_DIR = "_runs"
RUN_LOG = "runs.jsonl"
DELETIONS_DIR = "_deletions"
DELETIONS_SCHEMA = pa.schema([("id", pa.string()), ("shard", pa.string()), ("reason", pa.string())])


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def version_name(config_fingerprint: str) -> str:
    return f"v-{config_fingerprint}"


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def read_previous(fs, path: str, columns=("id", "content_hash")) -> pa.Table | None:
    """A committed vector shard's columns, or None when there is none (or it predates hashes)."""
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        have = set(pf.schema_arrow.names)
        if not set(columns) <= have:
            return None
        return pf.read(columns=list(columns), **PYTHON_FILE_READ)


def id_hashes(ids: list[str]) -> np.ndarray:
    """128-bit hashes of ids (S16), what the per-shard id sets hold and compare: a false match
    has odds of about n^2 / 2^129."""
    return np.array([hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest() for i in ids], dtype="S16")


class PreviousShard:
    """A changed shard's previous vector file, in memory that is a small constant per row: its ids
    as sorted 128-bit hashes with their rows and content hashes (32 bytes a row: ~64 MB for a
    2,000,000-row shard, whose embeddings are 3 GB), its embeddings and ids read one row group at
    a time as they are asked for. An id that the file holds twice resolves to its last row, as a
    dict built over the file would. Use as a context manager (it holds the file open)."""

    def __init__(self, f, pf: pq.ParquetFile):
        self._file, self.pf = f, pf
        names = set(pf.schema_arrow.names)
        hashes, contents, starts = [], [], [0]
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["id", "content_hash"] if "content_hash" in names else ["id"], **PYTHON_FILE_READ)
            hashes.append(id_hashes(t.column("id").to_pylist()))
            if "content_hash" in names:
                contents.append(np.array([bytes.fromhex(h) if h else b"" for h in t.column("content_hash").to_pylist()], dtype="S8"))
            else:  # a file from before content hashes: nothing in it can be reused
                contents.append(np.zeros(t.num_rows, dtype="S8"))
            starts.append(starts[-1] + t.num_rows)
        self.starts = np.array(starts, dtype=np.int64)
        by_row = np.concatenate(hashes) if hashes else np.zeros(0, dtype="S16")
        self.order = np.argsort(by_row, kind="stable")  # equal hashes keep row order: the last is the id's last row
        self.sorted = by_row[self.order]
        self.contents = np.concatenate(contents) if contents else np.zeros(0, dtype="S8")
        self._group: tuple[int, pa.Array] | None = None  # the last row group's embeddings read

    @classmethod
    def open(cls, fs, path: str, index_only: bool = False) -> "PreviousShard | None":
        """The vector file at `path`, or None when there is none. index_only: close the file once
        the index is built (what a read task's reuse marks need; embeddings and ids then fail)."""
        if not fs.exists(path):
            return None
        f = fs.open(path, "rb")
        try:
            shard = cls(f, pq.ParquetFile(f))
        except BaseException:
            f.close()
            raise
        if index_only:
            shard.close()
        return shard

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PreviousShard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def rows_of(self, hashes: np.ndarray) -> np.ndarray:
        """The row of each id hash in the file (its last, if repeated), or -1 when absent."""
        if not len(self.sorted):
            return np.full(len(hashes), -1, dtype=np.int64)
        at = np.maximum(np.searchsorted(self.sorted, hashes, side="right") - 1, 0)  # -1 (below all) lands on 0, which differs
        return np.where(self.sorted[at] == hashes, self.order[at], -1)

    def reusable(self, ids: list[str], hashes: list[str | None]) -> list[bool]:
        """For each id, whether the file holds it with this content hash (None: a row not embedded)."""
        if not ids:
            return []
        rows = self.rows_of(id_hashes(ids))
        embedded = np.array([h is not None for h in hashes])
        want = np.array([bytes.fromhex(h) if h else b"" for h in hashes], dtype="S8")
        return (embedded & (rows >= 0) & (self.contents[np.maximum(rows, 0)] == want)).tolist()

    def embeddings(self, rows: np.ndarray, value_type: pa.DataType) -> pa.Array:
        """The embeddings at `rows`, in that order, reading each row group they fall in once per
        call (and the last one kept: a changed shard's reused rows mostly come in file order)."""
        groups = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(groups, kind="stable")
        pieces = []
        for g in np.unique(groups):
            if self._group is None or self._group[0] != g:
                col = self.pf.read_row_group(int(g), columns=["embedding"], **PYTHON_FILE_READ).column("embedding").combine_chunks()
                self._group = (int(g), col.cast(value_type))
            pieces.append(self._group[1].take(pa.array(rows[groups == g] - self.starts[g])))
        if not pieces:
            return pa.array([], type=value_type)
        stacked = pa.concat_arrays(pieces)  # grouped order; put it back in the order asked
        return stacked.take(pa.array(np.argsort(order, kind="stable")))

    def ids_absent(self, absent) -> list[str]:
        """The file's ids for which `absent(hashes)` (a boolean mask over its rows' id hashes) is
        true: the ids a changed shard lost, read back only from the row groups that hold one."""
        by_row = np.empty(len(self.sorted), dtype="S16")
        by_row[self.order] = self.sorted
        mask = absent(by_row)
        out: list[str] = []
        for g in range(self.pf.num_row_groups):
            a, b = self.starts[g], self.starts[g + 1]
            if mask[a:b].any():
                ids = self.pf.read_row_group(g, columns=["id"], **PYTHON_FILE_READ).column("id").to_pylist()
                out += [i for i, m in zip(ids, mask[a:b]) if m]
        return out


def mark_reuse(block: pa.Table, previous: "PreviousShard | None") -> pa.Table:
    """Add content_hash (valid rows) and reuse (True where the id's previous vector was computed
    from the same text) to a READ_SCHEMA block."""
    texts = block.column("text").to_pylist()
    reasons = block.column("reason").to_pylist()
    eof = block.column("eof").to_pylist()
    hashes = [content_hash(t) if (t is not None and r is None and not e) else None for t, r, e in zip(texts, reasons, eof)]
    if previous is not None and previous.rows:
        reuse = previous.reusable(block.column("id").to_pylist(), hashes)
    else:
        reuse = [False] * block.num_rows
    return block.append_column("content_hash", pa.array(hashes, pa.string())).append_column("reuse", pa.array(reuse, pa.bool_()))


def fill_reused(table: pa.Table, previous: "PreviousShard | None", embedding_type: pa.DataType) -> tuple[pa.Table, int]:
    """Replace the (null) embeddings of `reuse` rows by the previous vectors with the same id."""
    if "reuse" not in table.column_names:
        return table, 0
    reuse = pc.fill_null(table.column("reuse"), False).to_numpy(zero_copy_only=False)
    if not reuse.any():
        return table, 0
    if previous is None:
        raise RuntimeError("rows were marked for reuse but the shard has no previous vector file")
    where = np.flatnonzero(reuse)
    ids = table.column("id").take(pa.array(where)).to_pylist()
    rows = previous.rows_of(id_hashes(ids))
    if (rows < 0).any():
        missing = [i for i, r in zip(ids, rows) if r < 0]
        raise RuntimeError(f"{len(missing)} reused ids are not in the previous vector file, e.g. {missing[0]!r}")
    old = previous.embeddings(rows, embedding_type)
    at = np.zeros(table.num_rows, dtype=np.int64)
    at[where] = np.arange(len(where))
    new = table.column("embedding").cast(embedding_type)
    merged = pc.if_else(pa.array(reuse), old.take(pa.array(at)), new)
    col = table.column_names.index("embedding")
    return table.set_column(col, table.schema.field("embedding").with_type(embedding_type), merged), int(reuse.sum())


def write_deletions(fs, out_dir: str, run_id: str, rows: list[dict]) -> str | None:
    """`_deletions/<run_id>.parquet` (id, shard, reason) in the output folder; None when empty."""
    if not rows:
        return None
    path = posixpath.join(out_dir, DELETIONS_DIR, f"{run_id}.parquet")
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=DELETIONS_SCHEMA), f)
    commit_file(fs, tmp, path)
    return path


def read_current(fs, root: str) -> dict | None:
    """CURRENT.json, or None when nothing was published. A pointer cut short or not JSON blocks
    nothing: it is rebuilt from the newest run the run log records as published whose version
    folder is there, with a warning (None when none is)."""
    path = posixpath.join(root, CURRENT)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as f:
            current = json.load(f)
        if isinstance(current, dict) and isinstance(current.get("version"), str):
            return current
        raise ValueError("no version named")
    except (ValueError, UnicodeDecodeError) as e:
        rebuilt = current_from_runs(fs, root)
        logger.warning("%s is damaged (%s): %s", redact_text(path), e,
                       f"rebuilt from the run log: {rebuilt['version']}" if rebuilt else "no published version to rebuild it from")
        if rebuilt:
            write_json(fs, path, rebuilt)
        return rebuilt


def current_from_runs(fs, root: str) -> dict | None:
    """The CURRENT.json the newest published run whose version folder still exists would have written."""
    last = None
    for entry in read_run_log(fs, root):
        version = entry.get("version")
        if entry.get("published") and isinstance(version, str) and fs.exists(posixpath.join(root, version)):
            last = {"version": version, "config_fingerprint": entry.get("config_fingerprint"), "run_id": entry.get("run_id"),
                    "published_at": entry.get("finished_at") or entry.get("started_at"), "rebuilt": True}
    return last


def write_json(fs, path: str, value) -> None:
    write_text_atomic(fs, path, json.dumps(value, indent=1, default=str) + "\n")


def publish(fs, root: str, version: str, run_id: str, fingerprint: str) -> dict:
    """Point CURRENT.json at `version` (an atomic replace): readers switch only now."""
    current = {"version": version, "config_fingerprint": fingerprint, "run_id": run_id, "published_at": time.time()}
    write_json(fs, posixpath.join(root, CURRENT), current)
    return current


def publish_version(cfg, plan, run_id: str) -> tuple[bool, str | None]:
    """With output.versioned, point CURRENT.json at this run's version. Returns (published, the
    version published before, if any)."""
    from operators.io.storage import get_fs

    if not plan.version:
        return False, None
    fs, root = get_fs(cfg.output.uri, cfg.output.storage)
    previous = read_current(fs, root)
    publish(fs, root, plan.version, run_id, plan.config_fingerprint)
    return True, previous and previous.get("version")


def append_run_log(fs, root: str, entry: dict) -> None:
    """Append one JSON line to `_runs/runs.jsonl` (rewritten whole: object stores cannot append)."""
    path = posixpath.join(root, RUNS_DIR, RUN_LOG)
    old = ""
    if fs.exists(path):
        with fs.open(path, "r") as f:
            old = f.read()
    write_text_atomic(fs, path, old + json.dumps(entry, default=str) + "\n")


def read_run_log(fs, root: str) -> list[dict]:
    path = posixpath.join(root, RUNS_DIR, RUN_LOG)
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def report_markdown(r: dict) -> str:
    c = r["counts"]
    lines = [
        f"# corpus-embed run {r['run_id']}: {r['status']}",
        "",
        f"- output: `{r['output']}` version `{r.get('version') or '-'}`" + (" (published)" if r.get("published") else ""),
        f"- config fingerprint: `{r['config_fingerprint']}`; model `{r['model']}`",
        f"- shards: {c['shards_new']} new, {c['shards_changed']} changed, {c['shards_unchanged']} unchanged, {c['shards_deleted']} deleted",
        f"- documents: {c['rows_embedded']} embedded, {c['rows_reused']} reused, {c['rows_rejected']} rejected, "
        f"{c['rows_deleted']} deleted, {c['rows_truncated']} truncated",
        f"- time: {r['durations']['total_s']:.1f}s ({', '.join(f'{k[:-2]} {v:.1f}s' for k, v in r['durations'].items() if k != 'total_s')}); "
        f"{r['throughput']['rows_per_s']:.1f} rows/s, {r['throughput']['tokens_per_s']:.0f} tokens/s",
    ]
    if c.get("rejected_by_reason"):
        lines.append("- rejected by reason: " + ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items()))
    if r.get("gate"):
        g = r["gate"]
        lines.append(f"- quality gate: {'passed' if g['passed'] else 'FAILED'}")
        for task, s in g["scores"].items():
            floor = g["floors"].get(task)
            lines.append(f"  - {task}: {s:.2f}" + (f" (floor {floor:.2f})" if floor is not None else ""))
    if r.get("sinks"):
        for name, s in r["sinks"].items():
            lines.append(f"- sink {name}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    if r.get("error"):
        lines.append(f"- error: {r['error']}")
    return "\n".join(lines) + "\n"
