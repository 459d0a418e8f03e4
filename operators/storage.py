"""fsspec helpers: open any URI, list input shards, fingerprint them, commit files atomically.

Local paths are the default; `s3://` goes through s3fs and picks up the standard AWS
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles) by itself.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from operators.config import StorageConfig

# Extensions recognised in format=auto, compression suffixes stripped first.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
FORMAT_BY_EXT = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
}
_GLOB_CHARS = set("*?[")


class InputError(RuntimeError):
    """The input cannot be read: missing path, empty input, unreachable bucket."""


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def get_fs(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path within it."""
    return url_to_fs(uri, **storage.fsspec_options(protocol_of(uri)))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI for a path returned by `fs`: plain for local files, with the scheme otherwise
    (s3fs returns 'bucket/key')."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def split_compression(name: str) -> tuple[str, str | None]:
    """("part-0.jsonl.gz") -> ("part-0.jsonl", "gzip")."""
    for ext, comp in COMPRESSIONS.items():
        if name.endswith(ext):
            return name[: -len(ext)], comp
    return name, None


def detect_format(path: str) -> str | None:
    stem, _ = split_compression(posixpath.basename(path))
    return FORMAT_BY_EXT.get(posixpath.splitext(stem)[1].lower())


@dataclass(frozen=True)
class Shard:
    """One input file. `rel` is its path under the input root and names its output."""

    uri: str  # full URI, as the readers open it
    rel: str
    format: str  # jsonl | parquet | text
    compression: str | None
    fingerprint: dict  # size plus etag (object stores) or mtime (files)

    @property
    def output_name(self) -> str:
        """Deterministic, flat and collision-free: the relative path with '/' -> '__', plus a
        short hash of the relative path so 'a/b.jsonl' and 'a__b.jsonl' cannot collide."""
        flat = self.rel.replace("/", "__")
        digest = hashlib.sha256(self.rel.encode()).hexdigest()[:8]
        return f"{flat}-{digest}.parquet"


def file_fingerprint(info: dict) -> dict:
    fp: dict[str, Any] = {"size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        fp["etag"] = str(etag).strip('"')
    else:
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if mtime is not None:
            fp["mtime"] = mtime.isoformat() if hasattr(mtime, "isoformat") else float(mtime)
    return fp


def _describe_storage_error(uri: str, err: Exception) -> str:
    hint = ""
    if protocol_of(uri) in ("s3", "s3a"):
        hint = (
            " Check the bucket name and region, credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE or an instance role) and the endpoint (AWS_ENDPOINT_URL or "
            "input.storage.endpoint_url)."
        )
    return f"cannot read {uri}: {type(err).__name__}: {err}.{hint}"


def list_shards(uri: str, fmt: str, storage: StorageConfig) -> list[Shard]:
    """The input shards under a file, folder or glob URI, sorted by path.

    Hidden files and names starting with '_' (e.g. _SUCCESS, _rejected/) are skipped in
    folders; in format=auto, files with unknown extensions are skipped in folders and globs and
    are an error when named directly.
    """
    fs, path = get_fs(uri, storage)
    try:
        if any(c in path for c in _GLOB_CHARS):
            root = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            infos = fs.glob(path, detail=True)
            infos = {p: i for p, i in infos.items() if i.get("type") != "directory"}
        elif fs.isdir(path):
            root = path.rstrip("/")
            infos = fs.find(path, detail=True)
        elif fs.isfile(path):
            root = posixpath.dirname(path.rstrip("/"))
            infos = {path: fs.info(path)}
        else:
            if not is_local(fs):
                bucket = path.split("/", 1)[0]
                try:
                    fs.ls(bucket)
                except Exception as e:
                    raise InputError(_describe_storage_error(f"{protocol_of(uri)}://{bucket}", e)) from e
            raise InputError(f"input.uri: {uri} does not exist. Point input.uri at a file, folder or glob of shards.")
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(
            f"input.uri: {uri} does not exist ({e}). Point input.uri at a file, folder or glob of shards."
        ) from e
    except Exception as e:  # unreachable bucket, bad credentials, DNS, ...
        raise InputError(_describe_storage_error(uri, e)) from e

    shards = []
    named_directly = len(infos) == 1 and not any(c in path for c in _GLOB_CHARS) and not fs.isdir(path)
    for p in sorted(infos):
        rel = p[len(root) :].lstrip("/") if root and p.startswith(root) else posixpath.basename(p)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        shard_fmt = fmt if fmt != "auto" else detect_format(p)
        if shard_fmt is None:
            if named_directly:
                raise InputError(
                    f"input.format=auto cannot tell the format of {p}: use a .jsonl, .parquet or .txt "
                    "extension (optionally .gz/.zst) or set input.format to jsonl, parquet or text"
                )
            continue
        _, comp = split_compression(posixpath.basename(p))
        shards.append(Shard(uri=full_uri(fs, p), rel=rel, format=shard_fmt, compression=comp, fingerprint=file_fingerprint(infos[p])))
    if not shards:
        raise InputError(
            f"input.uri: no input shards found at {uri} (format={fmt}). Expected files ending in "
            ".jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt, or set input.format."
        )
    return shards


def check_writable(uri: str, storage: StorageConfig) -> None:
    """Fail fast when the output location cannot be written, before any embedding work."""
    fs, path = get_fs(uri, storage)
    probe = posixpath.join(path.rstrip("/"), f"_probe-{uuid.uuid4().hex}")
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:
        hint = (
            " Check the bucket exists and the credentials allow s3:PutObject (or set output.storage)."
            if protocol_of(uri) in ("s3", "s3a")
            else " Check the folder's permissions or pick another output.uri."
        )
        raise InputError(f"output.uri: cannot write to {uri}: {type(e).__name__}: {e}.{hint}") from e


def write_text_atomic(fs: fsspec.AbstractFileSystem, path: str, text: str) -> None:
    """Write `text` to a hidden temporary file beside `path`, then commit it into place."""
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    with fs.open(tmp, "w") as f:
        f.write(text)
    commit_file(fs, tmp, path)


def commit_file(fs: fsspec.AbstractFileSystem, staged: str, final: str) -> None:
    """Move a fully written file into place. A rename on local disks; on object stores the
    final object only appears once it is complete, so readers never see a partial shard."""
    if is_local(fs):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(staged, final)  # atomic, and atomically replaces an older version
    else:
        fs.mv(staged, final)  # server-side copy: the new object appears whole
