"""Scoring without Ray or a model: a bag-of-words embedding function against scipy and sklearn
computed directly, and the embedding cache: one pass, parts as batches arrive, resume."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from operators.config import load_config
from operators.evaluation import embed_cached, evaluate, text_key
from operators.prepare import prepare
from tests.helpers import bag_of_words, make_bench

TASKS = "eval.tasks=[sts/stsb, sts/sts13, clustering/banking77, classification/mr, classification/trec]"


@pytest.fixture
def bench_cfg(tmp_path, tiny_bert):
    bench = make_bench(tmp_path / "bench")
    cfg = load_config(None, [f"model.name={tiny_bert}", f"eval.data_dir={bench}", TASKS, "eval.folds=3", "eval.chunk=50"])
    return bench, cfg, prepare(cfg)


def test_scores_equal_a_direct_computation(bench_cfg, tmp_path):
    bench, cfg, prepared = bench_cfg
    calls: list = []
    fn = bag_of_words(calls=calls)
    result = evaluate(cfg, prepared, fn, str(tmp_path / "cache"))
    assert len(calls) == 1 and calls[0] == result["timings"]["texts"]  # one pass over the unique texts
    rows = [line.split("\t") for line in (bench / "sts" / "raw" / "stsb.test.tsv").read_text().splitlines()[1:]]
    a, b = fn.embed([r[1] for r in rows]), fn.embed([r[2] for r in rows])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    want = spearmanr(cos, [float(r[0]) for r in rows]).correlation * 100
    assert result["sts"]["stsb"]["spearman"] == pytest.approx(want, abs=1e-3)
    assert result["sts"]["sts13"]["mean"] == pytest.approx(np.mean(list(result["sts"]["sts13"]["subsets"].values())))
    assert result["classification"]["mr"]["protocol"].startswith("SentEval: 3-fold CV")
    assert result["classification"]["trec"]["protocol"].startswith("SentEval: C tuned by 3-fold CV")
    assert result["clustering"]["banking77"]["protocol"].startswith("MTEB")
    assert result["config_fingerprint"] == prepared.fingerprint


def test_the_cache_is_written_as_batches_arrive_and_a_crash_resumes(tmp_path):
    texts = [f"sentence number {i} about things" for i in range(100)]
    fn = bag_of_words(batch=16)

    def crashing(keys, texts):
        for n, batch in enumerate(fn(keys, texts)):
            if n == 4:
                raise RuntimeError("the cluster went away")
            yield batch

    with pytest.raises(RuntimeError):
        embed_cached(texts, crashing, str(tmp_path / "c"), chunk=32)
    parts = sorted((tmp_path / "c").glob("part-*.parquet"))
    assert [len(pq.read_table(p)) for p in parts] == [32, 32]  # 64 vectors arrived before the crash, in 2 parts
    calls: list = []
    got = embed_cached(texts, bag_of_words(batch=16, calls=calls), str(tmp_path / "c"), chunk=32)
    assert calls == [36] and len(got) == 100  # only what no part held
    np.testing.assert_allclose(np.stack([got[text_key(t)] for t in texts]), fn.embed(texts), rtol=1e-6)
    calls.clear()
    embed_cached(texts, bag_of_words(calls=calls), str(tmp_path / "c"), chunk=32)
    assert calls == []  # all cached: nothing embedded
