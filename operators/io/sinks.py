"""Vector store sinks: each store converges to the published Parquet output.

The contract, the same for every store (stores.py: LanceDB, Qdrant, Milvus):
- What a store should hold is read from the published output, never from what this run did: the
  manifest of the published folder (`CURRENT.json`'s version with output.versioned, else the
  output folder) lists every vector shard with its file's fingerprint (size + ETag/mtime).
- What a store holds is recorded beside the output, per sink: `_sinks/<name>.json` names the
  config fingerprint, the dimension and, per shard, the fingerprint of the vector file last synced.
- A sync applies the difference: the rows of new and changed shards are upserted (keyed by
  (shard, id)), the ids a changed shard no longer holds are deleted, and so are the rows of shards
  gone from the output; nothing else is touched. A shard's entry is recorded only once its rows
  are in, so a sync that dies anywhere (a killed run, a store that refused a write) leaves a state
  the next run finishes, and a night with no change costs reading two small files: the store is
  not opened (the record holds its row count).
- A store of another dimension or config fingerprint that this sink has no record of is refused
  before any write; one it does have a record of (a new model, a new version published) is
  rebuilt from the output, as it is when the record is lost or unreadable.
- Shards are read one row group at a time and written in batches of `batch_rows`; transient errors
  are retried with exponential backoff (`retries`). A store that stays down or refuses fails its
  sink: the run exits 1 naming it, the Parquet output stays published, and the next run catches up.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time

import numpy as np
import pyarrow.parquet as pq

from operators.config.schema import ConfigError
from operators.config.secrets import redact_text
from operators.io.storage import PYTHON_FILE_READ, get_fs, write_text_atomic

logger = logging.getLogger("corpus_embed.sinks")
STATE_DIR = "_sinks"


class SinkError(RuntimeError):
    """A sink that could not bring its store to the published output; the next run catches up."""


# sink kind -> the modules it imports, and its extra (a Milvus Lite file needs milvus_lite too)
PACKAGES = {"lancedb": (("lancedb",), "lancedb"), "qdrant": (("qdrant_client",), "qdrant"), "milvus": (("pymilvus",), "milvus")}


def check_sinks(cfg) -> None:
    """Before any work: each configured sink's packages must be installed."""
    import importlib.util

    for sink in cfg.sinks:
        modules, extra = PACKAGES[sink.kind]
        needed = modules + (("milvus_lite",) if sink.kind == "milvus" and sink.lite else ())
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"sinks: {sink.label} needs {', '.join(missing)}, which is not installed: pip install 'corpus-embed[{extra}]'")


def target_of(sink) -> str:
    where = getattr(sink, "uri", None) or getattr(sink, "url", None) or getattr(sink, "path", None)
    return redact_text(f"{sink.kind} {where} {getattr(sink, 'table', None) or getattr(sink, 'collection', '')}".strip())


# -- what the store should hold, and what it holds ------------------------------------------------


def published_folder(fs, root: str, versioned: bool) -> str | None:
    """The folder of the published output: CURRENT.json's version, or the output folder itself."""
    from operators.io.incremental import read_current

    if not versioned:
        return root
    current = read_current(fs, root)
    return posixpath.join(root, current["version"]) if current else None


def desired_shards(fs, folder: str) -> dict[str, str]:
    """Each vector shard of the published folder and the fingerprint of its file (the manifest's)."""
    from operators.io.manifest import load_manifest

    out = {}
    for e in load_manifest(fs, folder).entries.values():
        mark = e.get("output_fingerprint") or [e.get("config_fingerprint"), e.get("input_fingerprint"), e.get("committed_at")]
        out[e["output"]] = json.dumps(mark, sort_keys=True, default=str)
    return out


def state_path(root: str, label: str) -> str:
    return posixpath.join(root, STATE_DIR, f"{label}.json")


def read_state(fs, root: str, label: str) -> dict | None:
    path = state_path(root, label)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            state = json.loads(f.read())
        if isinstance(state, dict) and isinstance(state.get("shards"), dict):
            return state
        raise ValueError("no shards")
    except (ValueError, UnicodeDecodeError) as e:
        logger.warning("%s is damaged (%s): the store is rebuilt from the output", redact_text(path), e)
        return None


