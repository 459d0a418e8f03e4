"""The quality gate without Ray: STS-B and SciFact from a mirror, a bag-of-words embedding
function, floors both ways (retrieval too), the cache under CORPUS_EMBED_CACHE, the run's own
preparation (no second model resolution), and missing data refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from operators.config.loading import load_config
from operators.evaluation.eval_data import read_jsonl
from operators.io import cache
from operators.io.sources import SourceError
from operators.model import resolution
from operators.model.prepare import prepare
from operators.run.gate import GateError, check_gate_data, run_gate
from tests.helpers import bag_of_words, make_bench


def gate_cfg(mirror, floor, retrieval_floor=0.0):
    return load_config(None, [f"eval.mirror={mirror}", "gate.tasks=[sts/stsb, SciFact]",
                              f"gate.min_scores={{sts/stsb: {floor}, SciFact: {retrieval_floor}}}"])


def test_the_gate_scores_against_its_floor_and_caches_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    bench = make_bench(tmp_path / "bench")
    gate_cfg = lambda *floors: globals()["gate_cfg"](bench, *floors)  # noqa: E731
    prepared = prepare(gate_cfg(1.0))
    calls: list = []
    fn = bag_of_words(calls=calls)
    monkeypatch.setattr(resolution, "resolve_model", lambda *a, **k: pytest.fail("the gate resolved the model again"))
    result = run_gate(gate_cfg(-100.0), prepared, fn)  # random gold scores: any floor below the score passes
    rows = read_jsonl(str(bench / "hf/datasets/mteb/stsbenchmark-sts/test.jsonl.gz"))
    a, b = fn.embed([r["sentence1"] for r in rows]), fn.embed([r["sentence2"] for r in rows])
    want = spearmanr((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1), [r["score"] for r in rows]).correlation * 100
    assert result.scores["sts/stsb"] == pytest.approx(want, abs=1e-3) and result.passed
    result.require_passed()
    assert list((tmp_path / "cache" / "gate" / prepared.fingerprint).glob("part-*.parquet"))
    high = run_gate(gate_cfg(99.0), prepared, fn)  # the same config: scored from the cache
    assert calls == [calls[0]] and not high.passed and high.failed == ["sts/stsb"]
    with pytest.raises(GateError, match=r"sts/stsb .* < 99.00"):
        high.require_passed()
    retrieval = run_gate(gate_cfg(-100.0, 99.0), prepared, fn)  # a retrieval floor (nDCG@10 x 100)
    assert retrieval.failed == ["SciFact"] and 0 < retrieval.scores["SciFact"] < 99
    assert run_gate(load_config(None), prepared, fn) is None


def test_missing_gate_data_fails_before_any_work(tmp_path):
    cfg = load_config(None, [f"eval.data_dir={tmp_path}", "gate.tasks=[sts/stsb]", "gate.min_scores={sts/stsb: 1}"])
    with pytest.raises(SourceError, match=r"STSBenchmark: none of test.jsonl.gz, .* in mteb/stsbenchmark-sts@b0fddb56ed78 \(the mirror .* \(eval.mirror"):
        check_gate_data(cfg)
