"""Task names (MTEB's, ours, the earlier ones) and the readers of the tasks MTEB lacks: on the real
sources they give exactly the normalized TSVs the earlier releases scored (when a mirror is set)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from operators.evaluation.eval_data import ALL_TASKS, EvalDataError, canonical, check_task_names, load_own, read_pairs, read_qrels
from operators.io.sources import Sources, corpus_files
from tests.helpers import MIRROR, make_bench, needs_mirror


def test_names_resolve_to_mteb_and_ours():
    assert check_task_names(["sts/stsb", "STSBenchmark", "sts/sickr", "SciFact", "clustering/agnews"]) == [
        "STSBenchmark", "SICK-R", "SciFact", "clustering/agnews"]
    assert canonical("classification/banking77") == "Banking77Classification"
    assert len(check_task_names(ALL_TASKS)) == 17
    with pytest.raises(EvalDataError, match=r"unknown task STSBenchmarks \(did you mean STSBenchmark"):
        check_task_names(["STSBenchmarks"])


def test_named_corpora_pin_wikitext():
    (f,) = corpus_files("wikitext-2")
    assert f.upstream == "hf://datasets/Salesforce/wikitext@b08601e04326c79dfdd32d625aee71d232d685c3/wikitext-2-raw-v1/validation-00000-of-00001.parquet"
    assert [x.path for x in corpus_files("wikitext-103-raw-v1/train")] == [
        "wikitext-103-raw-v1/train-00000-of-00002.parquet", "wikitext-103-raw-v1/train-00001-of-00002.parquet"]
    assert corpus_files("wiki.valid.raw") is None


def test_pair_files_and_qrels_name_file_and_line(tmp_path):
    (tmp_path / "bad.tsv").write_text("score\tsentence1\tsentence2\n1.0\ta\tb\nnot-a-number\tc\td\n")
    with pytest.raises(EvalDataError, match=r"bad.tsv:3: score 'not-a-number'"):
        read_pairs(str(tmp_path / "bad.tsv"))
    (tmp_path / "q.tsv").write_text("query-id\tcorpus-id\tscore\r\n1\t2\t1\r\n1\t3\r\n")
    with pytest.raises(EvalDataError, match=r"q.tsv:3: expected 3 tab-separated columns"):
        read_qrels(str(tmp_path / "q.tsv"))
    (tmp_path / "q.tsv").write_text("query-id\tcorpus-id\tscore\r\n1\t2\t1\r\n1\t3\t2\r\n")
    assert read_qrels(str(tmp_path / "q.tsv")) == {"1": {"2": 1, "3": 2}}


def test_our_tasks_read_from_a_mirror(tmp_path):
    bench = make_bench(tmp_path / "m")
    src = Sources(str(bench), str(tmp_path / "c"))
    mr = load_own(src, "classification/mr")
    assert len(mr.texts) == 60 and mr.labels.tolist() == ["1"] * 30 + ["0"] * 30
    trec = load_own(src, "classification/trec")
    assert (len(trec.texts), len(trec.test_texts)) == (40, 20) and set(trec.labels) == {"A0", "A1"}
    assert not trec.texts[0].startswith("x ")  # the fine label dropped, as SentEval reads it
    assert set(load_own(src, "clustering/banking77").labels) == {"c0", "c1", "c2"}


def tsv(name):
    with open(MIRROR / "clf" / name, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows


@needs_mirror
@pytest.mark.parametrize("task,files", [
    ("classification/mr", ["mr.tsv"]), ("classification/cr", ["cr.tsv"]), ("classification/subj", ["subj.tsv"]),
    ("classification/mpqa", ["mpqa.tsv"]), ("classification/trec", ["trec.train.tsv", "trec.test.tsv"]),
    ("classification/sst2", ["sst2.train.tsv", "sst2.test.tsv"]), ("clustering/stackoverflow", ["stackoverflow.tsv"]),
    ("clustering/agnews", ["agnews.test.tsv"]), ("clustering/banking77", ["banking77.test.tsv"]),
])
def test_the_originals_read_as_the_earlier_normalized_files(task, files, tmp_path):
    """The verbatim sources (checked against their pinned SHA-256) give the rows of the normalized
    TSVs the evaluation read before (as sets of (label, text): the TSVs' own order differs for some;
    whitespace aside: the TSVs collapsed it, MTEB's Banking77 keeps it, and AG News's literal '\\n'
    stays as the source has it)."""
    got = load_own(Sources(str(MIRROR), str(tmp_path)), task)
    label = "coarse_label" if "trec" in task else "label_name" if task in ("clustering/stackoverflow",) else "label"
    for part, name in zip([(got.texts, got.labels), (got.test_texts, got.test_labels)], files):
        rows = tsv(name)
        text = (lambda r: " ".join(t for t in (r["title"], r["description"]) if t)) if "agnews" in name else (lambda r: r["text"])
        want = [(r[label], text(r)) for r in rows]
        if task == "clustering/stackoverflow":
            want = [(r["label"], r["text"]) for r in rows]
        same = lambda t: " ".join(t.replace("\\n", " ").split())  # noqa: E731 (the TSVs collapsed whitespace; AG News's: a literal \\n too)
        assert sorted((y, same(t)) for y, t in zip(part[1].tolist(), part[0])) == sorted((y, same(t)) for y, t in want)
    if task in ("classification/mr", "classification/trec"):
        assert len(np.unique(got.labels)) == (2 if task.endswith("mr") else 6)
