"""The vector sink's Datasink hooks, on a real local Ray without a dataset: on_write_start clears
dead runs' parts, on_write_complete takes the coordinator's state and removes the staging folder,
on_write_failed with a lost coordinator leaves what was committed to the vector files' footers."""

from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pytest

from operators.config.loading import load_config
from operators.config.schema import StorageConfig
from operators.execution.ray_io import ShardedParquetSink, committed_from_footers, start_coordinator
from operators.io.storage import get_fs
from operators.io.writers import RunStopped
from operators.model.prepare import prepare
from operators.run.planning import plan_run
from tests.helpers import commit_in_process, make_corpus


@pytest.fixture
def planned(tmp_path):
    folder = make_corpus(tmp_path / "in", shards=2, rows=6)
    cfg = load_config(None, [f"input.uri={folder}", f"output.uri={tmp_path / 'out'}"])
    prepared = prepare(cfg)
    return cfg, prepared, plan_run(cfg, prepared)


def sink_for(prepared, out, coordinator):
    staging = posixpath.join(str(out), "_staging", "this-run")
    return ShardedParquetSink(coordinator, str(out), StorageConfig(), staging, prepared.dimension, pa.float32(), prepared.provenance)


def test_start_clears_dead_parts_and_complete_takes_the_state(ray_local, tmp_path, planned):
    cfg, prepared, plan = planned
    dead = tmp_path / "out" / "_staging" / "dead-run" / "parts" / "x.parquet"
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"a dead run's part")
    sink = sink_for(prepared, tmp_path / "out", start_coordinator())
    sink.on_write_start()
    assert not (tmp_path / "out" / "_staging").exists()
    sink.on_write_complete(None)
    assert sink.outcome.error is None and not sink.outcome.committed and not sink.outcome.pending


def test_a_lost_coordinator_is_rebuilt_from_the_footers(ray_local, tmp_path, planned):
    import ray

    cfg, prepared, plan = planned
    first = plan.todo[0]
    one = type(plan)(**{**plan.__dict__, "todo": [first]})
    commit_in_process(cfg, prepared, one)  # this shard was committed before the coordinator died
    coordinator = start_coordinator()
    sink = sink_for(prepared, tmp_path / "out", coordinator)
    ray.kill(coordinator)
    sink.on_write_failed(RuntimeError("ActorDiedError: the coordinator died\n  traceback..."))
    assert sink.outcome is None
    assert isinstance(sink.stopped, RunStopped) and str(sink.stopped) == "RuntimeError: ActorDiedError: the coordinator died"
    fs, out_dir = get_fs(plan.out_uri, StorageConfig())
    out = committed_from_footers(fs, out_dir, (plan.stats_for(s) for s in plan.todo))
    assert list(out.committed) == [first.public_uri] and out.committed[first.public_uri]["rows_in"] == 6
    assert "lost its commit coordinator" in out.failed[plan.todo[1].public_uri]


# -- corpus scale: what a read task and the sink carry, and how shards reach a commit -----------


def test_a_read_task_carries_its_own_shards_only(tmp_path, planned):
    """The pickled read task of one shard is the same size whether the corpus has 3 shards or
    3,000: the task closes over its group, not the datasource (or the plan) with every shard."""
    import cloudpickle

    from operators.execution.ray_io import ShardDatasource
    from operators.io.storage import Shard

    cfg, prepared, plan = planned

    def one_task_bytes(n):
        shards = [Shard(f"/data/part-{i:05d}.jsonl", f"part-{i:05d}.jsonl", "jsonl", None, {"size": 100, "mtime": 1.0}) for i in range(n)]
        p = type(plan)(**{**plan.__dict__, "shards": shards, "todo": shards})
        tasks = ShardDatasource(p.read_groups(min_groups=n), cfg.input).get_read_tasks(n)
        assert len(tasks) == n
        return len(cloudpickle.dumps(tasks[0]))

    assert one_task_bytes(3000) <= 1.05 * one_task_bytes(3)
    sink = sink_for(prepared, tmp_path / "out", None)
    assert len(cloudpickle.dumps(sink)) < 20_000  # no per-shard plan in the sink


