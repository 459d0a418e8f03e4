"""Ray Data adapters for the readers and writers: a Datasource whose read tasks each read a group
of shards, and a Datasink that commits each shard as soon as all its rows have arrived.
`operators.execution` is what uses them.

At corpus scale (10^4-10^5 shards) nothing here may cost more per shard as the corpus grows: each
read task carries its own group of shards and nothing else; each shard's commit record (what the
commit needs of the plan) travels to the writer on the shard's end-of-shard row, so the sink
carries no plan; small shards are packed into shared blocks.

A write task that holds a shard whole (its eof row and every record 1..N, the usual case for
shards under a block) commits it from memory. Rows of a larger shard can reach the sink through
several write tasks (Ray Data re-batches between operators): those are staged as parts, and a
small coordinator actor counts the rows staged per shard; the write task whose part completes a
shard commits it. Either way a shard is claimed from the coordinator once, in one call per write
task, so it is committed exactly once. Shards land progressively during a run, and a run killed
mid-way keeps every shard it had committed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import posixpath
import uuid
from typing import Iterable

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask

from operators.config.schema import InputConfig, StorageConfig
from operators.config.secrets import redact_text
from operators.io.incremental import PreviousShard, mark_reuse
from operators.io.manifest import read_provenance
from operators.io.readers import READ_SCHEMA, read_shard
from operators.io.storage import file_fingerprint, get_fs
from operators.io.writers import (
    DuplicateIdError,
    Part,
    RunStopped,
    ShardStats,
    WriteOutcome,
    commit_rows,
    commit_shard,
    stage_part,
    whole_shard,
)

logger = logging.getLogger("corpus_embed")


class ShardDatasource(Datasource):
    """One read task per group of shards (planning.ReadUnit lists); each yields TRACKED_SCHEMA
    blocks of about input.rows_per_block rows, small shards packed together, each shard ending
    with its eof row."""

    def __init__(self, groups: list, cfg: InputConfig, output_storage: StorageConfig | None = None):
        super().__init__()
        self.groups = groups
        self.cfg = cfg
        self.output_storage = output_storage or StorageConfig()

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(int(u.shard.fingerprint.get("size", 0)) for g in self.groups for u in g)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        for group in self.groups:
            meta = BlockMetadata(
                num_rows=None,
                size_bytes=sum(int(u.shard.fingerprint.get("size", 0)) for u in group) or None,
                exec_stats=None,
                input_files=None,  # per-file lists would make Ray Data's stats grow with the corpus
            )
            # a module function over this group alone: a closure over `self` would ship every shard with every task
            tasks.append(ReadTask(functools.partial(read_group, group, self.cfg, self.output_storage), meta, schema=TRACKED_SCHEMA))
        return tasks


def read_group(group: list, cfg: InputConfig, output_storage: StorageConfig):
    """Read a group's shards in order; changed shards get their reuse marks. Shards that fit in
    one block are packed together into blocks of up to cfg.rows_per_block rows, so each reaches a
    write task whole; a larger shard keeps its own blocks."""
    packed, rows = [], 0
    for unit in group:
        previous = PreviousShard.open(*get_fs(unit.previous, output_storage), index_only=True) if unit.previous else None
        blocks = (mark_reuse(b, previous) for b in read_shard(unit.shard, cfg, unit.seed()))
        first = next(blocks)
        small = bool(first.column("eof")[first.num_rows - 1].as_py())  # its eof row came with its first block
        if packed and (not small or rows + first.num_rows > cfg.rows_per_block):
            yield pa.concat_tables(packed).combine_chunks()  # one chunk: Ray serializes a table chunk by chunk
            packed, rows = [], 0
        if small:
            packed.append(first)
            rows += first.num_rows
        else:
            yield first
            yield from blocks
    if packed:
        yield pa.concat_tables(packed).combine_chunks()


TRACKED_SCHEMA = READ_SCHEMA.append(pa.field("content_hash", pa.string())).append(pa.field("reuse", pa.bool_()))


@ray.remote(num_cpus=0, max_restarts=0)
class CommitCoordinator:
    """Hands each shard to exactly one committer: a write task that holds it whole claims it; the
    staged parts of a larger shard are counted until they complete it. One `settle` and one
    `record` call per write task, whatever the number of shards in it.

    Start it with `start_coordinator`, on the driver's node: it then fails only with the driver.
    It holds the parts of shards in flight and a few bytes per committed shard (its commit record,
    as JSON); its state is a convenience, not the record: each commit's counts are also in the
    vector file's footer, from which a driver that lost the coordinator rebuilds what was committed."""

    def __init__(self):
        self.parts: dict[str, list[Part]] = {}  # shards in flight only
        self.rows: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.claimed: set[str] = set()
        self.committed: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def settle(self, whole: list[str], staged: list[tuple[str, Part]]) -> tuple[list[str], list[tuple[str, list[Part]]]]:
        """The shards of `whole` this caller commits (not claimed before), and for each staged part
        that completes its shard, that shard's parts (the caller commits those too). A part whose
        eof row says the reader failed fails the shard."""
        mine = [s for s in whole if s not in self.claimed and s not in self.failed]
        for shard in mine:
            self._claim(shard)
        complete = []
        for shard, part in staged:
            if part.failure is not None and shard not in self.claimed:
                self.failed[shard] = part.failure
                self._drop(shard)
            if shard in self.failed or shard in self.claimed:
                continue
            self.parts.setdefault(shard, []).append(part)
            self.rows[shard] = self.rows.get(shard, 0) + part.rows
            if part.eof_total is not None:
                self.total[shard] = part.eof_total
            if shard in self.total and self.rows[shard] >= self.total[shard]:
                complete.append((shard, self._claim(shard)))
        return mine, complete

    def _claim(self, shard: str) -> list[Part]:
        self.claimed.add(shard)
        return self._drop(shard)

    def _drop(self, shard: str) -> list[Part]:
        self.rows.pop(shard, None)
        self.total.pop(shard, None)
        return self.parts.pop(shard, [])

    def record(self, committed: dict[str, str], failed: dict[str, str]) -> None:
        self.committed.update(committed)
        self.failed.update(failed)

    def state(self) -> dict:
        return {
            "committed": self.committed,
            "failed": self.failed,
            "pending": {s: {"rows_staged": self.rows[s], "rows_expected": self.total.get(s)} for s in self.parts},
        }


