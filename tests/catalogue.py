"""The bad-input catalogue as data: records and files an attacker or a broken producer hands the
pipeline, each with what must come of it. Used by the reader's unit tests (no Ray) and by the
pipeline's end-to-end test (every shard commits, every row is accounted for).

RECORDS: one JSONL line each -> the reason prefix it is rejected with, or None (embedded).
FILES: whole shards -> how many records embed, how many are rejected, and whether one of the
rejections is the shard-level "shard read error" (undecodable data part-way).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

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
