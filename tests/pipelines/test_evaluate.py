"""The evaluation stage: metrics against sklearn/scipy, a tiny benchmark folder end to end on
local Ray (cache, resume, reports), error messages, and the real MiniLM on STS-B."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipelines import evaluate
from tests.helpers import REPO, SHARED_DATA, make_bench

TASKS = "eval.tasks=[sts/stsb, sts/sts13, clustering/banking77, classification/mr, classification/trec]"


def test_two_configs_end_to_end_on_ray(ray_local, tmp_path, tiny_bert, capsys):
    """Every task kind, two configs compared, the reports, one cache folder per config fingerprint
    (the cache and resume logic itself: tests/operators/test_evaluation.py, without Ray)."""
    bench = make_bench(tmp_path / "bench")
    cfgs = []
    for pooling in ("mean", "cls"):
        p = tmp_path / f"{pooling}.yaml"
        p.write_text(f"extends: {REPO / 'configs' / 'default.yaml'}\nextraction: {{pooling: {pooling}}}\n")
        cfgs += ["--config", str(p)]
    out = tmp_path / "cmp"
    sets = ["--set", f"model.name={tiny_bert}", "--set", f"eval.data_dir={bench}", "--set", TASKS, "--set", "eval.folds=3"]
    assert evaluate.main([*cfgs, *sets, "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["comparison"]] == ["mean", "cls"]
    mean, cls = results["comparison"]
    assert mean["sts"]["stsb"]["spearman"] != cls["sts"]["stsb"]["spearman"]
    assert set(mean["sts"]) == {"stsb", "sts13"} and mean["sts"]["stsb"]["pairs"] == 20
    assert set(mean["sts"]["sts13"]) >= {"all", "mean", "subsets"} and len(mean["sts"]["sts13"]["subsets"]) == 3
    assert 0 <= mean["clustering"]["banking77"]["v_measure"] <= 100
    assert mean["classification"]["mr"]["protocol"] == "3-fold CV" and mean["classification"]["trec"]["protocol"] == "train/test split"
    assert mean["model"]["name"] == tiny_bert and mean["timings"]["texts"] > 0
    md = (out / "results.md").read_text()
    assert "| task | mean | cls |" in md and "| STS stsb |" in md and md in capsys.readouterr().out
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    for r in results["comparison"]:
        parts = list((out / "cache" / r["config_fingerprint"]).glob("part-*.parquet"))
        assert parts and sum(len(pq.read_table(p)) for p in parts) == r["timings"]["texts"]


def test_missing_benchmarks_exit_2_naming_the_file(tmp_path, capsys):
    assert evaluate.main(["--set", f"eval.data_dir={tmp_path}", "--set", "eval.tasks=[sts/stsb]", "--output", str(tmp_path / "o")]) == 2
    assert "stsb.test.tsv: benchmark file not found" in capsys.readouterr().err


def test_benchmarks_never_feed_a_fitted_step(tmp_path, capsys):
    args = ["--set", f"whitening.corpus={SHARED_DATA}/sts/raw/stsb.train.tsv", "--set", f"eval.data_dir={SHARED_DATA}",
            "--set", "eval.tasks=[sts/stsb]", "--output", str(tmp_path)]
    assert evaluate.main(args) == 2
    assert "lies inside the benchmarks" in capsys.readouterr().err


def test_minilm_reproduces_the_mteb_stsb_score(ray_local, tmp_path):
    """all-MiniLM-L6-v2, mean pooling, raw STS-B test: MTEB's leaderboard gives 82.03."""
    out = tmp_path / "minilm"
    assert evaluate.main(["--set", f"eval.data_dir={SHARED_DATA}", "--set", "eval.tasks=[sts/stsb]", "--output", str(out)]) == 0
    score = json.loads((out / "results.json").read_text())["sts"]["stsb"]["spearman"]
    assert abs(score - 82.03) <= 0.1, score
