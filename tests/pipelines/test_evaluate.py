"""The evaluation stage: a tiny mirror end to end on local Ray (MTEB's tasks and ours, cache,
reports, MTEB's result files), errors before any work, and the real MiniLM on the real data
(through the mirror) against MTEB's leaderboard and sentence-transformers + mteb."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import embed_corpus, evaluate
from tests.helpers import MIRROR, REPO, fit_corpus, make_bench, needs_mirror, read_vectors

TASKS = "eval.tasks=[sts/stsb, STS13, SciFact, clustering/banking77, classification/mr, classification/trec]"


def test_two_configs_end_to_end_on_ray(ray_local, tmp_path, tiny_bert, capsys):
    """Every task kind, two configs compared, the reports, one cache folder per config fingerprint
    (the cache and resume logic itself: tests/operators/evaluation/test_scoring.py, without Ray)."""
    bench = make_bench(tmp_path / "bench")
    cfgs = []
    for pooling in ("mean", "cls"):
        p = tmp_path / f"{pooling}.yaml"
        p.write_text(f"extends: {REPO / 'configs' / 'default.yaml'}\nextraction: {{pooling: {pooling}}}\n")
        cfgs += ["--config", str(p)]
    out = tmp_path / "cmp"
    sets = ["--set", f"model.name={tiny_bert}", "--set", f"eval.mirror={bench}", "--set", TASKS, "--set", "eval.folds=3"]
    assert evaluate.main([*cfgs, *sets, "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["comparison"]] == ["mean", "cls"]
    mean, cls = results["comparison"]
    assert mean["tasks"]["STSBenchmark"]["score"] != cls["tasks"]["STSBenchmark"]["score"]
    assert list(mean["tasks"]) == ["STSBenchmark", "STS13", "SciFact", "clustering/banking77", "classification/mr", "classification/trec"]
    assert 0 <= mean["tasks"]["SciFact"]["score"] <= 100 and mean["tasks"]["SciFact"]["metric"] == "ndcg_at_10"
    assert 0 <= mean["tasks"]["clustering/banking77"]["score"] <= 100
    assert mean["tasks"]["classification/mr"]["protocol"].startswith("SentEval: 3-fold CV")
    assert mean["tasks"]["classification/trec"]["protocol"].startswith("SentEval: C tuned by 3-fold CV on the training split")
    assert mean["model"]["name"] == tiny_bert and mean["timings"]["texts"] > 0 and mean["timings"]["embedded_on_demand"] == 0
    md = (out / "results.md").read_text()
    assert "| task | mean | cls |" in md and "| STSBenchmark |" in md and md in capsys.readouterr().out
    for r in results["comparison"]:  # MTEB's own result files, one folder per configuration
        for task in ("STSBenchmark", "STS13", "SciFact"):
            saved = json.loads(open(r["tasks"][task]["mteb_result"]).read())
            assert saved["task_name"] == task and saved["scores"]["test"][0]["main_score"] * 100 == pytest.approx(r["tasks"][task]["score"], abs=1e-3)
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    for r in results["comparison"]:
        parts = list((out / "cache" / r["config_fingerprint"]).glob("part-*.parquet"))
        assert parts and sum(len(pq.read_table(p)) for p in parts) == r["timings"]["texts"]


def test_bad_names_and_missing_data_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("operators.model.prepare.prepare", lambda *a, **k: pytest.fail("work started"))
    assert evaluate.main(["--set", f"eval.mirror={tmp_path}", "--set", "eval.tasks=[STSBenchmark, SciFakt]", "--output", str(tmp_path / "o")]) == 2
    assert "unknown task SciFakt (did you mean SciFact" in capsys.readouterr().err
    assert evaluate.main(["--set", f"eval.mirror={tmp_path}", "--set", "eval.tasks=[sts/stsb]", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "STSBenchmark: none of test.jsonl.gz" in err and f"the mirror {tmp_path} (eval.mirror (or CORPUS_EMBED_MIRROR))" in err
    from tests.helpers import free_port

    mirror = f"http://reader:hunter2pass@127.0.0.1:{free_port()}/mirror"  # credentials in the mirror's URI, nothing listening
    assert evaluate.main(["--set", f"eval.mirror={mirror}", "--set", "eval.tasks=[sts/stsb]", "--output", str(tmp_path / "o")]) == 2
    printed = capsys.readouterr()
    assert "cannot reach the mirror http://***@127.0.0.1" in printed.err and "hunter2pass" not in printed.err + printed.out


def test_benchmarks_never_feed_a_fitted_step(tmp_path, capsys):
    """The exact path, a glob that spells the folder otherwise, a link to it, a calibration corpus:
    each refused, comparing the files they read."""
    bench = make_bench(tmp_path / "bench")
    (tmp_path / "link").symlink_to(bench / "senteval")
    for setting in (f"whitening.corpus={bench}/senteval/MR/rt-polarity.pos", f"whitening.corpus={bench}/sen?eval/MR/*",
                    f"whitening.corpus={tmp_path}/link", f"model.calibration_corpus={bench}/hf/datasets/mteb/sts1?-sts/*"):
        args = ["--set", setting, "--set", f"eval.mirror={bench}", "--set", "eval.tasks=[sts/stsb]", "--output", str(tmp_path / "o")]
        if setting.startswith("model."):
            args += ["--set", "model.engine=onnx", "--set", "model.quantization=int8"]
        assert evaluate.main(args) == 2, setting
        assert "inside the benchmarks" in capsys.readouterr().err, setting


@needs_mirror
def test_minilm_reproduces_the_mteb_stsb_score(ray_local, tmp_path):
    """all-MiniLM-L6-v2, mean pooling, STS-B test from MTEB's data through the mirror: MTEB's leaderboard gives 82.03."""
    out = tmp_path / "minilm"
    assert evaluate.main(["--set", f"eval.mirror={MIRROR}", "--set", "eval.tasks=[STSBenchmark]", "--output", str(out)]) == 0
    score = json.loads((out / "results.json").read_text())["tasks"]["STSBenchmark"]["score"]
    assert abs(score - 82.03) <= 0.1, score


@needs_mirror
@pytest.mark.slow
def test_minilm_on_scifact_reproduces_sentence_transformers_and_mteb(ray_local, tmp_path, minilm_path):
    """SciFact's 5,183 documents through the corpus pipeline on Ray, nDCG@10 by mteb's evaluator,
    against sentence-transformers' encode scored by mteb on the same data (about 6 minutes)."""
    import mteb
    from sentence_transformers import SentenceTransformer

    from operators.evaluation.mteb_tasks import load_mteb_task
    from operators.io.sources import Sources

    out = tmp_path / "scifact"
    assert evaluate.main(["--set", f"eval.mirror={MIRROR}", "--set", "eval.tasks=[SciFact]", "--output", str(out)]) == 0
    ours = json.loads((out / "results.json").read_text())["tasks"]["SciFact"]["score"]
    task = load_mteb_task("SciFact", Sources(str(MIRROR), str(tmp_path / "c")))
    st = SentenceTransformer(minilm_path, device="cpu")
    want = mteb.evaluate(st, task, cache=None, co2_tracker=False, show_progress_bar=False).task_results[0].get_score() * 100
    assert abs(ours - want) <= 0.1, (ours, want)


def test_a_sweep_on_ray_and_its_best_config_runs_as_is(ray_local, tmp_path, tiny_bert, capsys):
    """evaluate.py --sweep: the variants in one Ray pass per forward group, the ranked reports, and
    best/config.yaml, which the corpus pipeline runs with the whitening artifact the sweep fitted."""
    bench = make_bench(tmp_path / "bench")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "default.yaml"),
        "set": {"model.name": tiny_bert, "eval.mirror": str(bench), "eval.tasks": ["sts/stsb", "SciFact"],
                "whitening.corpus": fit_corpus(tmp_path / "fit"), "whitening.max_sentences": 100},
        "rank_by": "SciFact",
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
    sets = ["--set", f"model.name={tiny_bert}", "--set", f"eval.mirror={make_bench(tmp_path / 'bench')}",
            "--set", "eval.tasks=[sts/stsb]", "--set", "extraction.layers=[0]"]
    assert evaluate.main([*sets, "--output", str(out)]) == 0
    name = json.loads((out / "results.json").read_text())["name"]
    assert name == f"default: model={tiny_bert.rstrip('/').rsplit('/', 1)[-1]}, layers=[0]"
