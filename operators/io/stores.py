"""The vector stores a sink writes to, behind one small interface (sinks.py holds the contract).

Every store keeps one row per (shard, id) of the Parquet output: the id, the vector, the shard it
came from, the document's content hash and the config fingerprint. A row's key is derived from
(shard, id), so re-sending a shard overwrites its rows, and an id two shards hold is kept once per
shard, as the Parquet holds it.

    LanceStore     a LanceDB table (id, vector, shard, content_hash, config_fingerprint)
    QdrantStore    a Qdrant collection (server URL with API key, or a local folder); point id =
                   UUIDv5 of (shard, id); payload id, shard, content_hash, config_fingerprint
    MilvusStore    a Milvus collection (server URI with token, or a Milvus Lite file); primary key
                   `key` = the same UUIDv5, fields id, shard, content_hash, config_fingerprint, vector

A store's methods: `describe()` (dimension and fingerprint it holds, or None when absent or empty),
`create(dimension)`, `upsert(shard, ids, vectors, hashes, fingerprint, held)` (`held`: the store
may hold rows of this shard already; keyed stores overwrite either way), `keys_of(shard)` (the ids
it holds for a shard), `delete_ids(shard, ids)`, `delete_shard(shard)`, `count()`,
`search(vector, k)` (ids), `finish()` (indexes).
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow as pa

from operators.config.schema import LanceDBSinkConfig, MilvusSinkConfig, QdrantSinkConfig

KEY_NAMESPACE = uuid.UUID("6f1d2c3a-8b9e-4c5d-9a7f-2e4b6c8d0a1f")  # corpus-embed's namespace for point ids


def point_id(shard: str, id_: str) -> str:
    """The deterministic key of a row: UUIDv5 of its shard and id."""
    return str(uuid.uuid5(KEY_NAMESPACE, f"{shard}\x00{id_}"))


def _quote(values) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def index_config(idx):
    """The LanceDB index config object for a lancedb sink's `index` (the keyword form is deprecated)."""
    from lancedb import index as li

    kinds = {"ivf_pq": li.IvfPq, "ivf_flat": li.IvfFlat, "ivf_hnsw_sq": li.HnswSq, "ivf_hnsw_pq": li.HnswPq}
    kwargs = {"distance_type": idx.metric}
    if idx.num_partitions:
        kwargs["num_partitions"] = idx.num_partitions
    if idx.num_sub_vectors and idx.type.endswith("pq"):
        kwargs["num_sub_vectors"] = idx.num_sub_vectors
    return kinds[idx.type](**kwargs)