def start_coordinator():
    """A CommitCoordinator pinned to this (the driver's) node: a worker node that dies takes no
    run's bookkeeping with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return CommitCoordinator.options(
        name=f"corpus-embed-coordinator-{uuid.uuid4().hex[:12]}",  # findable by operators (and the chaos tests)
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote()


class ShardedParquetSink(Datasink[int]):
    """Commits the shards a write task holds whole, stages the rest under `_staging/<run_id>/`
    and commits those whose parts complete them.

    Its hooks keep the run's bookkeeping, on the driver: on_write_start clears the parts of dead
    runs (the caller holds the output's lease), on_write_complete and on_write_failed take the
    coordinator's final state into `outcome` and end the coordinator (a lost coordinator leaves
    `outcome` None and `stopped` set: the caller rebuilds what was committed from the footers,
    `committed_from_footers`); a clean run removes its staging folder."""

    def __init__(
        self,
        coordinator,
        output_uri: str,
        storage: StorageConfig,
        staging_dir: str,
        dimension: int,
        value_type: pa.DataType,
        provenance: dict,
        duplicate_ids: str = "reject",
    ):
        self.duplicate_ids = duplicate_ids
        self.coordinator = coordinator
        self.output_uri = output_uri
        self.storage = storage
        self.staging_dir = staging_dir
        self.dimension = dimension
        self.value_type = value_type
        self.provenance = provenance
        self.outcome: WriteOutcome | None = None  # set on the driver by the completion hooks
        self.stopped: RunStopped | None = None  # why the write stopped, when the coordinator was lost with it

    def get_name(self) -> str:
        return "WriteVectorShards"

    @property
    def staging_root(self) -> str:
        return posixpath.dirname(self.staging_dir.rstrip("/"))

    def on_write_start(self, schema=None) -> None:
        fs, _ = get_fs(self.output_uri, self.storage)
        if fs.exists(self.staging_root):  # a dead run's parts, never committed
            fs.rm(self.staging_root, recursive=True)

    def on_write_complete(self, write_result) -> None:
        self._collect(None)
        if self.outcome is not None and not self.outcome.failed and not self.outcome.pending:
            fs, _ = get_fs(self.output_uri, self.storage)
            if fs.exists(self.staging_root):
                fs.rm(self.staging_root, recursive=True)

    def on_write_failed(self, error: Exception) -> None:
        self._collect(RunStopped.from_error(error))

    def _collect(self, error: RunStopped | None) -> None:
        try:
            state = ray.get(self.coordinator.state.remote())
            # one parse for all: the decoder then shares the keys of every record (a third of their memory at 10^5 shards)
            committed = dict(zip(state["committed"], json.loads("[" + ",".join(state["committed"].values()) + "]")))
            self.outcome = WriteOutcome(committed, state["failed"], state["pending"], error)
        except Exception as e:  # the coordinator died with its node: the footers say what was committed
            logger.warning("the commit coordinator was lost (%s); reading what was committed from the vector files", type(e).__name__)
            self.outcome, self.stopped = None, error or RunStopped.from_error(e)
        try:
            ray.kill(self.coordinator)  # a named actor outlives its handle: end it with the run
        except Exception:
            pass

    def write(self, blocks: Iterable[Block], ctx) -> int:
        fs, out_dir = get_fs(self.output_uri, self.storage)
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return 0
        whole, staged = {}, []
        for shard, rows in shard_slices(pa.concat_tables(tables)):
            found = whole_shard(rows)
            if found is not None:
                whole[shard] = (rows.column("raw")[rows.num_rows - 1].as_py(), *found)
            else:
                key = hashlib.sha256(shard.encode()).hexdigest()[:16]
                staged.append((shard, stage_part(fs, self.staging_dir, key, rows)))
        mine, complete = ray.get(self.coordinator.settle.remote(list(whole), staged))
        jobs = [(s, whole[s][0], lambda s=s, **kw: commit_rows(tables=[whole[s][2]], expected=whole[s][1], **kw)) for s in mine]
        for shard, parts in complete:
            seed = next((p.seed for p in parts if p.eof_total is not None), None)
            jobs.append((shard, seed, lambda parts=parts, **kw: commit_shard(parts=parts, **kw)))
        done, failed = {}, {}
        node = ray.get_runtime_context().get_node_id()[:12]  # the run report counts commits per node
        for shard, seed, commit in jobs:
            if seed is None:  # rows that did not come from read_shards
                failed[shard] = "not committed: its end-of-shard row carries no commit record"
                continue
            stats = ShardStats.from_seed(seed)
            try:
                stats = commit(
                    fs=fs, output_dir=out_dir, staging_dir=self.staging_dir, stats=stats, dimension=self.dimension,
                    value_type=self.value_type, provenance=self.provenance, duplicate_ids=self.duplicate_ids,
                )
            except Exception as e:  # this shard alone fails; the run goes on and reports it
                why = str(e) if isinstance(e, DuplicateIdError) else f"commit failed: {type(e).__name__}: {e}; not committed, re-run to retry it"
                failed[shard] = redact_text(why)
                continue
            done[shard] = json.dumps(dict(stats.to_json(), node=node))
        if done or failed:
            ray.get(self.coordinator.record.remote(done, failed))
        return len(done)


def shard_slices(table: pa.Table):
    """(shard, its rows sorted by line, the eof row last) for each shard in a block: one sort, then
    zero-copy slices, so a block packed with many small shards costs no more per shard."""
    table = table.sort_by([("shard", "ascending"), ("line", "ascending"), ("eof", "ascending")])
    shards = table.column("shard").to_numpy(zero_copy_only=False)
    starts = [0, *(np.flatnonzero(shards[1:] != shards[:-1]) + 1).tolist(), len(shards)]
    for a, b in zip(starts, starts[1:]):
        yield shards[a], table.slice(a, b - a)


def committed_from_footers(fs, out_dir: str, plans: Iterable[ShardStats]) -> WriteOutcome:
    """What a run that lost its coordinator committed, from the output: each planned shard whose
    vector file's footer carries this config and this input fingerprint was committed by this run."""
    outcome = WriteOutcome()
    for plan in plans:
        path = posixpath.join(out_dir, plan.output)
        meta = read_provenance(fs, path) or {}
        if meta.get("config_fingerprint") == plan.config_fingerprint and meta.get("input", {}).get("fingerprint") == plan.input_fingerprint:
            for k, v in meta.get("counts", {}).items():
                setattr(plan, k, v)
            plan.output_fingerprint = file_fingerprint(fs.info(path))
            outcome.committed[plan.input] = plan.to_json()
        else:
            outcome.failed[plan.input] = "not committed: the run lost its commit coordinator; re-run to finish it"
    return outcome
