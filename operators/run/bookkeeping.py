"""A run's bookkeeping, in one typed record: counts, durations, what was committed and deleted,
the manifest merge, the run report (`_runs/<run_id>.json` and `.md`, one line in `runs.jsonl`)
and the summary line the command line prints. No Ray.

    record = RunRecord.begin(cfg)
    with record.running(cfg):               the output's lease held; the report written however it ends
        ...
        entries = record_outputs(cfg, plan, outcome, record)   deletions, manifest, counts
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field

from operators import __version__
from operators.config.schema import PipelineConfig
from operators.config.secrets import redact, redact_text
from operators.io import cache
from operators.io.incremental import RUNS_DIR, append_run_log, new_run_id, read_previous, report_markdown, write_deletions, write_json
from operators.io.manifest import add_reasons, load_manifest, write_manifest
from operators.io.storage import get_fs, write_text_atomic
from operators.io.writers import COUNT_KEYS, IncompleteShardError, WriteOutcome

logger = logging.getLogger("corpus_embed")


@dataclass
class RunCounts:
    shards_total: int = 0
    shards_new: int = 0
    shards_changed: int = 0
    shards_unchanged: int = 0  # up to date: skipped
    shards_deleted: int = 0
    shards_embedded: int = 0  # committed by this run
    rows_in: int = 0
    rows_written: int = 0  # embedded + reused
    rows_reused: int = 0
    rows_rejected: int = 0
    rows_truncated: int = 0
    rows_deleted: int = 0
    rows_duplicate: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    rejected_by_reason: dict = field(default_factory=dict)  # writers.reason_key -> rows

    @property
    def rows_embedded(self) -> int:
        return self.rows_written - self.rows_reused

    @property
    def padding_efficiency(self) -> float:
        """Real tokens / padded tokens fed to the model (1.0: no padding)."""
        return self.tokens / self.padded_tokens if self.padded_tokens else 1.0

    def add_shard(self, stats: dict) -> None:
        self.shards_embedded += 1
        for key in COUNT_KEYS:
            setattr(self, key, getattr(self, key) + stats.get(key, 0))
        add_reasons(self.rejected_by_reason, stats.get("rejected_reasons") or {})

    def report(self) -> dict:
        """The report's counts, in its order."""
        return {
            "shards_total": self.shards_total, "shards_new": self.shards_new, "shards_changed": self.shards_changed,
            "shards_unchanged": self.shards_unchanged, "shards_deleted": self.shards_deleted, "rows_in": self.rows_in,
            "rows_embedded": self.rows_embedded, "rows_reused": self.rows_reused, "rows_rejected": self.rows_rejected,
            "rows_truncated": self.rows_truncated, "rows_deleted": self.rows_deleted, "rows_duplicate": self.rows_duplicate,
            "tokens": self.tokens, "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
        }



