"""Ray Data adapters for the readers and writers: a Datasource with one read task per shard,
and a Datasink that stages parts and commits each shard as soon as all its rows have arrived.
`operators.execution` is what uses them.

Rows of one input shard can reach the sink through several write tasks (Ray Data re-batches
between operators), so a small coordinator actor counts the rows staged per shard; the write
task whose part completes a shard commits it. Shards therefore land progressively during a
run, and a run killed mid-way keeps every shard it had committed.
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask

from operators.config import InputConfig, StorageConfig
from operators.incremental import mark_reuse, previous_hashes
from operators.readers import READ_SCHEMA, read_shard
from operators.storage import Shard, file_fingerprint, get_fs, redact_text
from operators.writers import DuplicateIdError, Part, RunStopped, ShardStats, WriteOutcome, commit_shard, read_provenance, stage_part

logger = logging.getLogger("corpus_embed")


class ShardDatasource(Datasource):
    """One read task per input shard; each yields READ_SCHEMA blocks ending with an eof row."""

    def __init__(self, shards: list[Shard], cfg: InputConfig, previous: dict[str, str] | None = None, output_storage: StorageConfig | None = None):
        """previous: shard uri -> the URI of its earlier vector file (same config), whose ids and
        content hashes mark the rows to reuse rather than embed again."""
        super().__init__()
        self.shards = shards
        self.cfg = cfg
        self.previous = previous or {}
        self.output_storage = output_storage or StorageConfig()

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(int(s.fingerprint.get("size", 0)) for s in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        cfg = self.cfg
        tasks = []
        for shard in self.shards:
            meta = BlockMetadata(
                num_rows=None,
                size_bytes=int(shard.fingerprint.get("size", 0)) or None,
                exec_stats=None,
                input_files=[shard.public_uri],
            )
            prev = self.previous.get(shard.uri)
            tasks.append(ReadTask(lambda shard=shard, prev=prev: self._read(shard, cfg, prev), meta, schema=TRACKED_SCHEMA))
        return tasks

    def _read(self, shard: Shard, cfg: InputConfig, previous_uri: str | None):
        hashes = previous_hashes(*get_fs(previous_uri, self.output_storage)) if previous_uri else None
        for block in read_shard(shard, cfg):
            yield mark_reuse(block, hashes)


TRACKED_SCHEMA = READ_SCHEMA.append(pa.field("content_hash", pa.string())).append(pa.field("reuse", pa.bool_()))


@ray.remote(num_cpus=0, max_restarts=0)
class CommitCoordinator:
    """Counts staged rows per shard and hands each complete shard to exactly one committer.

    Start it with `start_coordinator`, on the driver's node: it then fails only with the driver.
    Its state is a convenience, not the record: each commit's counts are also in the vector file's
    footer, from which a driver that lost the coordinator rebuilds what was committed."""

    def __init__(self, expected: list[str]):
        self.parts: dict[str, list[Part]] = {s: [] for s in expected}
        self.rows: dict[str, int] = {s: 0 for s in expected}
        self.total: dict[str, int | None] = {s: None for s in expected}
        self.claimed: set[str] = set()
        self.committed: dict[str, dict] = {}
        self.failed: dict[str, str] = {}

    def report(self, shard: str, part: Part) -> list[Part] | None:
        """Record a staged part; return the shard's parts when it is now complete (the caller
        commits it), else None. A part whose eof row says the reader failed fails the shard."""
        if part.failure is not None:
            self.failed[shard] = part.failure
        if shard in self.failed:
            return None
        self.parts[shard].append(part)
        self.rows[shard] += part.rows
        if part.eof_total is not None:
            self.total[shard] = part.eof_total
        total = self.total[shard]
        if total is not None and self.rows[shard] >= total and shard not in self.claimed:
            self.claimed.add(shard)
            return list(self.parts[shard])
        return None

    def done(self, shard: str, stats: dict) -> None:
        self.committed[shard] = stats

    def fail(self, shard: str, error: str) -> None:
        self.failed[shard] = error

    def state(self) -> dict:
        return {
            "committed": self.committed,
            "failed": self.failed,
            "pending": {
                s: {"rows_staged": self.rows[s], "rows_expected": self.total[s]}
                for s in self.parts
                if s not in self.committed and s not in self.failed
            },
        }


def start_coordinator(expected: list[str]):
    """A CommitCoordinator pinned to this (the driver's) node: a worker node that dies takes no
    run's bookkeeping with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return CommitCoordinator.options(
        name=f"corpus-embed-coordinator-{uuid.uuid4().hex[:12]}",  # findable by operators (and the chaos tests)
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(expected)


class ShardedParquetSink(Datasink[list]):
    """Stages each block's rows per shard under `_staging/<run_id>/` and commits complete shards.

    Its hooks keep the run's bookkeeping, on the driver: on_write_start clears the parts of dead
    runs (the caller holds the output's lease), on_write_complete and on_write_failed take the
    coordinator's final state into `outcome` (or rebuild it from the vector files' footers when
    the coordinator was lost) and end the coordinator; a clean run removes its staging folder."""

    def __init__(
        self,
        coordinator,
        output_uri: str,
        storage: StorageConfig,
        staging_dir: str,
        plans: dict[str, ShardStats],
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
        self.plans = plans
        self.dimension = dimension
        self.value_type = value_type
        self.provenance = provenance
        self.outcome: WriteOutcome | None = None  # set on the driver by the completion hooks

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
        self.outcome = self._collect(None)
        if not self.outcome.failed and not self.outcome.pending:
            fs, _ = get_fs(self.output_uri, self.storage)
            if fs.exists(self.staging_root):
                fs.rm(self.staging_root, recursive=True)

    def on_write_failed(self, error: Exception) -> None:
        self.outcome = self._collect(RunStopped.from_error(error))

    def _collect(self, error: RunStopped | None) -> WriteOutcome:
        try:
            state = ray.get(self.coordinator.state.remote())
            outcome = WriteOutcome(state["committed"], state["failed"], state["pending"], error)
        except Exception as e:  # the coordinator died with its node: the footers say what was committed
            logger.warning("the commit coordinator was lost (%s); reading what was committed from the vector files", type(e).__name__)
            outcome = self.committed_from_footers()
            outcome.error = error or RunStopped.from_error(e)
        try:
            ray.kill(self.coordinator)  # a named actor outlives its handle: end it with the run
        except Exception:
            pass
        return outcome

    def committed_from_footers(self) -> WriteOutcome:
        """The coordinator's state rebuilt from the output: each planned shard whose vector file's
        footer carries this config and this input fingerprint was committed by this run."""
        fs, out_dir = get_fs(self.output_uri, self.storage)
        outcome = WriteOutcome()
        for shard, plan in self.plans.items():
            path = posixpath.join(out_dir, plan.output)
            meta = read_provenance(fs, path) or {}
            if meta.get("config_fingerprint") == plan.config_fingerprint and meta.get("input", {}).get("fingerprint") == plan.input_fingerprint:
                stats = ShardStats(**plan.to_json())
                for k, v in meta.get("counts", {}).items():
                    setattr(stats, k, v)
                stats.output_fingerprint = file_fingerprint(fs.info(path))
                outcome.committed[shard] = stats.to_json()
            else:
                outcome.failed[shard] = "not committed: the run lost its commit coordinator; re-run to finish it"
        return outcome

    def write(self, blocks: Iterable[Block], ctx) -> list:
        fs, out_dir = get_fs(self.output_uri, self.storage)
        committed = []
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            shard_col = table.column("shard")
            for shard in pc.unique(shard_col).to_pylist():
                plan = self.plans[shard]
                rows = table.filter(pc.equal(shard_col, shard))
                part = stage_part(fs, self.staging_dir, plan.output.removesuffix(".parquet"), rows)
                parts = ray.get(self.coordinator.report.remote(shard, part))
                if parts is None:
                    continue
                try:
                    stats = commit_shard(
                        fs, out_dir, self.staging_dir, ShardStats(**plan.to_json()), parts,
                        self.dimension, self.value_type, self.provenance, self.duplicate_ids,
                    )
                except Exception as e:  # this shard alone fails; the run goes on and reports it
                    why = str(e) if isinstance(e, DuplicateIdError) else (
                        f"commit failed: {type(e).__name__}: {e}; not committed, re-run to retry it"
                    )
                    ray.get(self.coordinator.fail.remote(shard, redact_text(why)))
                    continue
                ray.get(self.coordinator.done.remote(shard, stats.to_json()))
                committed.append(stats.to_json())
        return committed