class LanceStore:
    def __init__(self, cfg: LanceDBSinkConfig):
        try:
            import lancedb
        except ImportError as e:  # an optional extra
            raise ImportError("the lancedb sink needs: pip install 'corpus-embed[lancedb]'") from e
        self.cfg = cfg
        self.db = lancedb.connect(cfg.uri, storage_options=dict(cfg.storage_options) or None)
        self.table = self.db.open_table(cfg.table) if self._exists() else None

    def _exists(self) -> bool:
        token = None
        while True:
            page = self.db.list_tables(page_token=token)
            if self.cfg.table in page.tables:
                return True
            token = page.page_token
            if not token:
                return False

    @staticmethod
    def schema(dimension: int) -> pa.Schema:
        return pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), dimension)), ("shard", pa.string()),
                          ("content_hash", pa.string()), ("config_fingerprint", pa.string())])

    def describe(self) -> tuple[int, str | None] | None:
        if self.table is None:
            return None
        vector = self.table.schema.field("vector").type
        dim = getattr(vector, "list_size", None)
        if "config_fingerprint" not in self.table.schema.names:
            return (dim, "an earlier layout (id, vector, shard)")
        if self.table.count_rows() == 0:
            return (dim, None)
        first = self.table.search().select(["config_fingerprint"]).limit(1).to_arrow()
        return (dim, first.column("config_fingerprint")[0].as_py() if first.num_rows else None)

    def create(self, dimension: int) -> None:
        self.table = self.db.create_table(self.cfg.table, schema=self.schema(dimension), mode="overwrite")

    def upsert(self, shard: str, ids: list[str], vectors: np.ndarray, hashes: list[str], fingerprint: str, held: bool = True) -> None:
        """LanceDB has no keyed overwrite cheaper than merge_insert: rows already held for these
        keys are deleted first, unless the shard holds none (`held` False: a plain append)."""
        if held:
            self.table.delete(f"shard = {_quote([shard])} AND id IN ({_quote(ids)})")
        dim = vectors.shape[1]
        self.table.add(pa.table({
            "id": pa.array(ids, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), dim),
            "shard": pa.array([shard] * len(ids), pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "config_fingerprint": pa.array([fingerprint] * len(ids), pa.string()),
        }, schema=self.schema(dim)))

    def keys_of(self, shard: str) -> set[str]:
        t = self.table.search().where(f"shard = {_quote([shard])}").select(["id"]).limit(None).to_arrow()
        return set(t.column("id").to_pylist())

    def delete_ids(self, shard: str, ids: list[str]) -> None:
        for i in range(0, len(ids), 500):
            self.table.delete(f"shard = {_quote([shard])} AND id IN ({_quote(ids[i:i + 500])})")

    def delete_shard(self, shard: str) -> None:
        self.table.delete(f"shard = {_quote([shard])}")

    def count(self) -> int:
        return self.table.count_rows() if self.table is not None else 0

    def rows(self) -> dict[tuple[str, str], np.ndarray]:
        t = self.table.to_arrow()
        vecs = np.stack(t.column("vector").to_numpy(zero_copy_only=False)) if t.num_rows else []
        return dict(zip(zip(t.column("shard").to_pylist(), t.column("id").to_pylist()), vecs))

    def search(self, vector: np.ndarray, k: int) -> list[str]:
        return self.table.search(vector.astype(np.float32)).distance_type(self.cfg.index.metric).limit(k).to_arrow().column("id").to_pylist()

    def finish(self) -> dict:
        from lancedb.index import BTree

        idx, n = self.cfg.index, self.count()
        if idx.type == "none" or n < idx.min_rows:
            return {}
        self.table.create_index("vector", config=index_config(idx), replace=True)
        self.table.create_index("id", config=BTree(), replace=True)
        self.table.create_index("shard", config=BTree(), replace=True)
        return {"index": idx.type}


