"""Readers: every record becomes one row, bad records are rejected with a reason and location."""

from __future__ import annotations

import gzip
import json
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from operators.config.schema import InputConfig, StorageConfig
from operators.io.readers import SHARD_FAILED, is_data_error, read_shard
from operators.io.storage import InputError, detect_format, list_shards
from tests.helpers import AT_LEAST, BAD_JSONL, EXPECTED_REASONS, MIRROR, RECORDS, file_cases, needs_mirror, write_jsonl


def read_all(shard, cfg) -> pa.Table:
    return pa.concat_tables(list(read_shard(shard, cfg)))


def only(path, fmt="auto", **kw):
    cfg = InputConfig(uri=str(path), format=fmt, **kw)
    (shard,) = list_shards(cfg.uri, cfg.format, cfg.storage)
    return shard, cfg


def test_bad_row_catalogue(tmp_path):
    shard, cfg = only(write_jsonl(tmp_path / "in" / "bad.jsonl", BAD_JSONL))
    t = read_all(shard, cfg)
    rows = t.to_pylist()
    records, eof = rows[:-1], rows[-1]
    assert eof["eof"] and eof["line"] == len(BAD_JSONL) == len(records)
    assert [r["line"] for r in records] == list(range(1, len(BAD_JSONL) + 1))
    for r in records:
        want = EXPECTED_REASONS.get(r["line"])
        if want is None:
            assert r["reason"] is None and r["text"]
        else:
            assert r["reason"].startswith(want), (r["line"], r["reason"])
            assert r["text"] is None
    by_line = {r["line"]: r for r in records}
    assert by_line[10]["id"] == "bad.jsonl:10"  # derived: shard path + line
    assert by_line[11]["id"] == "7"
    assert by_line[2]["raw"].startswith('{"id": "b"')  # a preview of what was rejected
    assert by_line[3]["id"] == "c"  # rejected rows keep their id when they have one


def test_compressed_jsonl_and_text(tmp_path):
    lines = [json.dumps({"id": str(i), "text": f"sentence {i}"}) for i in range(5)]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    (tmp_path / "c.txt").write_text("first doc\n\nthird doc\n")
    shards = list_shards(str(tmp_path), "auto", InputConfig(uri="x").storage)
    assert [(s.rel, s.format, s.compression) for s in shards] == [
        ("a.jsonl.gz", "jsonl", "gzip"),
        ("b.jsonl.zst", "jsonl", "zstd"),
        ("c.txt", "text", None),
    ]
    cfg = InputConfig(uri=str(tmp_path))
    for s in shards[:2]:
        t = read_all(s, cfg)
        assert t.column("text").to_pylist()[:5] == [f"sentence {i}" for i in range(5)], t.column("reason").to_pylist()
    text = read_all(shards[2], cfg).to_pylist()
    assert [(r["id"], r["text"], r["reason"]) for r in text[:3]] == [
        ("c.txt:1", "first doc", None),
        ("c.txt:2", None, "empty text"),
        ("c.txt:3", "third doc", None),
    ]


def test_parquet_with_nulls_and_custom_fields(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"doc_id": ["x", "y", None], "body": ["hello", None, "there"]}), path)
    shard, cfg = only(path, id_field="doc_id", text_field="body")
    rows = read_all(shard, cfg).to_pylist()
    assert [(r["id"], r["text"], r["reason"], r["line"]) for r in rows[:3]] == [
        ("x", "hello", None, 1),
        ("y", None, "null text", 2),
        ("p.parquet:3", "there", None, 3),
    ]
    shard, cfg = only(path, text_field="missing")
    rows = read_all(shard, cfg).to_pylist()
    assert all(r["reason"].startswith("missing field 'missing'") for r in rows[:3])


def test_blocks_respect_rows_per_block(tmp_path):
    shard, cfg = only(write_jsonl(tmp_path / "x.jsonl", [{"text": f"t{i}"} for i in range(10)]), rows_per_block=4)
    sizes = [b.num_rows for b in read_shard(shard, cfg)]
    assert sizes == [4, 4, 3]  # 10 records + the eof row


