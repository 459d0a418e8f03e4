"""Nightly incremental runs (issue 7) on a real local Ray: two runs over a corpus changed between
them, a config change into a new version, the quality gate, the LanceDB sink, the run log."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from operators.incremental import read_current, read_run_log
from pipelines.embed_corpus import GateError, run
from tests.conftest import SHARED_DATA, sample_sentences, write_jsonl
from tests.pipelines.test_embed_corpus import config, read_vectors

ROWS = 30


def corpus_v1(root):
    texts = sample_sentences(4 * ROWS)
    shards = {k: [{"id": f"s{k}-{i}", "text": texts[k * ROWS + i]} for i in range(ROWS)] for k in range(4)}
    for k, recs in shards.items():
        write_jsonl(root / f"part-{k}.jsonl", recs)
    return shards


def change_corpus(root, shards):
    """Shard 1: 3 documents edited, 2 removed, 1 added. Shard 3 deleted. Shard 4 added. 0 and 2 untouched."""
    s1 = [dict(r) for r in shards[1]]
    for i in (0, 5, 9):
        s1[i]["text"] = s1[i]["text"] + " (edited)"
    removed = [s1[12]["id"], s1[20]["id"]]
    s1 = [r for r in s1 if r["id"] not in removed] + [{"id": "s1-new", "text": "A document added to an existing shard."}]
    write_jsonl(root / "part-1.jsonl", s1)
    (root / "part-3.jsonl").unlink()
    new = [{"id": f"s4-{i}", "text": t} for i, t in enumerate(sample_sentences(ROWS + 200)[200:])]
    write_jsonl(root / "part-4.jsonl", new)
    edited = {s1[i]["id"] for i in (0, 5, 9)} | {"s1-new"}
    return edited, set(removed) | {r["id"] for r in shards[3]}, {r["id"] for r in new}


def current_dir(out):
    fs = fsspec.filesystem("file")
    cur = read_current(fs, str(out))
    return out / cur["version"]


def test_two_nightly_runs_reembed_only_what_changed(ray_local, tmp_path, minilm_path):
    lance = tmp_path / "lance"
    corpus = tmp_path / "corpus"
    shards = corpus_v1(corpus)
    out = tmp_path / "out"
    extra = ["output.versioned=true", f"sinks.lancedb.uri={lance}", "sinks.lancedb.table=docs"]
    cfg, _ = config(tmp_path, corpus, out, minilm_path, *extra)
    first = run(cfg)
    assert first["published"] and first["rows_written"] == 4 * ROWS
    fs = fsspec.filesystem("file")
    before = read_vectors(fs, str(current_dir(out)))

    edited, deleted, added = change_corpus(corpus, shards)
    second = run(cfg)
    assert second["version"] == first["version"]
    assert (second["shards_new"], second["shards_changed"], second["shards_skipped"], second["shards_deleted"]) == (1, 1, 2, 1)
    assert second["rows_reused"] == ROWS - 5  # shard 1 minus 3 edited and 2 removed
    assert second["rows_written"] - second["rows_reused"] == len(edited) + len(added)
    assert second["rows_deleted"] == len(deleted)

    after = read_vectors(fs, str(current_dir(out)))
    reused = set(after) & set(before) - edited
    for i in reused:  # kept, not recomputed: bit-identical
        assert np.array_equal(after[i], before[i])
    for i in edited - {"s1-new"}:
        assert not np.allclose(after[i], before[i], atol=1e-3)

    # deletions recorded with their reason
    run_report = second["report"]
    dels = pq.read_table(run_report["deletions_file"]).to_pylist()
    assert {d["id"] for d in dels} == deleted
    assert {d["reason"] for d in dels} == {"shard deleted", "document removed"}

    # equal to a from-scratch run over the changed corpus
    scratch_cfg, _ = config(tmp_path, corpus, tmp_path / "scratch", minilm_path)
    run(scratch_cfg)
    scratch = read_vectors(fs, str(tmp_path / "scratch"))
    assert set(scratch) == set(after)
    for i, v in scratch.items():
        np.testing.assert_allclose(after[i], v, atol=1e-5)

    # the run log and the reports
    log = read_run_log(fs, str(out))
    assert [e["status"] for e in log] == ["ok", "ok"]
    assert log[1]["counts"]["rows_reused"] == ROWS - 5 and log[1]["counts"]["rows_deleted"] == len(deleted)
    md = (out / "_runs" / f"{second['run_id']}.md").read_text()
    assert f"{ROWS - 5} reused" in md and f"{len(deleted)} deleted" in md
    assert json.loads((out / "_runs" / f"{second['run_id']}.json").read_text())["counts"]["rows_embedded"] == len(edited) + len(added)

    # LanceDB: exactly one row per id, deletions applied, vectors as in the Parquet shards
    import lancedb

    table = lancedb.connect(str(lance)).open_table("docs").to_arrow()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(after)
    assert second["sinks"]["lancedb"]["mode"] == "incremental"
    for i, v in zip(ids, table.column("vector").to_pylist()):
        np.testing.assert_allclose(v, after[i], atol=1e-6)

    # a third run with nothing changed touches nothing
    third = run(cfg)
    assert third["shards_embedded"] == 0 and third["rows_deleted"] == 0 and third["shards_skipped"] == 4


def test_config_change_writes_a_new_version_and_keeps_the_old(ray_local, tmp_path, tiny_bert):
    corpus = tmp_path / "corpus"
    corpus_v1(corpus)
    out = tmp_path / "out"
    cfg, _ = config(tmp_path, corpus, out, tiny_bert, "output.versioned=true")
    first = run(cfg)
    fs = fsspec.filesystem("file")
    old_dir = current_dir(out)
    old = read_vectors(fs, str(old_dir))
    cls_cfg, _ = config(tmp_path, corpus, out, tiny_bert, "output.versioned=true", "extraction.pooling=cls")
    second = run(cls_cfg)
    assert second["version"] != first["version"] and second["shards_embedded"] == 4 and second["rows_reused"] == 0
    assert current_dir(out).name == second["version"]
    kept = read_vectors(fs, str(old_dir))  # the old version is still whole and unchanged
    assert set(kept) == set(old) and all(np.array_equal(kept[i], old[i]) for i in old)
    assert second["previous_version"] == first["version"]


@pytest.mark.skipif(not (SHARED_DATA / "sts").exists(), reason="needs ../shared/data (STS-B)")
def test_quality_gate_blocks_publishing(ray_local, tmp_path, tiny_bert):
    corpus = tmp_path / "corpus"
    corpus_v1(corpus)
    out = tmp_path / "out"
    base = ["output.versioned=true", f"eval.data_dir={SHARED_DATA}", "gate.tasks=[sts/stsb]"]
    cfg, _ = config(tmp_path, corpus, out, tiny_bert, *base, "gate.min_scores={sts/stsb: -100}")
    ok = run(cfg)
    assert ok["gate"]["passed"] and ok["published"]
    strict, _ = config(tmp_path, corpus, out, tiny_bert, *base, "gate.min_scores={sts/stsb: 100}", "extraction.pooling=cls")
    with pytest.raises(GateError, match="sts/stsb"):
        run(strict)
    fs = fsspec.filesystem("file")
    assert read_current(fs, str(out))["version"] == ok["version"]  # not published
    log = read_run_log(fs, str(out))
    assert [e["status"] for e in log] == ["ok", "gate_failed"] and log[1]["published"] is False


def test_gate_and_sink_problems_fail_before_any_work(tmp_path, minilm_path, capsys):
    from pipelines.embed_corpus import main

    corpus = tmp_path / "corpus"
    corpus_v1(corpus)
    _, path = config(tmp_path, corpus, tmp_path / "out", minilm_path)
    gate = ["--set", "gate.tasks=[sts/stsb]", "--set", "gate.min_scores={sts/stsb: 70}"]
    assert main(["--config", str(path), *gate, "--set", f"eval.data_dir={tmp_path / 'no-benchmarks'}"]) == 2
    assert "no-benchmarks" in capsys.readouterr().err
    assert main(["--config", str(path), "--set", "gate.tasks=[sts/nope]", "--set", "gate.min_scores={sts/nope: 1}"]) == 2
    assert "sts/nope" in capsys.readouterr().err
    assert main(["--config", str(path), "--set", "gate.tasks=[sts/stsb]"]) == 2  # a gate without floors
    assert "min_scores" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.parquet"))  # nothing was embedded
