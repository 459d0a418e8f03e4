"""The evaluation stage: metrics against sklearn/scipy, a tiny benchmark folder end to end on
local Ray (cache, resume, reports), error messages, and the real MiniLM on STS-B."""

from __future__ import annotations

import json

import numpy as np
import pytest
from operators.eval_data import EvalDataError, read_pairs
from scipy.stats import spearmanr
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import v_measure_score
from sklearn.preprocessing import StandardScaler

from operators.metrics import classification_accuracy, clustering_v_measure, sts_spearman
from pipelines import evaluate
from tests.helpers import REPO, SHARED_DATA, sample_sentences


def test_metrics_against_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 4
    labels = np.repeat(np.arange(4), 50)
    x = centers[labels] + rng.normal(size=(200, 8))
    pred = MiniBatchKMeans(n_clusters=4, batch_size=500, n_init=3, random_state=42).fit_predict(x)
    assert clustering_v_measure(x, labels) == pytest.approx(v_measure_score(labels, pred) * 100)
    y = (x[:, 0] > 0).astype(int)
    xs = StandardScaler().fit(x[:150]).transform
    direct = (LogisticRegression(max_iter=2000, random_state=42).fit(xs(x[:150]), y[:150]).predict(xs(x[150:])) == y[150:]).mean()
    assert classification_accuracy(x[:150], y[:150], x[150:], y[150:]) == pytest.approx(direct * 100)
    a, b, gold = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)), rng.uniform(size=30)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert sts_spearman(a, b, gold) == pytest.approx(spearmanr(cos, gold).correlation * 100)


def make_bench(root):
    """A tiny benchmark folder in shared/data's layout."""
    s = sample_sentences(120)
    (root / "sts" / "raw").mkdir(parents=True)
    rng = np.random.default_rng(1)
    pairs = "".join(f"{rng.uniform(0, 5):.2f}\t{s[i]}\t{s[i + 1]}\n" for i in range(0, 40, 2))
    for name in ("stsb.test", "sts13.FNWN", "sts13.headlines", "sts13.OnWN"):
        (root / "sts" / "raw" / f"{name}.tsv").write_text("score\tsentence1\tsentence2\n" + pairs)
    (root / "clf").mkdir()
    (root / "clf" / "mr.tsv").write_text("label\ttext\n" + "".join(f"{i % 2}\t{t}\n" for i, t in enumerate(s[:60])))
    (root / "clf" / "banking77.test.tsv").write_text("label\ttext\n" + "".join(f"c{i % 3}\t{t}\n" for i, t in enumerate(s[60:90])))
    (root / "clf" / "trec.train.tsv").write_text("coarse_label\tfine_label\ttext\n" + "".join(f"A{i % 2}\tx\t{t}\n" for i, t in enumerate(s[:40])))
    (root / "clf" / "trec.test.tsv").write_text("coarse_label\tfine_label\ttext\n" + "".join(f"A{i % 2}\tx\t{t}\n" for i, t in enumerate(s[40:60])))
    return root


TASKS = "eval.tasks=[sts/stsb, sts/sts13, clustering/banking77, classification/mr, classification/trec]"


def test_tiny_benchmark_end_to_end_with_cache(ray_local, tmp_path, tiny_bert, capsys):
    bench = make_bench(tmp_path / "bench")
    out = tmp_path / "eval"
    sets = ["--set", f"model.name={tiny_bert}", "--set", f"eval.data_dir={bench}", "--set", TASKS, "--set", "eval.folds=3", "--set", "eval.chunk=50"]
    assert evaluate.main([*sets, "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["sts"]) == {"stsb", "sts13"}
    assert -100 <= results["sts"]["stsb"]["spearman"] <= 100 and results["sts"]["stsb"]["pairs"] == 20
    assert set(results["sts"]["sts13"]) >= {"all", "mean", "subsets"} and len(results["sts"]["sts13"]["subsets"]) == 3
    assert 0 <= results["clustering"]["banking77"]["v_measure"] <= 100
    assert results["classification"]["mr"]["protocol"] == "3-fold CV"
    assert results["classification"]["trec"]["protocol"] == "train/test split"
    assert results["config_fingerprint"] and results["timings"]["texts"] > 0 and results["model"]["name"] == tiny_bert
    assert "| STS stsb |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    parts = sorted((out / "cache" / results["config_fingerprint"]).glob("part-*.parquet"))
    assert len(parts) >= 2  # chunked: the unit of resume

    # a crash after the first chunk: delete later chunks, rerun, same scores, only those re-embedded
    for p in parts[1:]:
        p.unlink()
    capsys.readouterr()
    assert evaluate.main([*sets, "--output", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["sts"]["stsb"]["spearman"] == pytest.approx(results["sts"]["stsb"]["spearman"], abs=1e-4)
    assert again["classification"] == results["classification"]


def test_comparison_of_two_configs(ray_local, tmp_path, tiny_bert):
    bench = make_bench(tmp_path / "bench")
    cfgs = []
    for pooling in ("mean", "cls"):
        p = tmp_path / f"{pooling}.yaml"
        p.write_text(f"extends: {REPO / 'configs' / 'default.yaml'}\nextraction: {{pooling: {pooling}}}\n")
        cfgs += ["--config", str(p)]
    out = tmp_path / "cmp"
    assert evaluate.main([*cfgs, "--set", f"model.name={tiny_bert}", "--set", f"eval.data_dir={bench}", "--set", "eval.tasks=[sts/stsb]", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["comparison"]] == ["mean", "cls"]
    assert results["comparison"][0]["sts"]["stsb"]["spearman"] != results["comparison"][1]["sts"]["stsb"]["spearman"]
    assert "| task | mean | cls |" in (out / "results.md").read_text()


def test_missing_and_malformed_benchmarks_name_file_and_line(tmp_path, capsys):
    (tmp_path / "bad.tsv").write_text("score\tsentence1\tsentence2\n1.0\ta\tb\nnot-a-number\tc\td\n")
    with pytest.raises(EvalDataError, match=r"bad.tsv:3: score 'not-a-number'"):
        read_pairs(str(tmp_path / "bad.tsv"))
    (tmp_path / "short.tsv").write_text("score\tsentence1\tsentence2\n1.0\tonly two\n")
    with pytest.raises(EvalDataError, match=r"short.tsv:2: expected 3 tab-separated columns, got 2"):
        read_pairs(str(tmp_path / "short.tsv"))
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