def test_truncated_gzip_keeps_rows_and_records_the_error(tmp_path):
    payload = gzip.compress(b"".join(json.dumps({"text": f"row {i} " * 20}).encode() + b"\n" for i in range(2000)))
    (tmp_path / "broken.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    shard, cfg = only(tmp_path / "broken.jsonl.gz")
    rows = read_all(shard, cfg).to_pylist()
    good = [r for r in rows if not r["eof"] and r["reason"] is None]
    errors = [r for r in rows if r["reason"] and r["reason"].startswith("shard read error")]
    assert len(errors) == 1 and good  # what was readable is kept, the failure is one counted row
    assert rows[-1]["eof"] and rows[-1]["line"] == len(rows) - 1


def test_listing_errors_and_filters(tmp_path):
    storage = InputConfig(uri="x").storage
    with pytest.raises(InputError, match="does not exist"):
        list_shards(str(tmp_path / "nope"), "auto", storage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input shards found"):
        list_shards(str(tmp_path / "empty"), "auto", storage)
    d = tmp_path / "mixed"
    write_jsonl(d / "keep.jsonl", [{"text": "x"}])
    write_jsonl(d / "sub" / "deep.jsonl", [{"text": "x"}])
    write_jsonl(d / "_rejected" / "skip.jsonl", [{"text": "x"}])
    write_jsonl(d / ".hidden.jsonl", [{"text": "x"}])
    (d / "notes.csv").write_text("a,b\n")
    assert [s.rel for s in list_shards(str(d), "auto", storage)] == ["keep.jsonl", "sub/deep.jsonl"]
    assert [s.rel for s in list_shards(str(d / "*.jsonl"), "auto", storage)] == ["keep.jsonl"]
    with pytest.raises(InputError, match="cannot tell the format"):
        list_shards(str(d / "notes.csv"), "auto", storage)
    assert [s.format for s in list_shards(str(d / "notes.csv"), "text", storage)] == ["text"]


def test_output_names_are_deterministic_and_distinct(tmp_path):
    storage = InputConfig(uri="x").storage
    write_jsonl(tmp_path / "a" / "b.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "a__b.jsonl", [{"text": "x"}])
    first = [s.output_name for s in list_shards(str(tmp_path), "auto", storage)]
    again = [s.output_name for s in list_shards(str(tmp_path), "auto", storage)]
    assert first == again and len(set(first)) == 2
    assert all(n.endswith(".parquet") for n in first)
    assert detect_format("s3://b/x/part-1.JSONL.gz") == "jsonl"


# ---------------------------------------------------------------------------------------------
# The bad-input catalogue (tests/helpers.py): no record or file makes the reader raise


@pytest.mark.parametrize("case", RECORDS, ids=[c[0] for c in RECORDS])
def test_each_bad_record_is_one_reasoned_row(tmp_path, case):
    name, raw, reason = case
    path = tmp_path / "one.jsonl"
    path.write_bytes(b'{"id": "before", "text": "fine"}\n' + raw + b'\n{"id": "after", "text": "fine"}\n')
    rows = read_all(*only(path)).to_pylist()
    assert [r["line"] for r in rows] == [1, 2, 3, 3] and rows[-1]["eof"] and rows[-1]["reason"] is None
    assert rows[0]["reason"] is None and rows[2]["reason"] is None  # the neighbours are untouched
    if reason is None:
        assert rows[1]["reason"] is None and rows[1]["text"]
    else:
        assert rows[1]["reason"] is not None and rows[1]["reason"].startswith(reason), rows[1]["reason"]
        assert rows[1]["text"] is None and rows[1]["id"]  # a rejection still has an id, for the rejected file


@pytest.mark.parametrize("case", file_cases(), ids=lambda c: c.name[:40])
def test_each_bad_file_reconciles(tmp_path, case):
    (tmp_path / case.name).write_bytes(case.data)
    rows = read_all(*only(tmp_path / case.name)).to_pylist()
    records, eof = rows[:-1], rows[-1]
    assert eof["eof"] and eof["reason"] is None and eof["line"] == len(records)  # never a failed shard: data errors are rows
    embedded = sum(r["reason"] is None for r in records)
    rejected = [r for r in records if r["reason"] is not None]
    if case.name in AT_LEAST:
        assert embedded >= case.embedded
    else:
        assert embedded == case.embedded
    assert len(rejected) == case.rejected, [r["reason"] for r in rejected]
    assert any(r["reason"].startswith("shard read error") for r in rejected) == case.read_error
    pa.table({"r": [r["reason"] for r in records]})  # every reason is valid UTF-8


def test_an_io_error_fails_the_shard_instead_of_rejecting_it(tmp_path):
    """A read that fails for a reason other than the bytes (here: the file vanishes after listing)
    ends with a failed eof row naming the record and saying a re-run helps; no rows are rejected."""
    path = write_jsonl(tmp_path / "gone.jsonl", [{"text": "x"}])
    shard, cfg = only(path)
    path.unlink()
    rows = read_all(shard, cfg).to_pylist()
    assert len(rows) == 1 and rows[0]["eof"]
    assert rows[0]["reason"].startswith(SHARD_FAILED + " after record 0: FileNotFoundError")
    assert "re-run" in rows[0]["reason"]


@pytest.mark.parametrize(
    "error, data",
    [(zlib.error("bad"), True), (EOFError(), True), (OSError("Invalid data stream"), True), (pa.ArrowInvalid("x"), True),
     (ConnectionResetError(), False), (TimeoutError(), False), (OSError(5, "EIO"), False), (PermissionError(), False),
     (FileNotFoundError(), False), (RuntimeError("?"), False)],
)
def test_error_classes(error, data):
    assert is_data_error(error) is data


@needs_mirror
def test_the_named_wikitext_corpus_reads_as_the_raw_files(tmp_path):
    """whitening.corpus: wikitext-2 (Salesforce/wikitext's Parquet through the mirror) gives the
    sentences of the raw WikiText-2 validation file it was made from."""
    from operators.io.readers import read_fit_corpus

    named = read_fit_corpus("wikitext-2", "sentences", 5000, StorageConfig(), str(MIRROR))
    raw = read_fit_corpus(str(MIRROR / "wikitext-2" / "wiki.valid.raw"), "sentences", 5000, StorageConfig())
    assert len(named) == 5000 and named == raw


def test_an_unknown_fit_corpus_names_the_named_ones():
    from operators.io.readers import read_fit_corpus

    with pytest.raises(InputError, match=r"'wikitext-9' is neither a named corpus \(wikitext-2, wikitext-103, wikitext-2-raw-v1/train"):
        read_fit_corpus("wikitext-9", "sentences", 10, StorageConfig())