@dataclass
class RunRecord:
    run_id: str
    output: str  # output.uri
    model: str
    status: str = "running"  # running, ok, failed, gate_failed
    config_fingerprint: str | None = None
    out_uri: str | None = None  # output.uri or its version folder
    version: str | None = None
    published: bool = False
    previous_version: str | None = None
    counts: RunCounts = field(default_factory=RunCounts)
    durations: dict[str, float] = field(default_factory=dict)
    committed_shards: list[str] = field(default_factory=list)
    shards_by_node: dict[str, int] = field(default_factory=dict)  # Ray node id (12 hex) -> shards it committed
    deleted_shards: list[str] = field(default_factory=list)
    deletions_file: str | None = None
    steady_rows_per_s: float | None = None  # between the first and the last commit: start-up left out
    gate: dict | None = None
    sinks: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    started: float = field(default_factory=time.time)
    report: dict | None = None  # as written
    report_path: str | None = None  # where the report went when the output could not take it
    lease: object = field(default=None, repr=False)  # the output's lease while running()

    def check_lease(self) -> None:
        """Before a commit on the driver (manifest, deletions, publishing, sinks): stop (LeaseError)
        when another run took the output over while this one was stalled."""
        if self.lease is not None:
            self.lease.check()

    @classmethod
    def begin(cls, cfg: PipelineConfig) -> "RunRecord":
        return cls(run_id=new_run_id(), output=cfg.output.uri, model=cfg.model.name)

    @contextlib.contextmanager
    def timed(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.durations[name] = time.time() - t

    def planned(self, plan, prepared) -> None:
        self.config_fingerprint, self.version, self.out_uri = plan.config_fingerprint, plan.version, plan.out_uri
        c = self.counts
        c.shards_total, c.shards_unchanged, c.shards_changed = len(plan.shards), len(plan.done), len(plan.changed)
        c.shards_new, c.shards_deleted = plan.new, len(plan.deleted)
        r = prepared.resolved
        logger.info(
            "model %s (%s, %d dims out, max_length %d), config fingerprint %s%s", self.model, r.model_type,
            prepared.dimension, r.max_length, plan.config_fingerprint, f", version {plan.version}" if plan.version else "",
        )
        if plan.todo:
            logger.info(
                "embedding %d of %d shards (%d new, %d changed: unchanged documents reused; %d already up to date; %d deleted)",
                len(plan.todo), len(plan.shards), plan.new, len(plan.changed), len(plan.done), len(plan.deleted),
            )
        else:
            logger.info("no shard to embed: %d up to date, %d deleted", len(plan.shards), len(plan.deleted))

    @contextlib.contextmanager
    def running(self, cfg: PipelineConfig):
        """Hold the output's lease (a live holder: LeaseError, before any write) and write the run
        report however the block ends; re-raise its error."""
        from operators.run.gate import GateError
        from operators.run.lease import acquire_lease

        fs, root = get_fs(cfg.output.uri, cfg.output.storage)
        lease = acquire_lease(fs, root, self.run_id, cfg.output.lease_seconds)
        self.lease = lease
        try:
            yield self
            self.status = "ok"
        except BaseException as e:
            self.status = "gate_failed" if isinstance(e, GateError) else "failed"
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.seconds = time.time() - self.started
            self.durations["total_s"] = self.seconds
            write_run_report(self, fs, root)
            lease.release()

    # -- what the command line and the report say ------------------------------------------------

    def to_report(self) -> dict:
        secs = max(self.seconds, 1e-9)
        c = self.counts
        return redact({
            "run_id": self.run_id, "status": self.status, "output": self.output, "version": self.version,
            "published": self.published, "config_fingerprint": self.config_fingerprint, "model": self.model,
            "counts": c.report(),
            "throughput": {
                "rows_per_s": c.rows_embedded / secs, "tokens_per_s": c.tokens / secs, "padding_efficiency": c.padding_efficiency,
            },
            "durations": self.durations, "gate": self.gate, "sinks": self.sinks, "out_uri": self.out_uri,
            "committed_shards": self.committed_shards, "shards_by_node": self.shards_by_node, "deleted_shards": self.deleted_shards,
            "deletions_file": self.deletions_file, "error": self.error, "package_version": __version__,
        })

    def summary_line(self) -> str:
        c, secs = self.counts, max(self.seconds, 1e-9)
        where = (self.out_uri or self.output) + (" (published)" if self.published else "")
        if not c.shards_embedded and not c.shards_deleted and c.shards_unchanged == c.shards_total:
            return f"nothing to do: all {c.shards_total} shards are up to date in {self.seconds:.1f}s -> {where}"
        extra = ""
        if c.rows_reused or c.rows_deleted:
            extra = f" ({c.rows_embedded} embedded, {c.rows_reused} reused), {c.rows_deleted} deleted"
        return (
            f"done: {c.rows_written} rows written{extra}, {c.rows_rejected} rejected, {c.rows_truncated} truncated "
            f"from {c.rows_in} rows in {c.shards_embedded} shards ({c.shards_unchanged} up to date) "
            f"in {self.seconds:.1f}s: {c.rows_embedded / secs:.1f} rows/s, {c.tokens / secs:.0f} tokens/s, "
            f"padding efficiency {c.padding_efficiency:.2f} -> {where}"
        )


def write_run_report(record: RunRecord, fs, root: str) -> None:
    """Append the run to `_runs/runs.jsonl` and write `_runs/<run_id>.json` and `.md`; when the
    output cannot take them, keep the report under CACHE_DIR/runs and say where."""
    report = record.to_report()
    record.report = report
    try:
        write_json(fs, posixpath.join(root, RUNS_DIR, f"{record.run_id}.json"), report)
        write_text_atomic(fs, posixpath.join(root, RUNS_DIR, f"{record.run_id}.md"), report_markdown(report))
        append_run_log(fs, root, {k: report[k] for k in ("run_id", "status", "version", "published", "config_fingerprint", "counts", "durations")})
    except Exception as e:  # never hide the run's own outcome behind a logging failure
        local = cache.CACHE_DIR / "runs" / f"{record.run_id}.json"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(report, indent=1, default=str) + "\n")
        record.report_path = str(local)
        logger.warning("could not write the run report under %s/%s (%s: %s); it is at %s",
                       redact_text(root), RUNS_DIR, type(e).__name__, redact_text(str(e)), local)


# -- recording the outputs ------------------------------------------------------------------------


def deleted_shard_ids(fs, out_dir: str, names: list[str]) -> list[dict]:
    """The ids of the vector files of shards gone from the input, as deletion records (read before
    anything is removed: a deletion is recorded before its vector file goes)."""
    rows = []
    for name in names:
        prev = read_previous(fs, posixpath.join(out_dir, name), columns=("id",))
        rows += [{"id": i, "shard": name, "reason": "shard deleted"} for i in (prev.column("id").to_pylist() if prev else [])]
    return rows


