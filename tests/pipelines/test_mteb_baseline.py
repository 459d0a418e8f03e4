"""pipelines/mteb_baseline.py: the evaluation stage against sentence-transformers' encode scored by
mteb itself on the same data (a tiny model and a tiny mirror here; the real MiniLM in BENCHMARKS.md)."""

from __future__ import annotations

import json

from pipelines import evaluate, mteb_baseline
from tests.helpers import make_bench


def test_the_pipeline_scores_as_sentence_transformers_and_mteb(ray_local, tmp_path, tiny_bert, capsys):
    bench = make_bench(tmp_path / "bench")
    out = tmp_path / "eval"
    sets = ["--set", f"model.name={tiny_bert}", "--set", f"eval.mirror={bench}", "--set", "eval.tasks=[STSBenchmark, SciFact, clustering/banking77]"]
    assert evaluate.main([*sets, "--output", str(out)]) == 0
    assert mteb_baseline.main(["--results", str(out / "results.json"), "--model", tiny_bert, "--mirror", str(bench),
                               "--report", str(tmp_path / "ref.json")]) == 0
    rows = json.loads((tmp_path / "ref.json").read_text())["rows"]
    assert [r["task"] for r in rows] == ["STSBenchmark", "SciFact"]  # ours (clustering/banking77) has no mteb reference
    for r in rows:
        assert abs(r["diff"]) < 1e-3, r  # the same vectors up to float noise, scored by the same evaluator
    assert "| STSBenchmark |" in capsys.readouterr().out
