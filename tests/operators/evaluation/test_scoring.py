"""Scoring without Ray or a model: a bag-of-words embedding function against scipy and numpy
computed directly (STS Spearman, retrieval nDCG@10 through mteb's own evaluators), the query
instruction's own pass, and the embedding cache: one pass, parts as batches arrive, resume."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from operators.config.loading import load_config
from operators.config.schema import ConfigError
from operators.evaluation.eval_data import read_jsonl, read_qrels
from operators.evaluation.scoring import embed_cached, evaluate, query_config, text_key
from operators.model.prepare import prepare
from tests.helpers import bag_of_words, make_bench

TASKS = "eval.tasks=[sts/stsb, STS13, SciFact, clustering/banking77, classification/mr, classification/trec]"


def ndcg_at_10(q_vecs, d_vecs, doc_ids, qrels) -> float:
    """nDCG@10 by hand: cosine ranking, binary gains, the ideal from the qrels."""
    q = q_vecs / np.linalg.norm(q_vecs, axis=1, keepdims=True)
    d = d_vecs / np.linalg.norm(d_vecs, axis=1, keepdims=True)
    out = []
    for row, rel in zip(q @ d.T, qrels):
        top = [doc_ids[i] for i in np.argsort(-row, kind="stable")[:10]]
        dcg = sum(rel.get(doc, 0) / np.log2(r + 2) for r, doc in enumerate(top))
        ideal = sum(g / np.log2(r + 2) for r, g in enumerate(sorted(rel.values(), reverse=True)[:10]))
        out.append(dcg / ideal)
    return float(np.mean(out)) * 100


@pytest.fixture
def bench_cfg(tmp_path, tiny_bert):
    bench = make_bench(tmp_path / "bench")
    cfg = load_config(None, [f"model.name={tiny_bert}", f"eval.mirror={bench}", TASKS, "eval.folds=3", "eval.chunk=50"])
    return bench, cfg, prepare(cfg)


def test_scores_equal_a_direct_computation(bench_cfg, tmp_path):
    bench, cfg, prepared = bench_cfg
    calls: list = []
    fn = bag_of_words(calls=calls)
    result = evaluate(cfg, prepared, fn, str(tmp_path / "cache"), mteb_dir=str(tmp_path / "mteb"))
    assert len(calls) == 1 and calls[0] == result["timings"]["texts"]  # one pass over the unique texts
    assert result["timings"]["embedded_on_demand"] == 0  # mteb asked for nothing the prefetch missed
    rows = read_jsonl(str(bench / "hf/datasets/mteb/stsbenchmark-sts/test.jsonl.gz"))
    a, b = fn.embed([r["sentence1"] for r in rows]), fn.embed([r["sentence2"] for r in rows])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    want = spearmanr(cos, [r["score"] for r in rows]).correlation * 100
    tasks = result["tasks"]
    assert list(tasks) == ["STSBenchmark", "STS13", "SciFact", "clustering/banking77", "classification/mr", "classification/trec"]
    assert tasks["STSBenchmark"]["score"] == pytest.approx(want, abs=1e-6) and tasks["STSBenchmark"]["metric"] == "cosine_spearman"
    docs = read_jsonl(str(bench / "hf/datasets/mteb/scifact/corpus.jsonl"))
    queries = read_jsonl(str(bench / "hf/datasets/mteb/scifact/queries.jsonl"))
    qrels = read_qrels(str(bench / "hf/datasets/mteb/scifact/qrels/test.tsv"))
    want = ndcg_at_10(fn.embed([q["text"] for q in queries]), fn.embed([f"{d['title']} {d['text']}" for d in docs]),
                      [d["_id"] for d in docs], [qrels[q["_id"]] for q in queries])
    assert tasks["SciFact"]["score"] == pytest.approx(want, abs=1e-3)  # mteb rounds retrieval metrics to 5 decimals and tasks["SciFact"]["metric"] == "ndcg_at_10"
    assert tasks["SciFact"]["mteb_result"].endswith(f"{prepared.fingerprint}/SciFact.json")
    assert tasks["classification/mr"]["protocol"].startswith("SentEval: 3-fold CV")
    assert tasks["classification/trec"]["protocol"].startswith("SentEval: C tuned by 3-fold CV")
    assert tasks["clustering/banking77"]["protocol"].startswith("MTEB")
    assert result["config_fingerprint"] == prepared.fingerprint


def test_mteb_reads_its_results_back(bench_cfg, tmp_path):
    import mteb

    bench, cfg, prepared = bench_cfg
    evaluate(cfg, prepared, bag_of_words(), str(tmp_path / "cache"), mteb_dir=str(tmp_path / "mteb"))
    loaded = mteb.ResultCache(tmp_path / "mteb").load_results(include_remote=False)
    (model,) = loaded.model_results
    assert model.model_revision == prepared.fingerprint
    assert {r.task_name for r in model.task_results} == {"STSBenchmark", "STS13", "SciFact"}


def test_queries_take_their_own_instruction(tmp_path, tiny_bert):
    bench = make_bench(tmp_path / "bench")
    sets = [f"model.name={tiny_bert}", f"eval.mirror={bench}", "eval.tasks=[SciFact]", "extraction.instruction='passage: '"]
    cfg = load_config(None, [*sets, "eval.query_instruction='query: '"])
    assert query_config(load_config(None, sets)) is None
    qcfg = query_config(cfg)
    assert qcfg.extraction.instruction == "query: "
    prepared, q_prepared = prepare(cfg), prepare(qcfg)
    assert prepared.fingerprint != q_prepared.fingerprint
    doc_calls, query_calls = [], []
    with pytest.raises(ConfigError, match="eval.query_instruction"):
        evaluate(cfg, prepared, bag_of_words(), str(tmp_path / "c0"))
    result = evaluate(cfg, prepared, bag_of_words(calls=doc_calls), str(tmp_path / "cache"),
                      query_side=(q_prepared, bag_of_words(calls=query_calls)), mteb_dir=str(tmp_path / "mteb"))
    assert doc_calls == [12] and query_calls == [4]  # the documents and the queries, each in their own pass
    assert 0 <= result["tasks"]["SciFact"]["score"] <= 100


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