class QdrantStore:
    DISTANCES = {"cosine": "Cosine", "dot": "Dot", "euclid": "Euclid"}

    def __init__(self, cfg: QdrantSinkConfig):
        try:
            from qdrant_client import QdrantClient
        except ImportError as e:
            raise ImportError("the qdrant sink needs: pip install 'corpus-embed[qdrant]'") from e
        self.cfg = cfg
        if cfg.path is not None:
            self.client = QdrantClient(path=cfg.path)
        else:
            api_key = cfg.api_key or os.environ.get("QDRANT_API_KEY")  # from the environment (a secret), or the config
            self.client = QdrantClient(url=cfg.url, api_key=api_key, timeout=cfg.timeout)

    def describe(self) -> tuple[int, str | None] | None:
        if not self.client.collection_exists(self.cfg.collection):
            return None
        params = self.client.get_collection(self.cfg.collection).config.params.vectors
        dim = getattr(params, "size", None)
        points, _ = self.client.scroll(self.cfg.collection, limit=1, with_payload=["config_fingerprint"], with_vectors=False)
        return (dim, points[0].payload.get("config_fingerprint") if points else None)

    def create(self, dimension: int) -> None:
        from qdrant_client import models

        if self.client.collection_exists(self.cfg.collection):
            self.client.delete_collection(self.cfg.collection)
        self.client.create_collection(self.cfg.collection, vectors_config=models.VectorParams(
            size=dimension, distance=models.Distance(self.DISTANCES[self.cfg.distance])))
        if self.cfg.path is None:  # a server indexes payload fields; local mode has no payload index
            self.client.create_payload_index(self.cfg.collection, "shard", models.PayloadSchemaType.KEYWORD)

    def upsert(self, shard: str, ids: list[str], vectors: np.ndarray, hashes: list[str], fingerprint: str, held: bool = True) -> None:
        from qdrant_client import models

        points = [models.PointStruct(id=point_id(shard, i), vector=v.tolist(),
                                     payload={"id": i, "shard": shard, "content_hash": h, "config_fingerprint": fingerprint})
                  for i, v, h in zip(ids, vectors, hashes)]
        self.client.upsert(self.cfg.collection, points=points, wait=True)

    def _shard_filter(self, shard: str):
        from qdrant_client import models

        return models.Filter(must=[models.FieldCondition(key="shard", match=models.MatchValue(value=shard))])

    def keys_of(self, shard: str) -> set[str]:
        out, offset = set(), None
        while True:
            points, offset = self.client.scroll(self.cfg.collection, scroll_filter=self._shard_filter(shard), limit=1000,
                                                offset=offset, with_payload=["id"], with_vectors=False)
            out.update(p.payload["id"] for p in points)
            if offset is None:
                return out

    def delete_ids(self, shard: str, ids: list[str]) -> None:
        from qdrant_client import models

        for i in range(0, len(ids), 1000):
            self.client.delete(self.cfg.collection, points_selector=models.PointIdsList(
                points=[point_id(shard, x) for x in ids[i:i + 1000]]), wait=True)

    def delete_shard(self, shard: str) -> None:
        from qdrant_client import models

        self.client.delete(self.cfg.collection, points_selector=models.FilterSelector(filter=self._shard_filter(shard)), wait=True)

    def count(self) -> int:
        if not self.client.collection_exists(self.cfg.collection):
            return 0
        return self.client.count(self.cfg.collection, exact=True).count

    def rows(self) -> dict[tuple[str, str], np.ndarray]:
        out, offset = {}, None
        while True:
            points, offset = self.client.scroll(self.cfg.collection, limit=1000, offset=offset, with_payload=True, with_vectors=True)
            out.update(((p.payload["shard"], p.payload["id"]), np.asarray(p.vector, np.float32)) for p in points)
            if offset is None:
                return out

    def search(self, vector: np.ndarray, k: int) -> list[str]:
        hits = self.client.query_points(self.cfg.collection, query=vector.astype(np.float32).tolist(), limit=k, with_payload=["id"])
        return [p.payload["id"] for p in hits.points]

    def finish(self) -> dict:
        return {}

    def close(self) -> None:
        self.client.close()


