"""The previous vector file of a changed shard (incremental.PreviousShard), read in bounded memory,
against a dict and numpy over the whole file."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators.io.incremental import PreviousShard, content_hash, fill_reused, id_hashes, mark_reuse
from tests.helpers import batch


def vector_file(path, ids, hashes, vectors, row_group_size=7):
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    pq.write_table(pa.table({"id": ids, "embedding": emb, "content_hash": pa.array(hashes, pa.string())}), path, row_group_size=row_group_size)


def test_previous_shard_answers_as_a_dict_over_the_whole_file(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"doc-{i}" for i in range(50)]
    ids[40] = "doc-3"  # an id the file holds twice (input.duplicate_ids=keep): its last row counts
    hashes = [content_hash(f"text {i}") for i in range(50)]
    hashes[7] = None
    vectors = rng.standard_normal((50, 4)).astype(np.float32)
    path = tmp_path / "prev.parquet"
    vector_file(path, ids, hashes, vectors)
    assert pq.ParquetFile(path).num_row_groups == 8
    row = {i: r for r, i in enumerate(ids)}  # the reference: last row per id
    fs = fsspec.filesystem("file")

    assert PreviousShard.open(fs, str(tmp_path / "missing.parquet")) is None
    with PreviousShard.open(fs, str(path)) as prev:
        asked = ["doc-3", "doc-49", "nope", "doc-0", "doc-7"]
        assert prev.rows_of(id_hashes(asked)).tolist() == [row.get(i, -1) for i in asked]
        texts = [f"text {row[i]}" if i in row else "x" for i in asked]
        marks = prev.reusable(asked, [content_hash(t) for t in texts[:-1]] + [None])
        assert marks == [True, True, False, True, False]  # doc-7: not embedded now, so nothing to reuse
        assert prev.reusable(["doc-5"], [content_hash("changed text")]) == [False]

        order = rng.permutation(50)[:30]  # rows asked out of file order, across every row group
        got = prev.embeddings(order, pa.list_(pa.float32(), 4))
        np.testing.assert_array_equal(np.stack(got.to_numpy(zero_copy_only=False)), vectors[order])
        half = prev.embeddings(np.array([49, 0]), pa.list_(pa.float16(), 4))
        np.testing.assert_array_equal(np.stack(half.to_numpy(zero_copy_only=False)), vectors[[49, 0]].astype(np.float16))

        kept = {id_hashes([i])[0] for i in ids[10:]}
        assert prev.ids_absent(lambda h: ~np.isin(h, list(kept))) == [i for i in ids[:10] if i != "doc-3"]  # in file order; doc-3 is kept

        block = pa.table({"id": ["doc-12", "new", "doc-3"], "reuse": [True, False, True],
                          "embedding": pa.array([None, [1.0] * 4, None], pa.list_(pa.float32(), 4))})
        filled, n = fill_reused(block, prev, pa.list_(pa.float32(), 4))
        assert n == 2
        np.testing.assert_array_equal(np.stack(filled.column("embedding").to_numpy(zero_copy_only=False)),
                                      np.stack([vectors[12], np.ones(4, np.float32), vectors[40]]))


def test_reuse_marks_from_the_index_alone(tmp_path):
    """A read task keeps only the index (the file closed): reuse marks need no more."""
    vector_file(tmp_path / "prev.parquet", ["r0", "r1", "r2"], [content_hash(t) for t in ("same", "old", "gone")], np.zeros((3, 3), np.float32))
    prev = PreviousShard.open(fsspec.filesystem("file"), str(tmp_path / "prev.parquet"), index_only=True)
    assert mark_reuse(batch(["same", "new", "gone"], [None, None, "empty text"]), prev).column("reuse").to_pylist() == [True, False, False]
