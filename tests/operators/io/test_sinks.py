"""The sink contract on the real stores (LanceDB, Qdrant's local mode, Milvus Lite), without Ray: every sync
leaves each store holding exactly the published Parquet's rows and vectors (edits, deletions, a
deleted shard, an id in two shards), whatever failed before; a store of another dimension is
refused before any write; ANN recall of LanceDB's indexes against exact search."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.parquet as pq
import pytest

from operators.config.schema import LanceDBSinkConfig, MilvusSinkConfig, QdrantSinkConfig
from operators.io.manifest import write_manifest
from operators.io.sinks import SinkError, read_state, sync_sink
from operators.io.storage import file_fingerprint
from operators.io.stores import open_store, point_id
from operators.io.writers import vector_schema
from tests.helpers import refuse_after

lancedb = pytest.importorskip("lancedb")
DIM = 64


def clustered_vectors(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 40 centres: the shape real sentence embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIM))
    x = centres[rng.integers(0, 40, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shard(folder, name, ids, vecs):
    t = pa.table(
        {"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), DIM), "content_hash": [None] * len(ids)},
        schema=vector_schema(DIM, pa.float32()),
    )
    pq.write_table(t, folder / name)
    return name


def publish(folder, shards: dict) -> dict:
    """An output folder as the writers leave it: each shard's vector file and a manifest entry
    carrying the file's fingerprint; shards not named are removed. Returns what the Parquet holds."""
    fs = fsspec.filesystem("file")
    for old in folder.glob("*.parquet"):
        if old.name not in shards:
            old.unlink()
    entries = {}
    for name, (ids, vecs) in shards.items():
        path = folder / name
        same = path.exists() and pq.read_table(path).column("id").to_pylist() == list(ids) and np.array_equal(
            np.stack(pq.read_table(path).column("embedding").to_numpy(zero_copy_only=False)), vecs)
        if not same:  # as the writers do: an unchanged shard's file is left alone
            write_shard(folder, name, ids, vecs)
        entries[name] = {"rel": name, "output": name, "input_fingerprint": {}, "config_fingerprint": FP,
                         "output_fingerprint": file_fingerprint(fs.info(str(folder / name)))}
    write_manifest(fs, str(folder), entries, FP)
    return {(name, i): v for name, (ids, vecs) in shards.items() for i, v in zip(ids, vecs)}


FP = "fp-test"


def sink_of(kind, tmp_path, **kw):
    if kind == "lancedb":
        return LanceDBSinkConfig(uri=str(tmp_path / "db"), table="t", **kw)
    if kind == "milvus":
        return MilvusSinkConfig(uri=str(tmp_path / "milvus.db"), collection="t", **kw)
    return QdrantSinkConfig(path=str(tmp_path / "qdrant"), collection="t", **kw)


def store_rows(sink):
    store = open_store(sink)
    try:
        return store.rows()
    finally:
        getattr(store, "close", lambda: None)()


def assert_store_equals(sink, want: dict):
    got = store_rows(sink)
    assert set(got) == set(want)
    for key, vec in want.items():
        np.testing.assert_allclose(got[key], vec, atol=1e-6, err_msg=str(key))


def recall_at_10(table, matrix, index_of, queries, nprobes):
    recalls = []
    for q in queries:
        exact = set(np.argsort(-(matrix @ q))[:10])
        hits = table.search(q).metric("cosine").nprobes(nprobes).refine_factor(50).limit(10).to_arrow()
        recalls.append(len(exact & {index_of[i] for i in hits.column("id").to_pylist()}) / 10)
    return float(np.mean(recalls))


INDEX_TYPES = {"ivf_pq": "IvfPq", "ivf_flat": "IvfFlat", "ivf_hnsw_sq": "IvfHnswSq", "ivf_hnsw_pq": "IvfHnswPq"}


