"""What a sink costs, per store, side by side in one process: syncing a published output of ROWS
rows into an empty store, a night with no change, a night that edits and deletes rows, adds a shard
and removes one; and (the baseline) the same rows bulk-loaded with the store's own fastest client
call, which is what a user would write for a one-off load (LanceDB `create_table` from batches,
Qdrant `upload_collection`, Milvus `insert` in batches).

    python pipelines/benchmark_sinks.py                       # 100,000 rows of 384 dims, 20 shards
    python pipelines/benchmark_sinks.py --rows 20000 --stores lancedb milvus

The stores are the embedded ones (a LanceDB folder, Qdrant's local mode, Milvus Lite) under
--output; each sync is checked against the Parquet (row count). Prints a table and writes
OUTPUT/benchmark_sinks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.config.schema import LanceDBSinkConfig, MilvusSinkConfig, QdrantSinkConfig
from operators.evaluation.throughput import cpu_name
from operators.io.manifest import write_manifest
from operators.io.sinks import shard_batches, sync_sink
from operators.io.storage import file_fingerprint
from operators.io.stores import open_store
from operators.io.writers import vector_schema

FINGERPRINT = "benchmark"


def shard_vectors(seed: int, rows: int, dim: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_output(folder: Path, shards: dict[str, tuple[list[str], np.ndarray]], rewrite: tuple[str, ...] = ()) -> int:
    """Vector shards and their manifest, as the writers leave an output folder; returns its rows."""
    fs = fsspec.filesystem("file")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        if old.name not in shards:
            old.unlink()
    entries = {}
    for name, (ids, vecs) in shards.items():
        path = folder / name
        if name in rewrite or not path.exists():
            dim = vecs.shape[1]
            table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
                              "content_hash": [None] * len(ids)}, schema=vector_schema(dim, pa.float32()))
            pq.write_table(table, path, row_group_size=2000)
        entries[name] = {"rel": name, "output": name, "input_fingerprint": {}, "config_fingerprint": FINGERPRINT,
                         "output_fingerprint": file_fingerprint(fs.info(str(path)))}
    write_manifest(fs, str(folder), entries, FINGERPRINT)
    return sum(len(ids) for ids, _ in shards.values())


def sink_for(kind: str, where: Path):
    if kind == "lancedb":
        return LanceDBSinkConfig(uri=str(where / "lancedb"), table="bench")
    if kind == "qdrant":
        return QdrantSinkConfig(path=str(where / "qdrant"), collection="bench")
    return MilvusSinkConfig(uri=str(where / "milvus.db"), collection="bench")


def bulk_load(kind: str, where: Path, folder: Path, dim: int) -> None:
    """The baseline: every row of the output loaded with the store's own bulk call, no bookkeeping."""
    fs = fsspec.filesystem("file")
    where.mkdir(parents=True, exist_ok=True)
    batches = lambda: ((name, b) for name in sorted(p.name for p in folder.glob("*.parquet"))  # noqa: E731
                       for b in shard_batches(fs, str(folder / name), 2000))
    if kind == "lancedb":
        import lancedb

        schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dim)), ("shard", pa.string())])
        data = (pa.record_batch([pa.array(ids), pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim), pa.array([n] * len(ids))],
                                schema=schema) for n, (ids, v, _) in batches())
        lancedb.connect(str(where / "lancedb")).create_table("bench", data=data, schema=schema, mode="overwrite")
    elif kind == "qdrant":
        from qdrant_client import QdrantClient, models

        client = QdrantClient(path=str(where / "qdrant"))
        client.create_collection("bench", vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
        for n, (ids, v, _) in batches():
            client.upload_collection("bench", vectors=v, payload=[{"id": i, "shard": n} for i in ids], batch_size=2000)
        client.close()
    else:
        from pymilvus import DataType, MilvusClient

        client = MilvusClient(str(where / "milvus.db"))
        schema = MilvusClient.create_schema(auto_id=True)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("id", DataType.VARCHAR, max_length=256)
        schema.add_field("shard", DataType.VARCHAR, max_length=256)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
        client.create_collection("bench", schema=schema, index_params=index)
        for n, (ids, v, _) in batches():
            client.insert("bench", [{"id": i, "shard": n, "vector": x} for i, x in zip(ids, v.tolist())])
        client.close()


def held(sink) -> int:
    store = open_store(sink)
    try:
        return store.count()
    finally:
        getattr(store, "close", lambda: None)()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--stores", nargs="+", default=["lancedb", "qdrant", "milvus"], choices=["lancedb", "qdrant", "milvus"])
    ap.add_argument("--output", default="out/benchmark-sinks")
    args = ap.parse_args(argv)

    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    folder = out / "vectors"
    per = args.rows // args.shards
    shards = {f"part-{s:05d}.parquet": ([f"doc-{s}-{i}" for i in range(per)], shard_vectors(s, per, args.dim))
              for s in range(args.shards)}
    rows = write_output(folder, shards)
    # the night after: shard 0 has 10% of its rows edited and 5% deleted, shard 1 is gone, one shard is new
    ids0, vecs0 = shards["part-00000.parquet"]
    edited = vecs0.copy()
    edited[: per // 10] = shard_vectors(10_000, per // 10, args.dim)
    night = dict(shards)
    night["part-00000.parquet"] = (ids0[per // 20:], edited[per // 20:])
    night.pop("part-00001.parquet")
    night[f"part-{args.shards:05d}.parquet"] = ([f"doc-new-{i}" for i in range(per)], shard_vectors(99_999, per, args.dim))
    fs = fsspec.filesystem("file")
    results = {"machine": f"{cpu_name(flags=True)}, {os.cpu_count()} cores", "rows": rows, "dim": args.dim, "shards": args.shards, "stores": {}}
    print(f"{results['machine']}; {rows:,} rows x {args.dim} dims in {args.shards} shards")
    for module in {"lancedb": "lancedb", "qdrant": "qdrant_client", "milvus": "pymilvus"}.values():
        __import__(module)  # imported before any clock starts
    for kind in args.stores:
        where = out / kind
        shutil.rmtree(folder, ignore_errors=True)
        write_output(folder, shards)
        t = time.perf_counter()
        bulk_load(kind, where / "baseline", folder, args.dim)
        baseline = time.perf_counter() - t
        sink = sink_for(kind, where)
        timings = {"bulk load (baseline)": baseline}
        t = time.perf_counter()
        full = sync_sink(sink, fs, str(folder), str(folder), FINGERPRINT, args.dim)
        timings["sync into an empty store"] = time.perf_counter() - t
        assert full["rows"] == rows == held(sink), (full, rows)
        t = time.perf_counter()
        quiet = sync_sink(sink, fs, str(folder), str(folder), FINGERPRINT, args.dim)
        timings["sync, no change"] = time.perf_counter() - t
        assert quiet["rows_upserted"] == 0
        after = write_output(folder, night, rewrite=("part-00000.parquet",))
        t = time.perf_counter()
        nightly = sync_sink(sink, fs, str(folder), str(folder), FINGERPRINT, args.dim)
        timings["sync, a night's change"] = time.perf_counter() - t
        assert nightly["rows"] == after == held(sink), (nightly, after)
        results["stores"][kind] = {"seconds": timings, "night": {k: nightly[k] for k in
                                   ("shards_upserted", "shards_deleted", "rows_upserted", "rows_deleted")}}
        print(f"\n{kind}")
        for what, s in timings.items():  # a rate for the loads of every row; the nights' are not
            rate = f"  {rows / s:10,.0f} rows/s" if what in ("bulk load (baseline)", "sync into an empty store") else ""
            print(f"  {what:28s} {s:8.2f} s{rate}")
        print(f"  sync / baseline              {timings['sync into an empty store'] / baseline:8.2f} x")
        print(f"  the night: {results['stores'][kind]['night']}")
    (out / "benchmark_sinks.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
