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
    assert r["pipeline_small"]["rows"] == r["noop_small"]["rows"] == 66
    for kind in ("pipeline", "noop"):  # the marginal rate: the 134 extra rows over the extra seconds (None if none)
        extra = r[kind]["seconds"] - r[f"{kind}_small"]["seconds"]
        got = r[f"{kind}_marginal_rows_per_s"]
        assert got == pytest.approx(134 / extra) if extra > 0 else got is None
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


def test_a_scale_point_then_its_plan(ray_local, tmp_path):
    """A --scale point, in this process: 30 rows as 6 shards (no-op model), then the same output
    planned again (all up to date: nothing embedded)."""
    from operators.config.loading import load_config
    from operators.evaluation.throughput import write_corpus_uri
    from pipelines.benchmark import check_exactly_once, point_paths, scale_point

    cfg = load_config(None, ["ray.max_actors=1", "ray.tokenize_on=tasks"])
    point = {"shards": 6, "rows": 30, "noop": True, "workdir": str(tmp_path)}
    write_corpus_uri([f"text number {i}" for i in range(30)], point_paths(point)[0], 6, cfg.input.storage)
    first = scale_point(cfg, point)
    plan = scale_point(cfg, dict(point, again=True))
    assert (first["shards"], first["shards_embedded"], first["rows"]) == (6, 6, 30)
    assert 0 < first["driver_peak_rss_bytes"] <= first["peak_rss_bytes"]
    assert (plan["shards"], plan["shards_embedded"], plan["again"]) == (6, 0, True) and plan["plan_s"] > 0
    assert check_exactly_once(cfg, point_paths(point)[1], 30) and not check_exactly_once(cfg, point_paths(point)[1], 31)


def test_scale_ratios_take_the_most_shards_against_the_fewest():
    from operators.evaluation.benchmark_report import format_scale_report, scale_ratios

    def point(shards, rows, seconds, driver, noop=True, **kw):
        return dict(shards=shards, rows_in=rows, seconds=seconds, driver_peak_rss_bytes=driver, peak_rss_bytes=4 * driver,
                    peak_pss_bytes=3 * driver + rows * mib, plan_s=1.0, noop=noop, **kw)

    mib = 2**20
    points = [point(100, 1000, 10.0, 300 * mib), point(10000, 1000, 14.0, 360 * mib), point(100, 200, 8.0, 320 * mib, noop=False),
              point(1, 1, 1.0, 100 * mib), point(1, 100, 2.0, 200 * mib), point(1, 1000, 5.0, 220 * mib), point(500, 500, 9.0, 400 * mib, setup=True)]
    r = scale_ratios({"cpus": 2, "model": "m", "points": points, "plan": point(500, 500, 3.0, 330 * mib, again=True)})
    assert r["noop_shards"] == [100, 10000] and r["noop_time_per_row_ratio"] == pytest.approx(1.4)
    assert r["noop_driver_rss_ratio"] == pytest.approx(1.2) and "model_shards" not in r  # one model point: no ratio
    assert r["giant_rows"] == [100, 1000] and r["giant_peak_rss_ratio"] == pytest.approx(1.1)
    assert r["giant_peak_pss_ratio"] == pytest.approx((660 + 1000) / (600 + 100))
    assert points[1]["ms_per_shard"] == pytest.approx(1.4) and points[0]["us_per_row"] == pytest.approx(1e4)
    text = format_scale_report(r)
    assert "noop: 10000 shards vs 100: driver peak RSS 1.20x, wall time per row 1.40x" in text and "(all up to date)" in text
    assert "peak RSS 1.10x, peak PSS 2.37x" in text


def test_engines_report(ray_local, tmp_path, tiny_bert, capsys):
    """--engines: each variant through the pipeline on the same corpus, its ratio to torch, and
    float32 ONNX writing the vectors torch writes."""
    report = tmp_path / "engines.json"
    rc = main(["--engines", "torch,onnx", "--docs", "60", "--shard-docs", "20", "--skip", "baseline", "--report", str(report),
               "--workdir", str(tmp_path / "w"), "--set", "ray.max_actors=1", "--set", f"model.name={tiny_bert}"])
    assert rc == 0
    r = json.loads(report.read_text())
    assert set(r["engines"]) == {"torch", "onnx"} and all(e["rows"] == 60 for e in r["engines"].values())
    assert r["engines"]["torch"]["vs_pipeline_torch"] == 1.0 and r["engines"]["onnx"]["vs_pipeline_torch"] > 0
    assert "| onnx |" in capsys.readouterr().out

    def vectors(name):
        tables = [pq.read_table(p) for p in sorted((tmp_path / "w" / name).glob("*.parquet"))]
        return {i: np.asarray(v) for t in tables for i, v in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist())}

    torch_v, onnx_v = vectors("out-torch"), vectors("out-onnx")
    assert torch_v.keys() == onnx_v.keys() and max(float(np.abs(torch_v[k] - onnx_v[k]).max()) for k in torch_v) <= 1e-4


def test_engine_variants_are_checked_before_any_work():
    from operators.config.schema import ConfigError
    from pipelines.benchmark import engine_settings

    assert engine_settings("openvino:int8", None) == {"engine": "openvino", "quantization": "int8"}
    assert engine_settings("onnx:int8:static", "wiki.raw")["calibration_corpus"] == "wiki.raw"
    for bad, needle in [("tensorrt", "engine[:int8[:static]]"), ("onnx:int4", "engine[:int8[:static]]"), ("onnx:int8:static", "--calibration-corpus")]:
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
            engine_settings(bad, None)