def write_state(fs, root: str, label: str, state: dict) -> None:
    write_text_atomic(fs, state_path(root, label), json.dumps(state, sort_keys=True))


def shard_batches(fs, path: str, rows: int):
    """(ids, vectors float32, content hashes) of a vector shard, `rows` at a time: bounded memory."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        columns = ["id", "embedding"] + (["content_hash"] if "content_hash" in names else [])
        for batch in pf.iter_batches(batch_size=rows, columns=columns, **PYTHON_FILE_READ):
            n = batch.num_rows
            if not n:
                continue
            emb = batch.column("embedding")
            vectors = np.asarray(emb.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, -1)
            hashes = batch.column("content_hash").to_pylist() if "content_hash" in columns else [""] * n
            yield batch.column("id").to_pylist(), vectors, hashes


# -- syncing --------------------------------------------------------------------------------------


# A dropped or refused connection, a timeout, a server's 5xx or 429 (Milvus: unavailable, rate
# limited): worth another try. A refused write (PermissionError), a missing file or a bad request is
# not: it fails the sink at once, and the next run catches up.
TRANSIENT = (ConnectionError, TimeoutError)
TRANSIENT_NAMES = ("ResponseHandlingException", "MilvusUnavailableException", "ConnectError")
MILVUS_TRANSIENT_CODES = (2, 8)  # cannot connect / server unavailable; rate limited


def is_transient(e: BaseException) -> bool:
    status = getattr(e, "status_code", None)
    milvus = type(e).__module__.startswith("pymilvus") and getattr(e, "code", None) in MILVUS_TRANSIENT_CODES
    return isinstance(e, TRANSIENT) or type(e).__name__ in TRANSIENT_NAMES or milvus or \
        (isinstance(status, int) and (status >= 500 or status == 429))


def retrying(call, retries: int, what: str):
    """`call()`, retried on transient errors (connections, timeouts, a server's 5xx or 429) with
    exponential backoff, at most `retries` times."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 (sorted below)
            if not is_transient(e) or attempt == retries:
                raise
            delay = min(30.0, 0.5 * 2 ** attempt)
            logger.warning("%s: %s: %s; retrying in %.1f s", what, type(e).__name__, redact_text(str(e))[:200], delay)
            time.sleep(delay)


def of_this_config(state: dict | None, target: str, fingerprint: str, dimension: int) -> bool:
    """Whether the sink's record is of this target, config fingerprint and dimension."""
    return state is not None and state.get("target") == target and state.get("config_fingerprint") == fingerprint and \
        state.get("dimension") == dimension


def in_sync(state: dict | None, target: str, fingerprint: str, dimension: int, want: dict) -> bool:
    """Whether the sink's record says its store holds exactly `want` (and how many rows that is)."""
    return of_this_config(state, target, fingerprint, dimension) and isinstance(state.get("rows"), int) and state["shards"] == want


def sync_sink(sink, fs, root: str, folder: str, fingerprint: str, dimension: int) -> dict:
    """Bring one store to the published folder's rows (the contract above); returns its stats."""
    from operators.io.stores import open_store

    started = time.time()
    label, target = sink.label, target_of(sink)
    do = lambda call, what: retrying(call, sink.retries, f"sinks: {label}: {what}")  # noqa: E731
    want = desired_shards(fs, folder)
    state = read_state(fs, root, label)
    stats = {"kind": sink.kind, "target": target, "mode": "incremental", "shards_upserted": 0, "shards_deleted": 0,
             "rows_upserted": 0, "rows_deleted": 0}
    if in_sync(state, target, fingerprint, dimension, want):  # a night with no change: the store is not even opened
        return {**stats, "mode": "unchanged", "rows": state["rows"], "seconds": round(time.time() - started, 2)}
    store = open_store(sink)
    try:
        held = do(store.describe, "describe")
        ours = state is not None and state.get("target") == target
        if held is not None and held[1] is not None and (held[0] != dimension or held[1] != fingerprint) and not ours \
                and not str(held[1]).startswith("an earlier layout"):
            raise SinkError(f"sinks: {label}: {target} holds {held[0]}-dimensional vectors of config {held[1]}, and this output's "
                            f"are {dimension}-dimensional of config {fingerprint}; this sink has no record of writing them, so "
                            "nothing was written: point it at another table or collection, or delete that one")
        fresh = held is None or not of_this_config(state, target, fingerprint, dimension)
        if fresh:  # a store to build (absent, another config of ours, no record of what it holds): from the output
            do(lambda: store.create(dimension), "create")
            state = {"target": target, "config_fingerprint": fingerprint, "dimension": dimension, "shards": {}}
            stats["mode"] = "created" if held is None else "rebuilt"
            write_state(fs, root, label, state)
        # a record with its row count is one a sync finished: the store then holds exactly the recorded
        # shards, so a new shard has no rows there yet. The count comes back only when this sync finishes.
        finished = state.pop("rows", None) is not None
        if finished:  # on record before the store is touched: a sync that dies from here on is not one that finished
            write_state(fs, root, label, state)
        synced = state["shards"]
        last_saved = time.time()
        for name in sorted(set(synced) - set(want)):  # shards gone from the output
            before = len(do(lambda n=name: store.keys_of(n), "keys"))
            do(lambda n=name: store.delete_shard(n), "delete")
            stats["shards_deleted"] += 1
            stats["rows_deleted"] += before
            synced.pop(name)
        for name, mark in sorted(want.items()):
            if synced.get(name) == mark:
                continue
            held_ids = set() if fresh or (finished and name not in synced) else do(lambda n=name: store.keys_of(n), "keys")
            seen: set[str] = set()
            for ids, vectors, hashes in shard_batches(fs, posixpath.join(folder, name), sink.batch_rows):
                do(lambda: store.upsert(name, ids, vectors, hashes, fingerprint, held=bool(held_ids)), "upsert")
                seen.update(ids)
                stats["rows_upserted"] += len(ids)
            stale = sorted(held_ids - seen)
            if stale:
                do(lambda n=name, s=stale: store.delete_ids(n, s), "delete")
                stats["rows_deleted"] += len(stale)
            synced[name] = mark
            stats["shards_upserted"] += 1
            if time.time() - last_saved > 10:  # what is in, recorded as it goes: a crash redoes little
                write_state(fs, root, label, state)
                last_saved = time.time()
        write_state(fs, root, label, state)
        stats.update(do(store.finish, "index"))
        stats["rows"] = state["rows"] = do(store.count, "count")
        write_state(fs, root, label, state)  # with the rows it holds: what a night with no change reports
        stats["seconds"] = round(time.time() - started, 2)
        return stats
    finally:
        close = getattr(store, "close", None)
        if close:
            close()


def feed_sinks(cfg, fingerprint: str, dimension: int) -> dict | None:
    """Every configured sink brought to the published output; their stats (a failed sink's say
    why), or None without sinks. Each sink is tried even when another fails (require_synced then
    fails the run naming them)."""
    if not cfg.sinks:
        return None
    fs, root = get_fs(cfg.output.uri, cfg.output.storage)
    folder = published_folder(fs, root, cfg.output.versioned)
    if folder is None:
        return {s.label: {"skipped": "nothing published yet"} for s in cfg.sinks}
    stats = {}
    for sink in cfg.sinks:
        try:
            stats[sink.label] = sync_sink(sink, fs, root, folder, fingerprint, dimension)
        except Exception as e:  # noqa: BLE001 (every sink is tried; the run then fails naming them)
            message = e.args[0] if isinstance(e, SinkError) else f"sinks: {sink.label} ({target_of(sink)}): {type(e).__name__}: {e}"
            stats[sink.label] = {"failed": redact_text(str(message))}
    return stats


def require_synced(stats: dict | None) -> None:
    """SinkError naming every sink that failed (the run exits 1; the next run catches up)."""
    failed = [s["failed"] for s in (stats or {}).values() if "failed" in s]
    if failed:
        raise SinkError("; ".join(failed) + " (the Parquet output stays published; the next run brings the store up to date)")
