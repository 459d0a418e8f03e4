"""Held-out benchmarks: where each lives under `eval.data_dir`, and how to read it.

The layout is that of shared/data (any local path or fsspec URI with the same layout works):

    sts/raw/<name>.tsv, sts/senteval/<name>.tsv   score, sentence1, sentence2 (header line)
        sts12.MSRpar ... sts16.question-question (the yearly subsets), stsb.test, sickr.test
    clf/<name>.tsv                                label column(s) and text (header line)
        mr, cr, subj, mpqa (10-fold CV); trec.{train,test}, sst2.{train,test},
        banking77.{train,test} (given splits); stackoverflow, banking77.test, agnews.test (clustering)

A missing file or a malformed row raises EvalDataError naming the file and line.
"""

from __future__ import annotations

import csv
import posixpath
from dataclasses import dataclass, field

import fsspec
import numpy as np

STS_YEARS = {
    "sts12": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "sts13": ["FNWN", "headlines", "OnWN"],
    "sts14": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "sts15": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "sts16": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}
STS_TASKS = (*STS_YEARS, "stsb", "sickr")
CLUSTERING_TASKS = {  # name: (file, label column, text columns)
    "stackoverflow": ("clf/stackoverflow.tsv", "label", ("text",)),
    "banking77": ("clf/banking77.test.tsv", "label", ("text",)),
    "agnews": ("clf/agnews.test.tsv", "label", ("title", "description")),
}
CV_TASKS = {"mr": "clf/mr.tsv", "cr": "clf/cr.tsv", "subj": "clf/subj.tsv", "mpqa": "clf/mpqa.tsv"}
SPLIT_TASKS = {  # name: (train file, test file, label column)
    "trec": ("clf/trec.train.tsv", "clf/trec.test.tsv", "coarse_label"),
    "sst2": ("clf/sst2.train.tsv", "clf/sst2.test.tsv", "label"),
    "banking77": ("clf/banking77.train.tsv", "clf/banking77.test.tsv", "label"),
}
# tasks MTEB has, scored by its protocol (metrics.mteb_classification_accuracy): its settings per task
MTEB_CLASSIFICATION = {"banking77": {"experiments": 10, "samples_per_label": 8}}
ALL_TASKS = (
    *[f"sts/{t}" for t in STS_TASKS],
    *[f"clustering/{t}" for t in CLUSTERING_TASKS],
    *[f"classification/{t}" for t in (*CV_TASKS, *SPLIT_TASKS)],
)


class EvalDataError(ValueError):
    """A benchmark file that is missing or malformed; the message names the file and line."""


BenchmarkError = EvalDataError  # the earlier name


@dataclass
class Pairs:
    s1: list[str]
    s2: list[str]
    gold: np.ndarray


@dataclass
class Labelled:
    texts: list[str]
    labels: np.ndarray
    test_texts: list[str] = field(default_factory=list)  # empty: cross-validation
    test_labels: np.ndarray | None = None

    def all_texts(self) -> list[str]:
        return self.texts + self.test_texts


def _rows(uri: str, columns: tuple[str, ...]) -> list[list[str]]:
    try:
        f = fsspec.open(uri, "rt", encoding="utf-8", newline="").open()
    except FileNotFoundError as e:
        raise EvalDataError(f"{uri}: benchmark file not found (check eval.data_dir and the layout in the README)") from e
    with f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise EvalDataError(f"{uri}:1: empty file")
        missing = [c for c in columns if c not in header]
        if missing:
            raise EvalDataError(f"{uri}:1: header lacks {', '.join(missing)} (has {', '.join(header)})")
        idx = [header.index(c) for c in columns]
        out = []
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise EvalDataError(f"{uri}:{line}: expected {len(header)} tab-separated columns, got {len(row)}")
            out.append([row[i] for i in idx])
    return out


def read_pairs(uri: str) -> Pairs:
    rows = _rows(uri, ("score", "sentence1", "sentence2"))
    gold = []
    for line, r in enumerate(rows, start=2):
        try:
            gold.append(float(r[0]))
        except ValueError:
            raise EvalDataError(f"{uri}:{line}: score {r[0]!r} is not a number") from None
    return Pairs([r[1] for r in rows], [r[2] for r in rows], np.asarray(gold))


def sts_files(data_dir: str, task: str, variant: str) -> dict[str, str]:
    """subset name -> file for an STS task (a year has several subsets)."""
    base = posixpath.join(data_dir, "sts", variant)
    if task in STS_YEARS:
        return {sub: posixpath.join(base, f"{task}.{sub}.tsv") for sub in STS_YEARS[task]}
    return {"test": posixpath.join(base, f"{task}.test.tsv")}


def read_labelled(uri: str, label: str, text_cols: tuple[str, ...] = ("text",)) -> tuple[list[str], np.ndarray]:
    rows = _rows(uri, (label, *text_cols))
    texts = [" ".join(t for t in r[1:] if t) for r in rows]
    for line, t in enumerate(texts, start=2):
        if not t.strip():
            raise EvalDataError(f"{uri}:{line}: empty text")
    return texts, np.asarray([r[0] for r in rows])


def load_clustering(data_dir: str, task: str) -> Labelled:
    path, label, cols = CLUSTERING_TASKS[task]
    texts, labels = read_labelled(posixpath.join(data_dir, path), label, cols)
    return Labelled(texts, labels)


def load_classification(data_dir: str, task: str) -> Labelled:
    if task in CV_TASKS:
        texts, labels = read_labelled(posixpath.join(data_dir, CV_TASKS[task]), "label")
        return Labelled(texts, labels)
    train, test, label = SPLIT_TASKS[task]
    tr_x, tr_y = read_labelled(posixpath.join(data_dir, train), label)
    te_x, te_y = read_labelled(posixpath.join(data_dir, test), label)
    return Labelled(tr_x, tr_y, te_x, te_y)
