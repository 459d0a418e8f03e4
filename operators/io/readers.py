"""Read text shards (JSONL, Parquet, plain text) into validated Arrow blocks.

Every input record becomes exactly one row: either a document to embed (`reason` null) or a
rejection with its reason and source location (`shard`, 1-based `line`; for Parquet the row
number). After a shard's last record comes one end-of-shard row (`eof` true, `line` = number of
records), so the writer can prove a shard complete before committing it.

Errors are sorted by what a re-run can do about them:
- undecodable data (a bad record, corrupt gzip/zstd/xz/bz2 data, a corrupt Parquet page) is a
  counted rejection with its reason and line; the rows before it are kept and the shard commits;
- anything else (throttling or a 5xx after the client's retries, a timeout, a dropped connection,
  a missing or unreadable file, an unexpected error) fails the shard alone: its end-of-shard row
  carries `reason` "shard failed: ...", the writer commits nothing for it, and a re-run retries it.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import re
import zlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from operators.config.schema import InputConfig
from operators.config.secrets import redact_text
from operators.io.storage import PYTHON_FILE_READ, InputError, Shard, get_fs, list_shards

READ_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),  # null for rejected rows
        ("shard", pa.string()),  # source URI
        ("line", pa.int64()),  # 1-based record number; on eof rows, the shard's record count
        ("reason", pa.string()),  # null when the row is embeddable
        ("raw", pa.string()),  # a preview of a rejected record, for debugging; on eof rows, the shard's commit record
        ("eof", pa.bool_()),
    ]
)
RAW_PREVIEW_CHARS = 300


def text_rows(ids: list[str], texts: list[str], shard: str = "texts") -> pa.Table:
    """In-memory texts as READ_SCHEMA rows (evaluation, fits): all embeddable, no eof row."""
    n = len(texts)
    return pa.table(
        {"id": ids, "text": texts, "shard": [shard] * n, "line": list(range(1, n + 1)), "reason": [None] * n,
         "raw": [None] * n, "eof": [False] * n},
        schema=READ_SCHEMA,
    )
SHARD_FAILED = "shard failed"  # the reason an eof row carries when the shard could not be read
_BOM = b"\xef\xbb\xbf"


def _zstd_error() -> type:
    try:
        import zstandard

        return zstandard.ZstdError
    except ImportError:  # pragma: no cover - zstandard is a dependency
        return zlib.error


DATA_ERRORS = (zlib.error, gzip.BadGzipFile, EOFError, lzma.LZMAError, _zstd_error(), pa.ArrowException, UnicodeError)


def is_data_error(e: BaseException) -> bool:
    """True when `e` says the bytes themselves cannot be decoded (a re-run reads the same bytes and
    fails the same way); False for I/O failures, which a re-run may get past."""
    if isinstance(e, DATA_ERRORS):
        return True
    if isinstance(e, OSError):  # bz2 reports corrupt data as a bare OSError without an errno
        return type(e) is OSError and e.errno is None and "Invalid data stream" in str(e)
    return isinstance(e, ValueError)


def describe_failure(shard: Shard, record: int, e: BaseException) -> str:
    """The eof reason of a shard that failed: where, what, and what a re-run does."""
    hint = "check the credentials and permissions, then re-run" if isinstance(e, PermissionError) else (
        "re-run to retry it" if not isinstance(e, FileNotFoundError) else "it vanished while the run read it; a re-run re-lists the input"
    )
    return redact_text(f"{SHARD_FAILED} after record {record}: {type(e).__name__}: {e}; not committed, {hint}", shard.uri)


class _BlockBuilder:
    def __init__(self, shard: Shard, rows_per_block: int):
        self.shard = shard
        self.rows_per_block = rows_per_block
        self.cols: dict[str, list] = {name: [] for name in READ_SCHEMA.names}
        self.n = 0  # records seen so far
        self.shard_name = shard.public_uri

    def _append(self, id_, text, line, reason, raw, eof=False):
        c = self.cols
        c["id"].append(id_)
        c["text"].append(text)
        c["shard"].append(self.shard_name)
        c["line"].append(line)
        c["reason"].append(reason)
        c["raw"].append(raw)
        c["eof"].append(eof)

    def derived_id(self, line: int) -> str:
        return f"{self.shard.rel}:{line}"

    def accept(self, line: int, id_value, text: str) -> None:
        id_ = self.derived_id(line) if id_value is None else str(id_value)
        self._append(id_, text, line, None, None)

    def reject(self, line: int, reason: str, raw, id_value=None) -> None:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        preview = None if raw is None else str(raw)[:RAW_PREVIEW_CHARS]
        id_ = self.derived_id(line) if id_value is None else str(id_value)
        self._append(id_, None, line, reason, preview)

    def full(self) -> bool:
        return len(self.cols["id"]) >= self.rows_per_block

    def flush(self) -> pa.Table:
        cols, self.cols = self.cols, {name: [] for name in READ_SCHEMA.names}
        try:
            return pa.table(cols, schema=READ_SCHEMA)
        except UnicodeEncodeError:  # a lone surrogate (valid JSON: "\ud83d") in an id or a text
            return pa.table(_reject_unencodable(cols, self.derived_id), schema=READ_SCHEMA)

    def finish(self, failure: str | None = None, seed: str | None = None) -> pa.Table:
        self._append("", None, self.n, failure, seed, eof=True)
        return self.flush()


def _encodable(value) -> bool:
    if value is None:
        return True
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _reject_unencodable(cols: dict[str, list], derived_id) -> dict[str, list]:
    """Turn the rows whose id or text holds a lone surrogate into rejections (the slow path, only
    for blocks that hold one)."""
    for i in range(len(cols["id"])):
        bad_id, bad_text = not _encodable(cols["id"][i]), not _encodable(cols["text"][i])
        if bad_id or bad_text:
            cols["id"][i] = derived_id(cols["line"][i]) if bad_id else cols["id"][i]
            cols["text"][i] = None
            cols["reason"][i] = f"not valid Unicode: a lone surrogate in the {'id' if bad_id else 'text'}"
        if not _encodable(cols["raw"][i]):
            cols["raw"][i] = cols["raw"][i].encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return cols


def check_text(value) -> str | None:
    """The rejection reason for a text value, or None when it can be embedded."""
    if value is None:
        return "null text"
    if not isinstance(value, str):
        return f"non-string text ({type(value).__name__})"
    if not value.strip():
        return "empty text"
    return None


def _read_lines(b: _BlockBuilder, f, cfg: InputConfig, parse_json: bool) -> Iterator[pa.Table]:
    for raw in f:
        b.n += 1
        line = b.n
        raw = raw.rstrip(b"\r\n")
        if line == 1 and raw.startswith(_BOM):  # a UTF-8 byte order mark is no part of the first record
            raw = raw[len(_BOM):]
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            b.reject(line, f"undecodable bytes: not valid UTF-8 at byte {e.start}", raw)
        else:
            if not parse_json:
                reason = check_text(decoded)
                if reason:
                    b.reject(line, reason, decoded)
                else:
                    b.accept(line, None, decoded)
            elif not decoded.strip():
                b.reject(line, "empty line", decoded)
            else:
                try:
                    record = json.loads(decoded)
                except ValueError as e:
                    b.reject(line, f"malformed JSON: {e}", decoded)
                except RecursionError:
                    b.reject(line, "malformed JSON: nested too deeply to parse", decoded)
                else:
                    if not isinstance(record, dict):
                        b.reject(line, f"not a JSON object ({type(record).__name__})", decoded)
                    else:
                        id_value = record.get(cfg.id_field)
                        if cfg.text_field not in record:
                            b.reject(line, f"missing field '{cfg.text_field}'", decoded, id_value)
                        else:
                            text = record[cfg.text_field]
                            reason = check_text(text)
                            if reason:
                                b.reject(line, reason, decoded, id_value)
                            else:
                                b.accept(line, id_value, text)
        if b.full():
            yield b.flush()


def _read_parquet(b: _BlockBuilder, f, cfg: InputConfig) -> Iterator[pa.Table]:
    pf = pq.ParquetFile(f)
    names = set(pf.schema_arrow.names)
    columns = [c for c in (cfg.id_field, cfg.text_field) if c in names]
    for batch in pf.iter_batches(batch_size=cfg.rows_per_block, columns=columns or None, **PYTHON_FILE_READ):
        n = batch.num_rows
        ids = batch.column(cfg.id_field).to_pylist() if cfg.id_field in names else [None] * n
        texts = batch.column(cfg.text_field).to_pylist() if cfg.text_field in names else None
        for i in range(n):
            b.n += 1
            if texts is None:
                b.reject(b.n, f"missing field '{cfg.text_field}' (columns: {', '.join(sorted(names))})", None, ids[i])
                continue
            reason = check_text(texts[i])
            if reason:
                b.reject(b.n, reason, None if texts[i] is None else repr(texts[i]), ids[i])
            else:
                b.accept(b.n, ids[i], texts[i])
            if b.full():
                yield b.flush()


def read_shard(shard: Shard, cfg: InputConfig, seed: str | None = None) -> Iterator[pa.Table]:
    """Yield READ_SCHEMA blocks of at most `cfg.rows_per_block` rows, ending with the eof row
    (whose `raw` carries `seed`, the shard's commit record, to the writer).

    A shard whose data breaks mid-way (a truncated gzip stream, a corrupt Parquet page) does not
    fail: the rows read so far are kept and one rejected row records the error and where it
    happened, so the shard's counts still reconcile and the summary flags it. Any other error ends
    the shard with a failed eof row (see the module docstring); this generator itself never raises,
    so one shard never fails the run.
    """
    b = _BlockBuilder(shard, cfg.rows_per_block)
    failure = None
    try:
        fs, path = get_fs(shard.uri, cfg.storage)
        if shard.format == "parquet":
            with fs.open(path, "rb", compression=shard.compression) as f:
                yield from _read_parquet(b, f, cfg)
        else:
            with fs.open(path, "rb", compression=shard.compression) as f:
                if shard.compression == "zstd":  # zstandard's reader has no readline
                    f = io.BufferedReader(f, buffer_size=1 << 20)
                yield from _read_lines(b, f, cfg, parse_json=shard.format == "jsonl")
    except Exception as e:
        if is_data_error(e):
            b.n += 1
            b.reject(b.n, redact_text(f"shard read error after record {b.n - 1}: {type(e).__name__}: {e}", shard.uri), None)
        else:
            failure = describe_failure(shard, b.n, e)
    yield b.finish(failure, seed)


# ---------------------------------------------------------------------------------------------
# Fit corpora (Wikitext) for whitening

_HEADING = re.compile(r"^\s*=+ .* =+\s*$")  # Wikitext ' = Title = ', ' = = Section = = '
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_text(raw_lines, split: str, limit: int) -> list[str]:
    """Lines or sentences of raw text, headings and blank lines dropped, at most `limit`."""
    out: list[str] = []
    for line in raw_lines:
        line = line.strip()
        if not line or _HEADING.match(line):
            continue
        for piece in (_SENTENCE_END.split(line) if split == "sentences" else [line]):
            piece = piece.strip()
            if piece:
                out.append(piece)
                if len(out) >= limit:
                    return out
    return out


def looks_like_path(corpus: str) -> bool:
    return "://" in corpus or any(c in corpus for c in "*?[") or corpus.startswith((".", "/", "~")) or os.path.exists(corpus)


def read_fit_corpus(corpus: str, split: str, limit: int, storage, mirror: str | None = None) -> list[str]:
    """The texts a whitening fit (or a calibration) reads: a named corpus ('wikitext-2',
    'wikitext-103-raw-v1/train', ...: Salesforce/wikitext's Parquet files at a pinned commit, from
    the Hub or the mirror `mirror` / CORPUS_EMBED_MIRROR, downloaded once into the cache), or raw
    text files (path, glob or any fsspec URI; .gz/.zst fine)."""
    from operators.io.sources import CORPUS_NAMES, corpus_files

    files = corpus_files(corpus)
    if files is not None:
        import pyarrow.parquet as pq

        from operators.io.cache import CACHE_DIR
        from operators.io.sources import Sources, mirror_from

        sources = Sources(mirror_from(mirror), str(CACHE_DIR), storage)
        texts: list[str] = []
        for f in files:
            lines = pq.read_table(sources.path(f, f"whitening.corpus {corpus}"), columns=["text"]).column("text").to_pylist()
            texts += split_text((line or "" for line in lines), split, limit - len(texts))
            if len(texts) >= limit:
                break
        return texts
    if looks_like_path(corpus):
        texts = []
        for shard in list_shards(corpus, "text", storage):
            fs, path = get_fs(shard.uri, storage)
            with fs.open(path, "rt", encoding="utf-8", errors="replace", compression=shard.compression) as f:
                texts += split_text(f, split, limit - len(texts))
            if len(texts) >= limit:
                break
        return texts
    raise InputError(f"whitening.corpus: {corpus!r} is neither a named corpus ({', '.join(CORPUS_NAMES)}) nor an existing path, glob or URI")