def _milvus_string(value: str) -> str:
    """A Milvus expression's string literal (Milvus Lite has no filter templates)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class MilvusStore:
    METRICS = {"cosine": "COSINE", "ip": "IP", "l2": "L2"}
    INDEX_PARAMS = {"hnsw": {"M": 16, "efConstruction": 200}, "ivf_flat": {"nlist": 128}}
    MAX_STRING = 65535  # Milvus' longest VARCHAR

    def __init__(self, cfg: MilvusSinkConfig):
        try:
            from pymilvus import MilvusClient
        except ImportError as e:
            raise ImportError("the milvus sink needs: pip install 'corpus-embed[milvus]'") from e
        self.cfg = cfg
        if cfg.lite:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.uri)), exist_ok=True)
            self.client = MilvusClient(cfg.uri)
        else:
            token = cfg.token or os.environ.get("MILVUS_TOKEN") or ""  # from the environment (a secret), or the config
            self.client = MilvusClient(uri=cfg.uri, token=token, timeout=cfg.timeout)
        self.name = cfg.collection

    def _shard_is(self, shard: str) -> str:
        return f"shard == {_milvus_string(shard)}"

    def describe(self) -> tuple[int, str | None] | None:
        if not self.client.has_collection(self.name):
            return None
        fields = {f["name"]: f for f in self.client.describe_collection(self.name)["fields"]}
        vector = fields.get("vector")
        dim = int(vector["params"]["dim"]) if vector else None
        if "config_fingerprint" not in fields or "key" not in fields:
            return (dim, "another layout (not written by corpus-embed)")
        first = self.client.query(self.name, filter="", output_fields=["config_fingerprint"], limit=1)
        return (dim, first[0]["config_fingerprint"] if first else None)

    def create(self, dimension: int) -> None:
        from pymilvus import DataType, MilvusClient

        if self.client.has_collection(self.name):
            self.client.drop_collection(self.name)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=36)
        schema.add_field("id", DataType.VARCHAR, max_length=self.MAX_STRING)
        schema.add_field("shard", DataType.VARCHAR, max_length=self.MAX_STRING)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=256)
        schema.add_field("config_fingerprint", DataType.VARCHAR, max_length=256)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type=self.cfg.index.upper(), metric_type=self.METRICS[self.cfg.metric],
                        params=self.INDEX_PARAMS.get(self.cfg.index, {}))
        index.add_index(field_name="shard", index_type="INVERTED")  # a shard's rows found without a scan
        self.client.create_collection(self.name, schema=schema, index_params=index, consistency_level="Strong")

    def upsert(self, shard: str, ids: list[str], vectors: np.ndarray, hashes: list[str], fingerprint: str, held: bool = True) -> None:
        if len(shard.encode()) > self.MAX_STRING or any(len(i.encode()) > self.MAX_STRING for i in ids):
            raise ValueError(f"milvus holds strings of at most {self.MAX_STRING} bytes; shard {shard} has a longer id or name")
        rows = [{"key": point_id(shard, i), "id": i, "shard": shard, "content_hash": h or "", "config_fingerprint": fingerprint,
                 "vector": v} for i, v, h in zip(ids, vectors.astype(np.float32).tolist(), hashes)]
        if held:
            self.client.upsert(self.name, rows)
        else:  # no row of this shard in the store: a plain insert, without upsert's delete of each key
            self.client.insert(self.name, rows)

    PAGE = 16384  # Milvus' largest query result

    def _scan(self, filter_: str, fields: list[str]):
        """The rows matching `filter_`: one query when they fit a page (a shard mostly does), else
        the query iterator (each of its pages costs about a second in Milvus Lite)."""
        first = self.client.query(self.name, filter=filter_, output_fields=fields, limit=self.PAGE)
        if len(first) < self.PAGE:
            yield from first
            return
        it = self.client.query_iterator(self.name, batch_size=self.PAGE, filter=filter_, output_fields=fields)
        try:
            while batch := it.next():
                yield from batch
        finally:
            it.close()

    def keys_of(self, shard: str) -> set[str]:
        return {r["id"] for r in self._scan(self._shard_is(shard), ["id"])}

    def delete_ids(self, shard: str, ids: list[str]) -> None:
        for i in range(0, len(ids), 1000):
            self.client.delete(self.name, ids=[point_id(shard, x) for x in ids[i:i + 1000]])

    def delete_shard(self, shard: str) -> None:
        self.client.delete(self.name, filter=self._shard_is(shard))

    def count(self) -> int:
        if not self.client.has_collection(self.name):
            return 0
        return int(self.client.query(self.name, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def rows(self) -> dict[tuple[str, str], np.ndarray]:
        return {(r["shard"], r["id"]): np.asarray(r["vector"], np.float32) for r in self._scan("", ["id", "shard", "vector"])}

    def search(self, vector: np.ndarray, k: int) -> list[str]:
        hits = self.client.search(self.name, data=[vector.astype(np.float32).tolist()], limit=k, output_fields=["id"],
                                  search_params={"metric_type": self.METRICS[self.cfg.metric]})
        return [h["entity"]["id"] for h in hits[0]]

    def finish(self) -> dict:
        if not self.cfg.lite:
            self.client.flush(self.name)  # sealed segments, indexed: what a server searches fastest
        return {"index": self.cfg.index}

    def close(self) -> None:
        self.client.close()


def open_store(cfg):
    return {"lancedb": LanceStore, "qdrant": QdrantStore, "milvus": MilvusStore}[cfg.kind](cfg)