@pytest.mark.parametrize("kind", list(INDEX_TYPES))
def test_ann_index_recall_at_10_against_exact_search(tmp_path, kind):
    n = 4000
    vecs = clustered_vectors(n)
    ids = [f"d{i}" for i in range(n)]
    out = tmp_path / "out"
    out.mkdir()
    cfg = LanceDBSinkConfig(
        uri=str(tmp_path / "db"), table="t",
        index={"type": kind, "metric": "cosine", "num_partitions": 16, "num_sub_vectors": 16, "min_rows": 1000},
    )
    publish(out, {f"part-{k}.parquet": (ids[k::4], vecs[k::4]) for k in range(4)})
    stats = sync_sink(cfg, fsspec.filesystem("file"), str(out), str(out), FP, DIM)
    assert stats["rows"] == n and stats["index"] == kind
    table = lancedb.connect(cfg.uri).open_table("t")
    (index,) = [i for i in table.list_indices() if i.columns == ["vector"]]
    assert index.index_type == INDEX_TYPES[kind] and index.num_indexed_rows == n
    assert index.index_details["metric_type"] == "COSINE"
    if kind.endswith("pq"):
        assert index.index_details["compression"]["num_sub_vectors"] == 16
    stored = table.to_arrow()
    index_of = {i: k for k, i in enumerate(stored.column("id").to_pylist())}
    matrix = np.stack(stored.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    queries = clustered_vectors(50, seed=1)
    # the search goes through the IVF partitions of the index, not a flat scan
    assert "ANNIvfPartition" in table.search(queries[0]).metric("cosine").nprobes(8).limit(10).explain_plan(True)
    # every partition probed, candidates re-ranked exactly: the index must hold every vector under its id
    assert recall_at_10(table, matrix, index_of, queries, nprobes=16) >= 0.99
    # half the partitions: LanceDB trains IVF with random k-means (no seed exposed), so this varies by
    # build: 0.89-0.99 for ivf_pq over 20+ builds; ids or partitions scrambled give far less
    partial = recall_at_10(table, matrix, index_of, queries, nprobes=8)
    print(f"{kind} recall@10 at 8 of 16 partitions {partial:.3f}")
    assert partial >= 0.8, partial


KINDS = ["lancedb", "qdrant", "milvus"]


@pytest.mark.parametrize("kind", KINDS)
def test_nightly_syncs_keep_the_store_equal_to_the_parquet(tmp_path, kind, monkeypatch):
    """Two nights: edited rows, deleted ids, a new shard with an id another shard holds, a deleted
    shard; after each sync the store holds exactly the Parquet's rows and vectors, a search returns
    the Parquet's nearest neighbours, and a night with no change writes nothing."""
    fs = fsspec.filesystem("file")
    out = tmp_path / "out"
    out.mkdir()
    vecs = clustered_vectors(300)
    ids = [f"d{i}" for i in range(300)]
    sink = sink_of(kind, tmp_path, batch_rows=64)
    want = publish(out, {"a.parquet": (ids[:200], vecs[:200]), "b.parquet": (ids[200:], vecs[200:])})
    stats = sync_sink(sink, fs, str(out), str(out), FP, DIM)
    assert stats["mode"] == "created" and stats["rows_upserted"] == 300 and stats["rows"] == 300
    assert_store_equals(sink, want)
    changed = vecs[:200].copy()
    changed[10:20] = clustered_vectors(10, seed=7)
    other = clustered_vectors(1, seed=9)
    want = publish(out, {"a.parquet": (ids[5:200], changed[5:200]), "b.parquet": (ids[200:], vecs[200:]),
                         "c.parquet": (["d250"], other)})
    stats = sync_sink(sink, fs, str(out), str(out), FP, DIM)
    assert (stats["mode"], stats["shards_upserted"], stats["rows_deleted"]) == ("incremental", 2, 5)
    assert_store_equals(sink, want)  # d250 twice: b's vector and c's, as the Parquet holds them
    want = publish(out, {"a.parquet": (ids[5:200], changed[5:200]), "c.parquet": (["d250"], other)})
    stats = sync_sink(sink, fs, str(out), str(out), FP, DIM)
    assert (stats["shards_deleted"], stats["rows_deleted"], stats["rows"]) == (1, 100, 196)
    assert_store_equals(sink, want)
    with monkeypatch.context() as m:  # a night with no change reads the manifest and the record, never the store
        m.setattr("operators.io.stores.open_store", lambda *a: pytest.fail("the store was opened"))
        quiet = sync_sink(sink, fs, str(out), str(out), FP, DIM)
    assert (quiet["mode"], quiet["shards_upserted"], quiet["shards_deleted"], quiet["rows_upserted"], quiet["rows"]) == \
        ("unchanged", 0, 0, 0, 196)
    store = open_store(sink)
    try:
        matrix = np.stack(list(want.values()))
        keys = list(want)
        for q in clustered_vectors(5, seed=3):
            exact = [keys[i][1] for i in np.argsort(-(matrix @ q))[:5]]
            assert store.search(q, 5) == exact  # exact search: the Parquet's nearest neighbours, in order
    finally:
        getattr(store, "close", lambda: None)()


NIGHTS = {  # the night before, the night the store refuses a write after the first batch of shard a or b
    "a changed shard half rewritten": (lambda ids, v: {"a.parquet": (ids[:100], v[:100]), "b.parquet": (ids[100:], v[100:])},
                                       lambda ids, v: {"a.parquet": (ids[10:100], clustered_vectors(90, seed=4)),
                                                       "b.parquet": (ids[100:], v[100:])}),
    "a new shard half written": (lambda ids, v: {"a.parquet": (ids[:100], v[:100])},
                                 lambda ids, v: {"a.parquet": (ids[:100], v[:100]), "b.parquet": (ids[100:], v[100:])}),
}


@pytest.mark.parametrize("night", list(NIGHTS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_sync_that_fails_midway_is_finished_by_the_next(tmp_path, kind, night, monkeypatch):
    """The store refuses a write after a shard's first batch: the sync fails, its record does not
    take the shard for synced, and the next sync brings the store to exactly the Parquet's rows,
    each once (a new shard's first batch is found, not taken for empty and appended again)."""
    from operators.io.stores import LanceStore, MilvusStore, QdrantStore

    fs = fsspec.filesystem("file")
    out = tmp_path / "out"
    out.mkdir()
    vecs = clustered_vectors(200)
    ids = [f"d{i}" for i in range(200)]
    before, after = NIGHTS[night]
    sink = sink_of(kind, tmp_path, batch_rows=50, retries=0)
    publish(out, before(ids, vecs))
    sync_sink(sink, fs, str(out), str(out), FP, DIM)
    want = publish(out, after(ids, vecs))
    cls = {"lancedb": LanceStore, "qdrant": QdrantStore, "milvus": MilvusStore}[kind]
    refuse_after(monkeypatch, cls, "upsert", 1, PermissionError("the store refused the write"))
    with pytest.raises(PermissionError):
        sync_sink(sink, fs, str(out), str(out), FP, DIM)
    monkeypatch.undo()
    refused = "a.parquet" if "changed" in night else "b.parquet"
    assert read_state(fs, str(out), sink.label)["shards"].get(refused) != json_mark(fs, out, refused)
    assert sync_sink(sink, fs, str(out), str(out), FP, DIM)["rows"] == len(want)
    assert_store_equals(sink, want)


def json_mark(fs, out, name):
    import json

    return json.dumps(file_fingerprint(fs.info(str(out / name))), sort_keys=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_foreign_store_of_another_dimension_is_refused_before_any_write(tmp_path, kind):
    fs = fsspec.filesystem("file")
    out = tmp_path / "out"
    out.mkdir()
    publish(out, {"a.parquet": (["x", "y"], clustered_vectors(2))})
    sink = sink_of(kind, tmp_path)
    store = open_store(sink)
    store.create(DIM * 2)  # someone else's table or collection
    store.upsert("s", ["z"], np.ones((1, DIM * 2), np.float32), [""], "another-config")
    getattr(store, "close", lambda: None)()
    with pytest.raises(SinkError, match=r"holds 128-dimensional vectors of config another-config.*nothing was written"):
        sync_sink(sink, fs, str(out), str(out), FP, DIM)
    assert set(store_rows(sink)) == {("s", "z")}


def test_point_ids_are_deterministic_per_shard_and_id():
    assert point_id("a.parquet", "d1") == point_id("a.parquet", "d1") != point_id("b.parquet", "d1")


def test_transient_errors_are_retried_and_refusals_are_not():
    from operators.io.sinks import retrying

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("dropped")
        return "ok"

    assert retrying(flaky, retries=2, what="t") == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionResetError):
        retrying(flaky, retries=1, what="t")  # the bound: two tries, both dropped
    assert len(calls) == 2

    def refusing():
        calls.append(1)
        raise PermissionError("refused")

    calls.clear()
    with pytest.raises(PermissionError):
        retrying(refusing, retries=3, what="t")
    assert len(calls) == 1  # a refusal is not retried


def test_a_milvus_collection_of_another_layout_is_refused_before_any_write(tmp_path):
    """A collection someone else made in the same Milvus Lite file (no corpus-embed fields)."""
    from pymilvus import DataType, MilvusClient

    fs = fsspec.filesystem("file")
    out = tmp_path / "out"
    out.mkdir()
    publish(out, {"a.parquet": (["x"], clustered_vectors(1))})
    sink = sink_of("milvus", tmp_path)
    client = MilvusClient(sink.uri)
    schema = MilvusClient.create_schema(auto_id=True)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="FLAT", metric_type="COSINE")
    client.create_collection("t", schema=schema, index_params=index)
    client.insert("t", [{"vector": [0.1] * DIM}])
    client.close()
    with pytest.raises(SinkError, match=r"holds 64-dimensional vectors of config another layout .*nothing was written"):
        sync_sink(sink, fs, str(out), str(out), FP, DIM)
    client = MilvusClient(sink.uri)
    assert client.query("t", filter="", output_fields=["count(*)"])[0]["count(*)"] == 1
    client.close()


def test_a_milvus_server_that_is_down_is_a_transient_error():
    """pymilvus' own error for a server it cannot reach is retried; its refusal of a bad request is not."""
    import socket

    from pymilvus.exceptions import MilvusException

    from operators.io.sinks import is_transient
    from operators.io.stores import MilvusStore

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MilvusException) as down:
        MilvusStore(MilvusSinkConfig(uri=f"http://127.0.0.1:{port}", timeout=2))
    assert is_transient(down.value)
    assert not is_transient(MilvusException(code=1100, message="invalid parameter"))


def test_sink_configs_are_checked_before_any_work():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="Milvus Lite file ending .db"):
        MilvusSinkConfig(uri="/data/milvus")
    with pytest.raises(ValidationError, match="exactly one of url"):
        QdrantSinkConfig()
    assert MilvusSinkConfig(uri="https://in01.example.zillizcloud.com", token="db_admin:pw").lite is False


