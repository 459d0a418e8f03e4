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

from operators.config.schema import StorageConfig
from operators.config.secrets import redact_uri

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


class UnsafePathError(ValueError):
    """A name from a remote listing would land outside its destination folder."""


def confined_path(root, rel: str):
    """`root / rel` for a relative name taken from a listing (an object key, a file name), refused
    when it is absolute or climbs out of `root` ('..', a drive, a NUL byte): a bucket's keys never
    choose where a file lands on this machine."""
    from pathlib import Path, PurePosixPath

    root = Path(root)
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not rel or "\x00" in rel or PurePosixPath(rel).is_absolute() or any(p in ("..", "") for p in parts) or ":" in parts[0]:
        raise UnsafePathError(f"refusing {rel!r}: not a plain relative path under {root}")
    target = root.joinpath(*parts)
    base = root.resolve()
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError(f"refusing {rel!r}: it resolves to {resolved}, outside {base}")
    return target


def glob_root(path: str) -> str | None:
    """The folder a glob path lists under (the part before its first wildcard), or None when the
    path has no wildcard."""
    if not any(c in path for c in _GLOB_CHARS):
        return None
    return path[: min(path.index(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0]


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
    def public_uri(self) -> str:
        """The URI as outputs, logs and errors show it: credentials replaced by *** (by the rules
        alone: the key of the shard in every process)."""
        return redact_uri(self.uri)

    @property
    def output_name(self) -> str:
        """Deterministic, flat and collision-free: the relative path with '/' -> '__', plus a
        short hash of the relative path so 'a/b.jsonl' and 'a__b.jsonl' cannot collide. The
        readable part is cut to OUTPUT_NAME_BYTES (UTF-8) so the name stays within every
        filesystem's 255-byte limit; the hash, of the whole path, keeps cut names apart."""
        flat = self.rel.replace("/", "__")
        encoded = flat.encode("utf-8", "surrogateescape")
        if len(encoded) > OUTPUT_NAME_BYTES:
            flat = encoded[:OUTPUT_NAME_BYTES].decode("utf-8", "ignore")
        digest = hashlib.sha256(self.rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return f"{flat}-{digest}.parquet"


# The readable part of an output name: with '-<hash>.parquet' and the staging prefixes it stays
# under the 255 bytes a file name may have on ext4, xfs, APFS and NTFS.
OUTPUT_NAME_BYTES = 160


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


def _local_find(root: str) -> dict[str, dict]:
    """Every file under a local folder, following symlinked folders (fsspec's find does not) and
    visiting each real folder once, so a link loop ends."""
    out: dict[str, dict] = {}
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in files:
            p = os.path.join(folder, name)
            out[p] = {"name": p, "type": "file"}
    return out


def _local_info(path: str, info: dict) -> dict:
    try:
        st = os.stat(path)  # follows symlinks
    except OSError as e:
        raise InputError(f"input: cannot read {path} ({type(e).__name__}: {e}); a dangling symlink? Fix or remove it") from e
    return dict(info, size=st.st_size, mtime=st.st_mtime, type="file")


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
        if glob_root(path) is not None:
            root = glob_root(path)
            infos = fs.glob(path, detail=True)
            infos = {p: i for p, i in infos.items() if i.get("type") != "directory"}
        elif fs.isdir(path):
            root = path.rstrip("/")
            infos = _local_find(path) if is_local(fs) else fs.find(path, detail=True)
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

    if is_local(fs):  # a symlinked shard is fingerprinted by its target: an edit through it is seen
        infos = {p: _local_info(p, i) for p, i in infos.items()}
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
    shown: dict[str, Shard] = {}
    for shard in shards:  # shards are keyed by the URI people see: two may never show as one
        other = shown.setdefault(shard.public_uri, shard)
        if other is not shard:
            raise InputError(f"input: the shards {other.rel!r} and {shard.rel!r} both show as {shard.public_uri} once "
                             "credentials are redacted; rename one (a path segment that looks like a secret field)")
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


# How Arrow reads Parquet from a Python (fsspec) file object: see read_parquet.
PYTHON_FILE_READ = {"use_threads": False}


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None):
    """A Parquet file on `fs`, whole or some of its columns, as an Arrow table.

    Single-threaded, as every read from a Python file object in this project is
    (`PYTHON_FILE_READ`): Arrow's threaded decode over a Python file can leave a thread that
    aborts the process at exit ("terminate called without an active exception", exit 134), after
    a run that succeeded. With pyarrow 26 that was 16 interpreter exits in 60 through
    ParquetFile.read and read_row_group, and about one in three through pq.read_table; 0 in 60
    with use_threads=False."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns, **PYTHON_FILE_READ)


def write_text_atomic(fs: fsspec.AbstractFileSystem, path: str, text) -> None:
    """Write `text` (a string, or an iterable of strings written as they come) to a hidden
    temporary file beside `path`, then commit it into place."""
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with fs.open(tmp, "w") as f:
            for chunk in ([text] if isinstance(text, str) else text):
                f.write(chunk)
        commit_file(fs, tmp, path)
    except BaseException:  # a full disk, a denied write, an interrupt: no half-written file left behind
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise


def commit_file(fs: fsspec.AbstractFileSystem, staged: str, final: str) -> None:
    """Move a fully written file into place. A rename on local disks; on object stores the
    final object only appears once it is complete, so readers never see a partial shard."""
    if is_local(fs):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(staged, final)  # atomic, and atomically replaces an older version
    else:
        fs.mv(staged, final)  # server-side copy: the new object appears whole