def remove_deleted_shards(fs, out_dir: str, names: list[str]) -> None:
    """Delete the vector (and rejected) files of shards gone from the input."""
    for name in names:
        fs.rm(posixpath.join(out_dir, name))
        rejected = posixpath.join(out_dir, "_rejected", name)
        if fs.exists(rejected):
            fs.rm(rejected)


def merge_manifest(recorded, plan, outcome: WriteOutcome) -> dict:
    """The manifest's entries after this run: what it recorded, less damaged files (unless
    re-committed), plus the shards found up to date and those committed now; pruned to the
    shards listed when this run may delete."""
    entries = dict(recorded.entries)
    for rel in plan.damaged:
        entries.pop(rel, None)
    entries.update(plan.done)
    for s in outcome.committed.values():
        s.pop("deleted_ids", None)  # the deletions file has them (record_outputs), not the manifest
        entries[s["rel"]] = s
    if plan.prunes:
        current = {s.rel for s in plan.shards}
        entries = {k: v for k, v in entries.items() if k in current}
    return entries


def record_outputs(cfg: PipelineConfig, plan, outcome: WriteOutcome, record: RunRecord) -> dict:
    """Delete the shards gone from the input, write the deletions and the merged manifest, add the
    commits to the record. Returns the manifest's entries; raises IncompleteShardError (after
    recording what was committed) when a shard was not."""
    record.check_lease()
    fs, out_dir = get_fs(plan.out_uri, cfg.output.storage)
    lost_ids = []
    for stats in outcome.committed.values():  # the ids a changed shard lost go to the deletions, the node to the report
        lost_ids += [{"id": i, "shard": stats["output"], "reason": "document removed"} for i in stats.pop("deleted_ids", None) or []]
        node = stats.pop("node", None)
        if node:
            record.shards_by_node[node] = record.shards_by_node.get(node, 0) + 1
    # what was committed goes into the record first: the report says so even if the bookkeeping below fails
    record.committed_shards = sorted(s["output"] for s in outcome.committed.values())
    try:
        deletions = deleted_shard_ids(fs, out_dir, plan.deleted) + lost_ids
        record.deletions_file = write_deletions(fs, out_dir, record.run_id, deletions)  # recorded before any file goes
        remove_deleted_shards(fs, out_dir, plan.deleted)
        recorded = load_manifest(fs, out_dir)
        entries = merge_manifest(recorded, plan, outcome)
        if entries != recorded.entries or recorded.input_uri != plan.input_root:  # a run with nothing to do rewrites nothing
            write_manifest(fs, out_dir, entries, plan.config_fingerprint, plan.input_root)
    except OSError as e:  # a full disk, a denied write: the committed vector files stand, a re-run finishes the records
        for stats in outcome.committed.values():
            record.counts.add_shard(stats)
        raise IncompleteShardError(incomplete_message(outcome, len(plan.todo), records_error=e)) from e
    record.deleted_shards = plan.deleted
    record.counts.rows_deleted = len(deletions)
    for stats in outcome.committed.values():
        record.counts.add_shard(stats)
        if stats["read_errors"]:
            logger.warning("%s: the shard could not be read to the end; see %s/_rejected/%s", stats["input"], plan.out_uri, stats["output"])
        if stats.get("rows_duplicate"):
            logger.warning("%s: %d rows repeat an earlier id of the shard (input.duplicate_ids=%s)",
                           stats["input"], stats["rows_duplicate"], cfg.input.duplicate_ids)
    commits = sorted((c["committed_at"], c["rows_in"]) for c in outcome.committed.values())
    if len(commits) >= 4:
        record.steady_rows_per_s = sum(n for _, n in commits[1:]) / max(commits[-1][0] - commits[0][0], 1e-6)
    if not outcome.complete:
        raise IncompleteShardError(incomplete_message(outcome, len(plan.todo))) from outcome.error
    return entries


def incomplete_message(outcome: WriteOutcome, planned: int, records_error: Exception | None = None) -> str:
    """What a run that did not commit every shard (or could not write the output's records) says:
    each shard, why, and what a re-run does."""
    problems = [f"{s}: {e}" for s, e in sorted(outcome.failed.items())]
    problems += [
        f"{s}: {p['rows_staged']} of {p['rows_expected'] or '?'} records staged when the run stopped; not committed, re-run to retry it"
        for s, p in sorted(outcome.pending.items())
    ]
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    cause = f"\n  the run stopped early: {outcome.error}" if outcome.error is not None else ""
    if records_error is not None:
        cause += (f"\n  the output's manifest and deletions could not be written ({type(records_error).__name__}: {records_error}); "
                  "the committed vector files stand, and a re-run records them from their footers")
    return redact_text(
        f"{len(outcome.committed)} of {planned} shards committed (kept: a re-run skips them); "
        f"{len(outcome.failed) + len(outcome.pending)} not committed" + cause + "".join(f"\n  {p}" for p in shown)
    )

