"""The output's manifest (`manifest.json`): one entry per committed vector shard (its input and
output fingerprints, row counts, rejections by reason), written as a stream and read back whole
or, when damaged, rebuilt by the plan from the shards' footers; and a shard's provenance footer."""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from operators import __version__
from operators.config.secrets import redact
from operators.io.storage import write_text_atomic
from operators.io.writers import METADATA_KEY

MANIFEST = "manifest.json"


def read_provenance(fs, path: str) -> dict | None:
    """The provenance stored in a vector shard's Parquet footer, or None if unreadable."""
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
    except Exception:
        return None


@dataclass
class Manifest:
    """What manifest.json records: the shard entries (by rel) and the input root they came from
    (None when unknown: a manifest from before roots were recorded, or a damaged one)."""

    entries: dict[str, dict]
    input_uri: str | None = None
    damaged: str | None = None  # why the file could not be used; entries then come from the footers


_ENTRY_KEYS = ("rel", "output", "input_fingerprint", "config_fingerprint")


def load_manifest(fs, output_dir: str) -> Manifest:
    """The manifest, or an empty one when there is none. A damaged file (cut short, not JSON, an
    entry without its keys) is no reason to stop every run: the vector files' footers say what
    each shard was built from, so the plan rebuilds the entries from them (Manifest.damaged says
    why, for the warning)."""
    path = posixpath.join(output_dir, MANIFEST)
    if not fs.exists(path):
        return Manifest({})
    try:
        with fs.open(path, "rb") as f:
            data = json.load(f)
        shards = data.get("shards", [])
        if not isinstance(shards, list):
            raise ValueError("'shards' is not a list")
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        return Manifest({}, damaged=f"{path} is not a readable manifest ({type(e).__name__}: {e})")
    entries, bad = {}, 0
    for entry in shards:
        if isinstance(entry, dict) and all(k in entry for k in _ENTRY_KEYS):
            entries[entry["rel"]] = entry
        else:
            bad += 1
    damaged = f"{path}: {bad} of {len(shards)} entries lack {', '.join(_ENTRY_KEYS)}" if bad else None
    return Manifest(entries, data.get("input_uri") if isinstance(data.get("input_uri"), str) else None, damaged)


def rejected_by_reason(entries) -> dict[str, int]:
    """The rejected rows of manifest entries, summed by reason (entries from before the per-reason
    counts add their rows_rejected under "unrecorded")."""
    total: dict[str, int] = {}
    for e in entries:
        reasons = e.get("rejected_reasons")
        if reasons is None and e.get("rows_rejected"):
            reasons = {"unrecorded": e["rows_rejected"]}
        add_reasons(total, reasons or {})
    return dict(sorted(total.items()))


def add_reasons(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """Add the per-reason counts `more` into `total` (the run's and the manifest's sums)."""
    for reason, n in more.items():
        total[reason] = total.get(reason, 0) + n
    return total


def write_manifest(fs, output_dir: str, entries: dict, config_fingerprint: str, input_uri: str | None = None) -> str:
    """The manifest as one JSON document with one shard entry per line, streamed to the file: at
    10^5 shards it is never one string in memory. Entries hold public URIs only (Shard.public_uri),
    so only the header is redacted."""
    path = posixpath.join(output_dir, MANIFEST)
    header = redact({
        "format": "corpus-embed/manifest@1",
        "package_version": __version__,
        "updated_at": time.time(),
        "config_fingerprint": config_fingerprint,
        "input_uri": input_uri,
        "rejected_by_reason": rejected_by_reason(entries.values()),
    })

    def chunks():
        yield json.dumps(header, sort_keys=True)[:-1] + ', "shards": [\n'
        for n, key in enumerate(sorted(entries)):
            yield ("" if n == 0 else ",\n") + json.dumps(entries[key], sort_keys=True)
        yield "\n]}\n"

    write_text_atomic(fs, path, chunks())
    return path