def test_milvus_reads_a_shard_larger_than_one_query_page(tmp_path, monkeypatch):
    """Past Milvus' 16,384-row query limit the store pages with the query iterator (here a page of 128)."""
    from operators.io.stores import MilvusStore

    monkeypatch.setattr(MilvusStore, "PAGE", 128)
    store = open_store(sink_of("milvus", tmp_path))
    try:
        store.create(DIM)
        ids = [f"d{i}" for i in range(300)]
        store.upsert("a.parquet", ids, clustered_vectors(300), [""] * 300, FP, held=False)
        assert store.keys_of("a.parquet") == set(ids) and len(store.rows()) == 300 == store.count()
    finally:
        store.close()


def test_a_sink_whose_packages_are_missing_is_refused_before_any_work(tmp_path, monkeypatch):
    """A Milvus Lite file needs milvus_lite beside pymilvus; a server URI does not."""
    import importlib.util

    from operators.config.loading import load_config
    from operators.config.schema import ConfigError
    from operators.io.sinks import check_sinks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "milvus_lite" else real(name, *a))
    lite = load_config(None, [f"sinks=[{{kind: milvus, name: m, uri: '{tmp_path / 'm.db'}'}}]"])
    with pytest.raises(ConfigError, match=r"sinks: m needs milvus_lite, which is not installed: pip install 'corpus-embed\[milvus\]'"):
        check_sinks(lite)
    check_sinks(load_config(None, ["sinks=[{kind: milvus, uri: 'http://milvus:19530'}]"]))
