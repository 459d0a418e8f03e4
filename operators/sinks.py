"""Vector store sinks, fed from the committed Parquet vector shards after a run.

LanceDB (`sinks.lancedb`): one table of (id, vector, shard), kept equal to the published output.
A run that published a new version (or finds no table) rebuilds the table from every shard of
that version; a nightly run on the same version replaces the rows of each shard it committed
(delete where shard = name, then add the shard's rows) and removes the rows of deleted shards,
so the table holds exactly the rows of the Parquet output, shard by shard: one row per id when
ids are unique, and an id that two shards both hold (or one, under input.duplicate_ids=keep)
as often as the Parquet holds it, each row with its own shard's vector. An ANN index (IVF_PQ,
IVF_FLAT, IVF_HNSW_SQ, ...) is (re)built when configured and the table has at least
`index.min_rows` rows, plus scalar indexes on id (lookups) and shard (the per-shard deletes).
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterable, Iterator

import pyarrow as pa

from operators.config import ConfigError, LanceDBSinkConfig
from operators.storage import read_parquet


class SinkError(RuntimeError):
    pass


def index_config(idx):
    """The LanceDB index config object for `sinks.lancedb.index` (the keyword form is deprecated)."""
    from lancedb import index as li

    kinds = {"ivf_pq": li.IvfPq, "ivf_flat": li.IvfFlat, "ivf_hnsw_sq": li.HnswSq, "ivf_hnsw_pq": li.HnswPq}
    kwargs = {"distance_type": idx.metric}
    if idx.num_partitions:
        kwargs["num_partitions"] = idx.num_partitions
    if idx.num_sub_vectors and idx.type.endswith("pq"):
        kwargs["num_sub_vectors"] = idx.num_sub_vectors
    return kinds[idx.type](**kwargs)


def has_table(db, name: str) -> bool:
    """Whether the database holds table `name` (list_tables pages through the names)."""
    token = None
    while True:
        page = db.list_tables(page_token=token)
        if name in page.tables:
            return True
        token = page.page_token
        if not token:
            return False


def lance_schema(dimension: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dimension)), ("shard", pa.string())])


def shard_rows(fs, path: str, dimension: int) -> pa.Table:
    """A vector shard as LanceDB rows."""
    t = read_parquet(fs, path, columns=["id", "embedding"])
    vec = t.column("embedding").cast(pa.list_(pa.float32(), dimension))
    shard = pa.array([posixpath.basename(path)] * t.num_rows, pa.string())
    return pa.Table.from_arrays([t.column("id"), vec, shard], schema=lance_schema(dimension))


def _batches(fs, paths: Iterable[str], dimension: int) -> Iterator[pa.RecordBatch]:
    for p in paths:
        yield from shard_rows(fs, p, dimension).to_batches()


def _quote(ids: list[str]) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in ids)


def connect(cfg: LanceDBSinkConfig):
    try:
        import lancedb
    except ImportError as e:  # an optional extra
        raise SinkError("sinks.lancedb needs the lancedb package: pip install 'corpus-embed[lancedb]'") from e
    options = dict(cfg.storage_options)
    return lancedb.connect(cfg.uri, storage_options=options or None)


def check_sinks(cfg) -> None:
    """Before any work: a configured sink's package must be installed."""
    if cfg.sinks.lancedb.uri:
        try:
            import lancedb  # noqa: F401
        except ImportError as e:
            raise ConfigError("sinks.lancedb.uri is set but lancedb is not installed: pip install 'corpus-embed[lancedb]'") from e


def feed_sinks(cfg, plan, outcome, entries: dict, dimension: int, previous_version: str | None) -> dict | None:
    """Bring every configured vector store in line with the output folder; their stats, or None."""
    if not cfg.sinks.lancedb.uri:
        return None
    from operators.storage import get_fs

    fs, out_dir = get_fs(plan.out_uri, cfg.output.storage)
    rebuild = bool(plan.version) and previous_version != plan.version  # a new version: a fresh table
    return {"lancedb": sync_lancedb(
        cfg.sinks.lancedb, fs, out_dir, sorted(e["output"] for e in entries.values()),
        [s["output"] for s in outcome.committed.values()], plan.deleted, dimension, rebuild,
    )}


def sync_lancedb(
    cfg: LanceDBSinkConfig,
    fs,
    out_dir: str,
    all_shards: list[str],
    committed: list[str],
    removed: list[str],
    dimension: int,
    rebuild: bool,
) -> dict:
    """Bring the LanceDB table in line with the output folder; returns counts for the run report."""
    started = time.time()
    db = connect(cfg)
    schema = lance_schema(dimension)
    exists = has_table(db, cfg.table)
    stats: dict = {"table": cfg.table}
    paths = lambda names: [posixpath.join(out_dir, n) for n in names]  # noqa: E731
    if rebuild or not exists:
        table = db.create_table(cfg.table, data=pa.RecordBatchReader.from_batches(schema, _batches(fs, paths(all_shards), dimension)),
                                schema=schema, mode="overwrite")
        stats["mode"] = "rebuilt"
    else:
        table = db.open_table(cfg.table)
        if table.schema.field("vector").type != schema.field("vector").type:
            raise SinkError(
                f"sinks.lancedb: table {cfg.table} holds {table.schema.field('vector').type} vectors, this run "
                f"{schema.field('vector').type}; a model change needs output.versioned (which rebuilds) or a new table"
            )
        old = 0  # rows of the shards replaced or removed, before: deleted = old - upserted
        for start in range(0, len(removed), 500):
            where = f"shard IN ({_quote(removed[start : start + 500])})"
            old += table.count_rows(where)
            table.delete(where)
        upserted = 0
        for name, p in zip(committed, paths(committed)):
            rows = shard_rows(fs, p, dimension)
            where = f"shard = {_quote([name])}"
            old += table.count_rows(where)
            table.delete(where)
            if rows.num_rows:
                table.add(rows)
                upserted += rows.num_rows
        stats.update(mode="incremental", deleted=max(0, old - upserted), upserted=upserted)
    n = table.count_rows()
    stats["rows"] = n
    idx = cfg.index
    if idx.type != "none" and n >= idx.min_rows:
        table.create_index("vector", config=index_config(idx), replace=True)
        from lancedb.index import BTree

        table.create_index("id", config=BTree(), replace=True)
        table.create_index("shard", config=BTree(), replace=True)
        stats["index"] = idx.type
    stats["seconds"] = round(time.time() - started, 2)
    return stats
