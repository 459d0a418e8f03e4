"""The sink benchmark on a small output, every store: each phase timed, and its checks hold (the
store's rows after the first sync and after the night equal the Parquet's count; the night's
difference is what the script changed)."""

from __future__ import annotations

import json

from pipelines import benchmark_sinks


def test_the_sink_benchmark_times_every_phase_and_checks_each_store(tmp_path, capsys):
    out = tmp_path / "bench"
    assert benchmark_sinks.main(["--rows", "600", "--shards", "3", "--dim", "16", "--output", str(out)]) == 0
    report = json.loads((out / "benchmark_sinks.json").read_text())
    assert report["rows"] == 600 and set(report["stores"]) == {"lancedb", "qdrant", "milvus"}
    for kind, r in report["stores"].items():
        assert set(r["seconds"]) == {"bulk load (baseline)", "sync into an empty store", "sync, no change", "sync, a night's change"}
        # shard 0 rewritten (10 of its 200 rows deleted) and a new shard: 390 rows; shard 1 deleted: its 200 rows
        assert r["night"] == {"shards_upserted": 2, "shards_deleted": 1, "rows_upserted": 390, "rows_deleted": 210}, kind
    assert "sync / baseline" in capsys.readouterr().out
