"""The vector sink's Datasink hooks, on a real local Ray without a dataset: on_write_start clears
dead runs' parts, on_write_complete takes the coordinator's state and removes the staging folder,
on_write_failed with a lost coordinator rebuilds what was committed from the vector files' footers."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pytest

from operators.config import StorageConfig, load_config
from operators.planning import plan_run
from operators.prepare import prepare
from operators.ray_io import ShardedParquetSink, start_coordinator
from operators.writers import RunStopped
from tests.helpers import commit_in_process, make_corpus


@pytest.fixture
def planned(tmp_path):
    folder = make_corpus(tmp_path / "in", shards=2, rows=6)
    cfg = load_config(None, [f"input.uri={folder}", f"output.uri={tmp_path / 'out'}"])
    prepared = prepare(cfg)
    return cfg, prepared, plan_run(cfg, prepared)


def sink_for(plan, prepared, out, coordinator):
    plans = {s.public_uri: plan.stats_for(s) for s in plan.todo}
    staging = posixpath.join(str(out), "_staging", "this-run")
    return ShardedParquetSink(coordinator, str(out), StorageConfig(), staging, plans, prepared.dimension, pa.float32(), prepared.provenance)


def test_start_clears_dead_parts_and_complete_takes_the_state(ray_local, tmp_path, planned):
    cfg, prepared, plan = planned
    dead = tmp_path / "out" / "_staging" / "dead-run" / "parts" / "x.parquet"
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"a dead run's part")
    sink = sink_for(plan, prepared, tmp_path / "out", start_coordinator([s.public_uri for s in plan.todo]))
    sink.on_write_start()
    assert not (tmp_path / "out" / "_staging").exists()
    sink.on_write_complete(None)
    assert sink.outcome.error is None and sorted(sink.outcome.pending) == sorted(s.public_uri for s in plan.todo)
    assert not sink.outcome.complete  # nothing was written: every shard still pending


def test_a_lost_coordinator_is_rebuilt_from_the_footers(ray_local, tmp_path, planned):
    import ray

    cfg, prepared, plan = planned
    first = plan.todo[0]
    one = type(plan)(**{**plan.__dict__, "todo": [first]})
    commit_in_process(cfg, prepared, one)  # this shard was committed before the coordinator died
    coordinator = start_coordinator([s.public_uri for s in plan.todo])
    sink = sink_for(plan, prepared, tmp_path / "out", coordinator)
    ray.kill(coordinator)
    sink.on_write_failed(RuntimeError("ActorDiedError: the coordinator died\n  traceback..."))
    out = sink.outcome
    assert list(out.committed) == [first.public_uri] and out.committed[first.public_uri]["rows_in"] == 6
    assert "lost its commit coordinator" in out.failed[plan.todo[1].public_uri]
    assert isinstance(out.error, RunStopped) and str(out.error) == "RuntimeError: ActorDiedError: the coordinator died"
