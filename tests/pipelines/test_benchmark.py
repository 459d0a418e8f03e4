"""pipelines/benchmark.py on a small corpus: every phase runs on the same texts and the report
carries what the README promises. Speed itself is measured by running the script, not here."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.benchmark import main

REPORT_KEYS = {
    "pipeline_rows_per_s", "baseline_rows_per_s", "noop_rows_per_s", "padding_efficiency", "peak_rss_bytes", "device",
    "pipeline_vs_baseline", "noop_vs_pipeline", "peak_rss_ratio_vs_small", "model_tflops",
}


def test_benchmark_report(ray_local, tmp_path, tiny_bert, capsys):
    report = tmp_path / "bench.json"
    # one embedding actor and a tiny model: this checks the report, not the pool or MiniLM's speed
    rc = main(["--docs", "200", "--shard-docs", "40", "--memory-scale", "3", "--report", str(report), "--workdir", str(tmp_path / "w"),
               "--set", "ray.max_actors=1", "--set", f"model.name={tiny_bert}"])
    assert rc == 0
    r = json.loads(report.read_text())
    assert REPORT_KEYS <= set(r)
    assert r["pipeline"]["rows"] == r["noop"]["rows"] == r["baseline"]["rows"] == 200
    assert r["pipeline_small"]["rows"] == 66
    assert r["pipeline"]["tokens"] == r["noop"]["tokens"]  # the same corpus and tokenization
    assert 0.5 < r["padding_efficiency"] <= 1.0
    assert r["peak_rss_bytes"] > 100 * 2**20 and r["device"].startswith("cpu")
    assert all(r[k] > 0 for k in ("pipeline_rows_per_s", "baseline_rows_per_s", "noop_rows_per_s"))
    assert r["pipeline"]["steady_rows_per_s"] > 0 and r["noop_vs_pipeline_steady"] > 0  # 5 shards: steady rates need >= 4
    printed = capsys.readouterr().out
    assert "pipeline / sentence-transformers encode" in printed and "padding efficiency" in printed
    # the no-op run wrote zero vectors for every document, the pipeline real unit vectors
    noop = pq.read_table(sorted((tmp_path / "w" / "out-noop").glob("*.parquet"))[0])
    real = pq.read_table(sorted((tmp_path / "w" / "out").glob("*.parquet"))[0])
    assert not np.stack(noop.column("embedding").to_numpy(zero_copy_only=False)).any()
    np.testing.assert_allclose(np.linalg.norm(np.stack(real.column("embedding").to_numpy(zero_copy_only=False)), axis=1), 1, atol=1e-5)


def test_bad_arguments_exit_2(capsys):
    assert main(["--docs", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["--scale", "--scale-shards", "10,0"]) == 2
    assert "--scale-shards" in capsys.readouterr().err


def test_scale_points_and_their_ratios(ray_local, tmp_path):
    """--scale's points, in this process: the same rows as 2 and 6 shards (no-op model), then the
    6-shard output planned again (all up to date: nothing embedded); the ratios and the table."""
    from operators.config import load_config
    from operators.throughput import format_scale_report, scale_ratios, write_corpus_uri
    from pipelines.benchmark import point_paths, scale_point

    cfg = load_config(None, ["ray.max_actors=1", "ray.tokenize_on=tasks"])
    points = []
    for shards in (2, 6):
        point = {"shards": shards, "rows": 30, "noop": True, "workdir": str(tmp_path)}
        write_corpus_uri([f"text number {i}" for i in range(30)], point_paths(point)[0], shards, cfg.input.storage)
        points.append(scale_point(cfg, point))
    plan = scale_point(cfg, dict(point, again=True))
    assert [(p["shards"], p["shards_embedded"], p["rows"]) for p in points] == [(2, 2, 30), (6, 6, 30)]
    assert (plan["shards"], plan["shards_embedded"], plan["again"]) == (6, 0, True) and plan["plan_s"] > 0
    assert all(0 < p["driver_peak_rss_bytes"] <= p["peak_rss_bytes"] for p in points)
    report = scale_ratios({"cpus": 2, "model": "m", "points": points, "plan": plan})
    assert report["noop_shards"] == [2, 6] and report["noop_driver_rss_ratio"] > 0
    assert report["noop_time_per_row_ratio"] == pytest.approx(points[1]["seconds"] / points[0]["seconds"])
    text = format_scale_report(report)
    assert "noop: 6 shards vs 2" in text and "(all up to date)" in text






def test_gpu_check_script_names_what_exists_and_stops_without_a_gpu(tmp_path):
    """pipelines/gpu_check.sh (the GPU run issue 6 asks for) names files that exist, and on a
    machine without CUDA stops at once with exit 2 and says why."""
    import re
    import subprocess
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parents[2]
    script = root / "pipelines" / "gpu_check.sh"
    text = script.read_text()
    for path in re.findall(r"(?:configs|tests|pipelines)/[\w./-]+\.(?:py|yaml)", text):
        assert (root / path).exists(), path
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if not torch.cuda.is_available():
        got = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, cwd=root, timeout=120)
        assert got.returncode == 2 and "no CUDA device" in got.stderr
        assert not (tmp_path / "out").exists()  # stopped before writing anything