def test_small_shards_are_packed_whole_and_large_ones_keep_their_blocks(tmp_path):
    from operators.execution.ray_io import read_group
    from operators.io.storage import list_shards
    from operators.run.planning import Plan

    folder = tmp_path / "in"
    make_corpus(folder, shards=6, rows=3)
    make_corpus(tmp_path / "big", shards=1, rows=25)
    (tmp_path / "big" / "part-00.jsonl").rename(folder / "part-03-big.jsonl")
    cfg = load_config(None, [f"input.uri={folder}", "input.rows_per_block=10"])
    shards = list_shards(str(folder), "auto", cfg.input.storage)
    plan = Plan(shards, shards, {}, "fp", str(tmp_path / "out"))
    [group] = plan.read_groups()
    blocks = list(read_group(group, cfg.input, StorageConfig()))
    by_block = [sorted(set(b.column("shard").to_pylist())) for b in blocks]
    big = next(s.public_uri for s in shards if "big" in s.rel)
    # small shards (3 records + eof) packed up to 10 rows; the big one (25 records) alone in its own 3 blocks
    assert [len(s) for s in by_block] == [2, 1, 1, 1, 1, 2, 1]
    assert [s == [big] for s in by_block] == [False, False, True, True, True, False, False]
    assert all(b.num_rows <= 10 for b in blocks)
    for block in blocks:  # every small shard is whole in one block, its eof row carrying its commit record
        assert block.column("content_hash").null_count == int(sum(block.column("eof").to_pylist()))
    eofs = [r for b in blocks for r in b.to_pylist() if r["eof"]]
    assert sorted(r["shard"] for r in eofs) == sorted(s.public_uri for s in shards)
    assert all(json.loads(r["raw"])["input"] == r["shard"] and json.loads(r["raw"])["output"] for r in eofs)


def test_the_sink_commits_whole_and_split_shards_exactly_once(ray_local, tmp_path, planned):
    """A write task that holds shards whole commits them from memory; a shard split over two write
    tasks is staged and committed by the one that completes it; the same rows again (a retried
    task) commit nothing twice."""
    from operators.io.readers import read_shard
    from operators.model.vectors import NoopEmbedder

    cfg, prepared, plan = planned
    model = NoopEmbedder(prepared.spec())
    a, b = plan.todo
    block_a = model(mark(read_shard(a, cfg.input, plan.stats_for(a).seed())))
    block_b = model(mark(read_shard(b, cfg.input, plan.stats_for(b).seed())))
    sink = sink_for(prepared, tmp_path / "out", start_coordinator())
    sink.on_write_start()
    parts = tmp_path / "out" / "_staging" / "this-run" / "parts"
    assert sink.write([block_a], None) == 1  # whole: committed from memory, nothing staged
    assert not parts.exists()
    assert sink.write([block_b.slice(0, 4)], None) == 0  # the first 4 records of b: staged
    assert len(list(parts.rglob("*.parquet"))) == 1
    assert sink.write([block_b.slice(4)], None) == 1  # the rest and its eof: b complete
    assert sink.write([block_a], None) == 0  # a retried task's copy: already claimed
    sink.on_write_complete(None)
    out = sink.outcome
    assert out.complete and sorted(out.committed) == sorted([a.public_uri, b.public_uri])
    assert all(c["rows_written"] == 6 and c["rows_in"] == 6 for c in out.committed.values())
    import pyarrow.parquet as pq

    for s in (a, b):
        assert pq.read_table(tmp_path / "out" / s.output_name).column("id").to_pylist() == [f"s{int(s.rel[5:7])}-{i}" for i in range(6)]
    assert not (tmp_path / "out" / "_staging").exists()  # a clean run leaves no staging folder


def mark(blocks):
    import pyarrow as pa

    from operators.io.incremental import mark_reuse

    return pa.concat_tables([mark_reuse(b, None) for b in blocks])
