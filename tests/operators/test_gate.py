"""The quality gate without Ray: real STS-B, a bag-of-words embedding function, the floor both
ways, the cache under CORPUS_EMBED_CACHE, the run's own preparation (no second model resolution)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from operators import models
from operators.config import load_config
from operators.gate import GateError, check_gate_data, run_gate
from operators.prepare import prepare
from tests.helpers import SHARED_DATA, bag_of_words


def gate_cfg(floor):
    return load_config(None, [f"eval.data_dir={SHARED_DATA}", "gate.tasks=[sts/stsb]", f"gate.min_scores={{sts/stsb: {floor}}}"])


def test_the_gate_scores_against_its_floor_and_caches_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    prepared = prepare(gate_cfg(1.0))
    calls: list = []
    fn = bag_of_words(calls=calls)
    monkeypatch.setattr(models, "resolve_model", lambda *a, **k: pytest.fail("the gate resolved the model again"))
    result = run_gate(gate_cfg(1.0), prepared, fn)
    rows = [line.split("\t") for line in (SHARED_DATA / "sts" / "raw" / "stsb.test.tsv").read_text().splitlines()[1:]]
    a, b = fn.embed([r[1] for r in rows]), fn.embed([r[2] for r in rows])
    want = spearmanr((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1), [float(r[0]) for r in rows]).correlation * 100
    assert result.scores["sts/stsb"] == pytest.approx(want, abs=1e-3) and result.passed
    result.require_passed()
    assert list((tmp_path / "cache" / "gate" / prepared.fingerprint).glob("part-*.parquet"))
    high = run_gate(gate_cfg(99.0), prepared, fn)  # the same config: scored from the cache
    assert calls == [calls[0]] and not high.passed and high.failed == ["sts/stsb"]
    with pytest.raises(GateError, match=r"sts/stsb .* < 99.00"):
        high.require_passed()
    assert run_gate(load_config(None), prepared, fn) is None


def test_missing_gate_data_fails_before_any_work(tmp_path):
    cfg = load_config(None, [f"eval.data_dir={tmp_path}", "gate.tasks=[sts/stsb]", "gate.min_scores={sts/stsb: 1}"])
    with pytest.raises(Exception, match="benchmark file not found"):
        check_gate_data(cfg)
