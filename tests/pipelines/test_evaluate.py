"""The evaluation stage: metrics against sklearn/scipy, a tiny benchmark folder end to end on
local Ray (cache, resume, reports), error messages, and the real MiniLM on STS-B."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import yaml

from pipelines import embed_corpus, evaluate
from tests.helpers import REPO, SHARED_DATA, make_bench, read_vectors

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
    assert mean["classification"]["mr"]["protocol"].startswith("SentEval: 3-fold CV")
    assert mean["classification"]["trec"]["protocol"].startswith("SentEval: C tuned by 3-fold CV on the training split")
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


def test_a_sweep_on_ray_and_its_best_config_runs_as_is(ray_local, tmp_path, tiny_bert, capsys):
    """evaluate.py --sweep: the variants in one Ray pass per forward group, the ranked reports, and
    best/config.yaml, which the corpus pipeline runs with the whitening artifact the sweep fitted."""
    bench = make_bench(tmp_path / "bench")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "default.yaml"),
        "set": {"model.name": tiny_bert, "eval.data_dir": str(bench), "eval.tasks": ["sts/stsb", "sts/sts13"],
                "whitening.corpus": str(SHARED_DATA / "wikitext-2" / "wiki.valid.raw"), "whitening.max_sentences": 100},
        "rank_by": "sts/sts13",
        "axes": {"extraction.layers": [[-1], [0]], "postprocess": [[], ["whiten"], [{"remove_top_pcs": 1}]]},
    }))
    out = tmp_path / "sweep-out"
    assert evaluate.main(["--sweep", str(sweep), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in result["variants"]]
    assert sorted(names) == sorted(["base", "whiten", "abtt D=1", "layers=[0]", "layers=[0], whiten", "layers=[0], abtt D=1"])
    assert [p["heads"] for p in result["passes"]] == [2] and result["passes"][0]["fit_texts"] == 100
    assert "| 1 | " + names[0] + " |" in printed and (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    best = out / "best" / "config.yaml"
    tree = yaml.safe_load(best.read_text())
    assert (tree["whitening"]["artifact"] is not None) == ("whiten" in names[0] or "abtt" in names[0])
    vectors = tmp_path / "vectors"
    args = ["--config", str(best), "--set", f"input.uri={REPO / 'configs' / 'sample_corpus'}/", "--set", f"output.uri={vectors}/"]
    assert embed_corpus.main(args) == 0
    import fsspec

    got = read_vectors(fsspec.filesystem("file"), str(vectors))
    assert len(got) > 20 and all(np.isfinite(v).all() for v in got.values())


def test_a_set_run_is_labelled_by_what_it_changes(ray_local, tmp_path, tiny_bert):
    out = tmp_path / "o"
    sets = ["--set", f"model.name={tiny_bert}", "--set", f"eval.data_dir={make_bench(tmp_path / 'bench')}",
            "--set", "eval.tasks=[sts/stsb]", "--set", "extraction.layers=[0]"]
    assert evaluate.main([*sets, "--output", str(out)]) == 0
    name = json.loads((out / "results.json").read_text())["name"]
    assert name == f"default: model={tiny_bert.rstrip('/').rsplit('/', 1)[-1]}, layers=[0]"
