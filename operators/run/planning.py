"""The incremental plan: which shards a run embeds, reuses, skips and deletes. No Ray, no model.

`plan_run(cfg, prepared)` lists the input, checks the output and reads what it records (the
manifest, and the vector files' footers where the manifest is behind), then sorts every shard:
new shards are embedded whole; changed shards (same config, new content) are read again with the
unchanged documents' vectors reused; committed shards that were cut short or replaced since are
embedded again; shards gone from the input are deleted, but only when this run lists the same
input root the output records (or output.prune), so a run over a subset deletes nothing.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field

from operators.config.schema import ConfigError, PipelineConfig
from operators.config.secrets import redact_text, redact_uri
from operators.execution.stages import estimated_blocks
from operators.io.incremental import version_name
from operators.io.manifest import load_manifest, read_provenance
from operators.io.storage import Shard, check_writable, file_fingerprint, get_fs, glob_root, list_shards, protocol_of
from operators.io.writers import ShardStats

logger = logging.getLogger("corpus_embed")


@dataclass(frozen=True)
class ReadUnit:
    """What a read task needs for one shard: the shard (the plan's own object, not a copy), what
    its commit record is made of (`seed()`, built on the read task and carried to the writer on
    the eof row), and the earlier vector file whose unchanged rows are reused."""

    shard: Shard
    config_fingerprint: str
    incremental: bool = False
    previous: str | None = None

    def seed(self) -> str:
        return shard_stats(self.shard, self.config_fingerprint, self.incremental).seed()


# A read task takes consecutive shards up to about this many bytes, or this many shards: enough
# to amortise a task's start over small shards, little enough that a retried task redoes little.
GROUP_BYTES = 64 << 20
GROUP_SHARDS = 256


@dataclass
class Plan:
    shards: list[Shard]
    todo: list[Shard]
    done: dict[str, dict]  # rel -> manifest entry of shards already embedded with this config
    config_fingerprint: str
    out_uri: str = ""  # where the vector shards go: output.uri, or its version folder
    version: str | None = None  # output.versioned: v-<fingerprint>
    changed: set[str] = field(default_factory=set)  # rels re-read with document-level reuse
    deleted: list[str] = field(default_factory=list)  # vector files of shards gone from the input
    # the input root the manifest records, and whether this run may delete what it lacks
    input_root: str | None = None
    prunes: bool = True
    damaged: list[str] = field(default_factory=list)  # rels whose committed vector file failed its check
    rows_per_block: int = 1024

    @property
    def new(self) -> int:
        return len(self.todo) - len(self.changed)

    @property
    def blocks(self) -> int:
        """At most how many read blocks reach the model."""
        return sum(estimated_blocks(s, self.rows_per_block) for s in self.todo)

    def read_groups(self, min_groups: int = 1) -> list[list[ReadUnit]]:
        """plan.todo as read tasks: consecutive shards (listing order) of about equal bytes, at
        least min_groups of them (when there are as many shards), each under GROUP_BYTES and
        GROUP_SHARDS unless one shard alone is larger."""
        sizes = [int(s.fingerprint.get("size") or 0) for s in self.todo]
        n = len(sizes)
        if not n:
            return []
        groups = min(n, max(min_groups, -(-sum(sizes) // GROUP_BYTES), -(-n // GROUP_SHARDS)))
        target, cap = sum(sizes) / groups, -(-n // groups)
        out, group, size = [], [], 0
        for shard, b in zip(self.todo, sizes):
            group.append(self.read_unit(shard))
            size += b
            if size >= target or len(group) >= cap:
                out.append(group)
                group, size = [], 0
        return out + ([group] if group else [])

    def read_unit(self, shard: Shard) -> ReadUnit:
        changed = shard.rel in self.changed
        previous = posixpath.join(self.out_uri, shard.output_name) if changed else None
        return ReadUnit(shard, self.config_fingerprint, changed, previous)

    def stats_for(self, shard: Shard) -> ShardStats:
        """The empty per-shard record a commit fills in."""
        return shard_stats(shard, self.config_fingerprint, shard.rel in self.changed)


def shard_stats(shard: Shard, fp: str, incremental: bool = False) -> ShardStats:
    return ShardStats(
        input=shard.public_uri, rel=shard.rel, output=shard.output_name, input_fingerprint=shard.fingerprint,
        config_fingerprint=fp, incremental=incremental,
    )


def output_location(cfg: PipelineConfig, fp: str) -> tuple[str, str | None]:
    """(the folder the vector shards go to, the version name or None)."""
    if not cfg.output.versioned:
        return cfg.output.uri, None
    version = version_name(fp)
    return posixpath.join(cfg.output.uri.rstrip("/"), version), version


def list_input(cfg: PipelineConfig) -> list[Shard]:
    """The input's shards, listed and fingerprinted: InputError for a missing or empty input (the
    cheapest check, so it runs before the model is resolved)."""
    return list_shards(cfg.input.uri, cfg.input.format, cfg.input.storage)


def plan_run(cfg: PipelineConfig, prepared, shards: list[Shard] | None = None) -> Plan:
    """Check the output and sort the shards of the input (listed here unless given; see the
    module's docstring). Raises ConfigError/InputError before any work starts."""
    fp = prepared.fingerprint
    shards = list_input(cfg) if shards is None else shards
    out_uri, version = output_location(cfg, fp)
    check_output_outside_input(cfg, out_uri)
    check_writable(out_uri, cfg.output.storage)

    fs, out_dir = get_fs(out_uri, cfg.output.storage)
    recorded = load_manifest(fs, out_dir)
    if recorded.damaged:
        logger.warning("%s: rebuilding the entries from the vector files' footers", redact_text(recorded.damaged))
    manifest = recorded.entries
    fs.invalidate_cache(out_dir)
    listing = fs.ls(out_dir, detail=True) if fs.exists(out_dir) else []
    # files only: a folder named like a vector file (spark_export.parquet/) is someone else's
    present = {posixpath.basename(i["name"]): i for i in listing if i.get("type") != "directory"}
    todo, done, changed, damaged = [], {}, set(), []
    for shard in shards:
        entry = manifest.get(shard.rel)
        if shard.output_name not in present:
            todo.append(shard)
            continue
        if entry is not None and not output_intact(entry, present[shard.output_name]):
            damaged.append(shard.rel)  # cut short or replaced since its commit: embed it again
            todo.append(shard)
            continue
        if entry is None or entry.get("config_fingerprint") != fp or entry.get("input_fingerprint") != shard.fingerprint:
            # Not (or differently) in the manifest: a run may have committed it and died before
            # updating the manifest. The shard's own footer says what it was built from.
            meta = read_provenance(fs, posixpath.join(out_dir, shard.output_name)) or {}
            if meta.get("config_fingerprint") == fp and meta.get("input", {}).get("fingerprint") == shard.fingerprint:
                entry = dict(shard_stats(shard, fp).to_json(), **meta.get("counts", {}))
                entry["output_fingerprint"] = file_fingerprint(present[shard.output_name])
            else:
                todo.append(shard)
                if meta.get("config_fingerprint") == fp:  # same config, new content: reuse what did not change
                    changed.add(shard.rel)
                continue
        done[shard.rel] = entry
    if damaged:
        logger.warning("%d committed vector files differ from what their commit recorded (size, etag/mtime); "
                       "embedding them again: %s", len(damaged), ", ".join(damaged[:10]))
    root = redact_uri(cfg.input.uri.rstrip("/"))
    input_root = recorded.input_uri
    prunes = cfg.output.prune or (input_root == root)
    if input_root is None and (manifest or recorded.damaged or present):
        prunes = cfg.output.prune  # which root the output came from is unknown: delete nothing unasked
    wanted = {s.output_name for s in shards}
    others = ours(fs, out_dir, sorted(n for n in present if n.endswith(".parquet") and n not in wanted), manifest)
    if others and not prunes:
        logger.warning(
            "input.uri %s is not the input root this output records (%s): the %d vector shards of other inputs "
            "are kept. To delete them on purpose, run with --set output.prune=true", root, input_root or "unknown", len(others),
        )
    if prunes or input_root is None:
        input_root = root
    return Plan(shards, todo, done, fp, out_uri, version, changed, others if prunes else [], input_root, prunes, damaged,
                cfg.input.rows_per_block)


def ours(fs, out_dir: str, names: list[str], manifest: dict) -> list[str]:
    """Of the Parquet files `names` in the output folder, the vector shards this product wrote: those
    the manifest records, or whose footer carries its provenance (a commit whose manifest update
    was lost). Anything else (a user's customer_scores.parquet) is never deleted nor read as deletions."""
    recorded = {e.get("output") for e in manifest.values()}
    return [n for n in names if n in recorded or read_provenance(fs, posixpath.join(out_dir, n)) is not None]


def output_intact(entry: dict, info: dict) -> bool:
    """Whether a committed vector file still is what its commit recorded (size, and etag or mtime):
    a listing's details, no extra request. Entries from before this record pass."""
    want = entry.get("output_fingerprint")
    if not want:
        return True
    have = file_fingerprint(info)
    return all(have.get(k) == v for k, v in want.items() if k in have)


def check_output_outside_input(cfg: PipelineConfig, out_uri: str) -> None:
    """Refuse an output folder inside the input folder: the next run would read its own vectors as input."""
    if protocol_of(cfg.input.uri) != protocol_of(out_uri):
        return
    in_fs, in_path = get_fs(cfg.input.uri, cfg.input.storage)
    _, out_path = get_fs(out_uri, cfg.output.storage)
    root = glob_root(in_path)
    if root is None:
        if not in_fs.isdir(in_path):
            return  # one file: a sibling output folder is never listed
        root = in_path
    norm = (lambda p: os.path.realpath(p)) if protocol_of(out_uri) == "file" else (lambda p: p.rstrip("/"))
    root, out = norm(root), norm(out_path)
    if out == root or out.startswith(root.rstrip("/") + "/"):
        raise ConfigError(
            f"output.uri {redact_text(out_uri)} lies inside input.uri {redact_text(cfg.input.uri)}: later runs would read "
            "the vector shards as input. Pick an output folder outside the input"
        )
