"""Staging and committing shards: order, de-duplication, completeness, provenance."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from operators.io.manifest import read_provenance
from operators.io.writers import METADATA_KEY, IncompleteShardError, ShardStats, commit_shard, stage_part
from operators.model.embed import output_schema

DIM = 4


def rows(lines, total=None, reject=()):
    """Embedder-output rows for record `lines` (+ the eof row when total is given)."""
    ids, emb, reason, eof, line = [], [], [], [], []
    for n in lines:
        ids.append(f"id{n}")
        bad = n in reject
        emb.append(None if bad else [float(n)] * DIM)
        reason.append("empty text" if bad else None)
        eof.append(False)
        line.append(n)
    if total is not None:
        ids.append("")
        emb.append(None)
        reason.append(None)
        eof.append(True)
        line.append(total)
    n = len(ids)
    return pa.table(
        {
            "id": ids, "shard": ["s.jsonl"] * n, "line": line, "reason": reason, "raw": [None] * n, "eof": eof,
            "embedding": emb, "n_tokens": [3] * n, "truncated": [x == 2 for x in line], "padded_tokens": [4] * n,
            "content_hash": [None] * n, "reuse": [False] * n,
        },
        schema=output_schema(DIM),
    )


def commit(tmp_path, tables):
    fs = fsspec.filesystem("file")
    out = str(tmp_path / "out")
    staging = str(tmp_path / "out" / "_staging" / "run")
    parts = [stage_part(fs, staging, "s", t) for t in tables]
    stats = ShardStats(input="s.jsonl", rel="s.jsonl", output="s.parquet", input_fingerprint={"size": 1}, config_fingerprint="fp")
    result = commit_shard(fs, out, staging, stats, parts, DIM, pa.float32(), {"config_fingerprint": "fp"})
    return result, fs, out, parts


def test_parts_in_any_order_commit_in_line_order(tmp_path):
    shuffled = [rows([7, 8, 9, 10], total=10), rows([1, 2, 3]), rows([4, 5, 6], reject={5})]
    stats, fs, out, parts = commit(tmp_path, shuffled)
    table = pq.read_table(f"{out}/s.parquet")
    assert table.column("id").to_pylist() == [f"id{n}" for n in range(1, 11) if n != 5]
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[:, 0], [1, 2, 3, 4, 6, 7, 8, 9, 10])
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert (stats.rows_in, stats.rows_written, stats.rows_rejected, stats.rows_truncated) == (10, 9, 1, 1)
    rejected = pq.read_table(f"{out}/_rejected/s.parquet").to_pylist()
    assert [(r["id"], r["line"], r["reason"]) for r in rejected] == [("id5", 5, "empty text")]
    assert not any(fs.exists(p.path) for p in parts)  # staged parts are cleaned up
    meta = read_provenance(fs, f"{out}/s.parquet")
    assert meta["config_fingerprint"] == "fp" and meta["counts"]["rows_written"] == 9
    assert json.loads(pq.ParquetFile(f"{out}/s.parquet").metadata.metadata[METADATA_KEY])["input"]["uri"] == "s.jsonl"


def test_overlapping_and_duplicated_parts(tmp_path):
    # interleaved lines (a block re-batched) and a retried task that staged lines 1-3 twice
    tables = [rows([1, 3, 5], total=6), rows([2, 4, 6]), rows([1, 2, 3])]
    stats, fs, out, _ = commit(tmp_path, tables)
    assert pq.read_table(f"{out}/s.parquet").column("id").to_pylist() == [f"id{n}" for n in range(1, 7)]
    assert stats.rows_written == 6


def test_a_missing_record_refuses_to_commit(tmp_path):
    with pytest.raises(IncompleteShardError, match="record 3 never reached the writer"):
        commit(tmp_path, [rows([1, 2, 4], total=4)])
    assert not (tmp_path / "out" / "s.parquet").exists()
    with pytest.raises(IncompleteShardError, match="2 of 3 records"):
        commit(tmp_path, [rows([1, 2], total=3)])
    with pytest.raises(IncompleteShardError, match="no end-of-shard marker"):
        commit(tmp_path, [rows([1, 2])])


def test_empty_shard_commits_an_empty_vector_shard(tmp_path):
    stats, fs, out, _ = commit(tmp_path, [rows([], total=0)])
    assert pq.read_table(f"{out}/s.parquet").num_rows == 0
    assert stats.rows_in == 0


def test_repeated_ids_are_found_across_blocks_as_a_dict_would(tmp_path):
    """SeenIds (hashed, sorted runs) against the plain reference: a dict of id -> first line, over
    many blocks with ids repeating within and across them."""
    from operators.io.writers import SeenIds, _mark_duplicate_ids

    rng = np.random.default_rng(0)
    ids = [f"doc-{i}" for i in rng.integers(0, 700, size=2000)]
    seen, reference, line = SeenIds(), {}, 0
    for size in rng.integers(1, 90, size=60):
        chunk = ids[line : line + size]
        if not chunk:
            break
        lines = list(range(line + 1, line + 1 + len(chunk)))
        table = pa.table({"id": chunk, "line": lines, "reason": [None] * len(chunk)}, schema=pa.schema(
            [("id", pa.string()), ("line", pa.int64()), ("reason", pa.string())]))
        marked, n = _mark_duplicate_ids(table, seen, "reject")
        want = [None if reference.setdefault(i, ln) == ln else f"duplicate id (first at record {reference[i]})" for i, ln in zip(chunk, lines)]
        assert marked.column("reason").to_pylist() == want and n == sum(w is not None for w in want)
        line += len(chunk)
    assert sum(len(run) for run, _ in seen.runs) == len(reference) and len(seen.runs) <= 12


def test_reasons_are_counted_without_their_particulars():
    from operators.io.writers import count_reasons, reason_key

    assert reason_key("malformed JSON: Expecting value: line 1 column 1 (char 0)") == "malformed JSON"
    assert reason_key("duplicate id (first at record 3)") == "duplicate id"
    assert reason_key("shard read error after record 7: BadGzipFile: not a gzip file") == "shard read error"
    assert reason_key("missing field 'text' (columns: a, b)") == "missing field 'text'"
    assert reason_key("empty text") == "empty text"
    reasons = pa.array(["empty text", "malformed JSON: x", "malformed JSON: y", None, "empty text", "null text"])
    assert count_reasons(reasons.filter(pc.is_valid(reasons))) == {"empty text": 2, "malformed JSON": 2, "null text": 1}
