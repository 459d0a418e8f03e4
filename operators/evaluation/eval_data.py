"""The evaluation tasks: their names, their public sources at pinned revisions, and how to read them.

Two kinds of task:
- MTEB's, by MTEB's name (STS12-16, STSBenchmark, SICK-R, Banking77Classification, SciFact, any
  other MTEB STS, classification or BEIR-layout retrieval task): the files of the Hub repo at the
  revision mteb's own task metadata pins, read through `sources.Sources` and handed to the mteb
  task, which scores them with its own evaluator (operators/evaluation/mteb_tasks.py).
- ours, for what MTEB lacks (short-text clustering on StackOverflow, Banking77, AG News; SentEval's
  MR, CR, SUBJ, MPQA, TREC, SST-2): the original files from their public repositories at a
  commit, checked against the SHA-256 pinned here, scored by the reference protocols in metrics.py.

Earlier names still work: sts/stsb is STSBenchmark, sts/sickr SICK-R, sts/sts12 STS12, ...,
classification/banking77 Banking77Classification.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
from dataclasses import dataclass, field

import numpy as np

from operators.io.sources import SourceError, SourceFile, Sources, github_file, hub_file


class EvalDataError(ValueError):
    """A benchmark file that is missing or malformed; the message names the file and line."""


BenchmarkError = EvalDataError  # the earlier name

# -- names -----------------------------------------------------------------------------------------

STS_YEARS = ("STS12", "STS13", "STS14", "STS15", "STS16")
STS_SEVEN = (*STS_YEARS, "STSBenchmark", "SICK-R")  # 'sts/avg': the mean of these seven
LEGACY = {
    **{f"sts/sts1{i}": f"STS1{i}" for i in range(2, 7)},
    "sts/stsb": "STSBenchmark", "sts/sickr": "SICK-R", "classification/banking77": "Banking77Classification",
}

# tasks MTEB lacks: name -> (kind, reader)
SENTEVAL = ("robertoviegas/SimCSE", "a0d98a537ceffe5f728077dd0930c41171db2d16", "SentEval/data/downstream")
SENTEVAL_TREC = ("leotmc/simcse", "e0b62fcef5dadeeef55aef3b640ab219860c201b", "SentEval/data/downstream")


def senteval_file(folder_file: str, sha256: str, origin: tuple = SENTEVAL) -> SourceFile:
    repo, commit, base = origin
    return github_file(repo, commit, f"{base}/{folder_file}", f"senteval/{folder_file}", sha256)


SENTEVAL_FILES = {
    "mr": (senteval_file("MR/rt-polarity.pos", "34e5b0da2d491e46b700b00afe735aaae0962bcfe4f7f22b2d8077e714fa370f"),
           senteval_file("MR/rt-polarity.neg", "c4ac36eaa8adc8ee31c31f69594bfbe68d83ef5b6db53f1f19b28c0be52f3999")),
    "cr": (senteval_file("CR/custrev.pos", "91a20a4ffeb5d38a39a4087bb247e16538aff21e7d621ae59738379f39f21732"),
           senteval_file("CR/custrev.neg", "ec94532766f6f962094841ab3bee2ad6f232f996c3756825a91e78bcc294750f")),
    "subj": (senteval_file("SUBJ/subj.objective", "d8ccd43f1674f1c17e4ab717564e3561cfb719b0db4cfb19e5677427c68ff8a1"),
             senteval_file("SUBJ/subj.subjective", "274c2ffe59c204dc4df779848561786f59a98cc20dda3cfdd7d9f76a4f730710")),
    "mpqa": (senteval_file("MPQA/mpqa.pos", "7487dbb74c77383e60b292845495163a9e21fb70a4fdacdda933413e43163f0d"),
             senteval_file("MPQA/mpqa.neg", "8da6e035fa4cea02f0555091096b29a6b3995ff0adf41fad25008dcee066b79e")),
    "trec": (senteval_file("TREC/train_5500.label", "9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3", SENTEVAL_TREC),
             senteval_file("TREC/TREC_10.label", "86ad53c8fc9d397ab2f4be7c967d8efb470b260140557d3e57afad69d1b88b76", SENTEVAL_TREC)),
    "sst2": (senteval_file("SST/binary/sentiment-train", "10a92a297ec38e262386e5a2713b4bc70e5d18ced88b7f54bd171a26e5b34ab5"),
             senteval_file("SST/binary/sentiment-test", "4fefd1cd67526cf87ebc7fafc3afc21cc7cfa6ae53b45e74f77f9456e3c62752")),
}
STACKOVERFLOW = (
    github_file("jacoxu/StackOverflow", "7c207f51e649fff9e4736610b9d44431bb7ccf00", "rawText/title_StackOverflow.txt",
                "stackoverflow/title_StackOverflow.txt", "56fdb3932c6a2e35c1943b8a3d3c1cf51901fc1139e51b1587091898ffb22e86"),
    github_file("jacoxu/StackOverflow", "7c207f51e649fff9e4736610b9d44431bb7ccf00", "rawText/label_StackOverflow.txt",
                "stackoverflow/label_StackOverflow.txt", "ac6b52afbf696611680f8ea944be682bcdf1979b62fde2b5fa2a9dcc6ab8d7d3"),
)
AGNEWS = github_file("suuuch/TransformerClassification", "0d9808e1978c8468b4f8f08a44c5be99d058aa7b", "data/ag_news_csv/test.csv",
                     "ag_news/test.csv", "d2a2cef4dfeb21ca17b463fd15e9e5a639c05823d03efabb3d28a75bbfe8d915")
BANKING77 = ("mteb/banking77", "0fd18e25b25c072e09e0d92ab615fda904d66300")  # MTEB's Banking77 (its test split clusters)
CV_TASKS = ("mr", "cr", "subj", "mpqa")
SPLIT_TASKS = ("trec", "sst2")
CLUSTERING_TASKS = ("stackoverflow", "banking77", "agnews")
OWN_TASKS = (*[f"clustering/{t}" for t in CLUSTERING_TASKS], *[f"classification/{t}" for t in (*CV_TASKS, *SPLIT_TASKS)])
# eval.tasks unset: the seven STS tasks, Banking77 classification, and ours
ALL_TASKS = (*STS_SEVEN, "Banking77Classification", *OWN_TASKS)
# MTEB's Banking77Classification settings, which metrics.mteb_classification_accuracy reproduces (tested)
MTEB_CLASSIFICATION = {"banking77": {"experiments": 10, "samples_per_label": 8}}

def canonical(task: str) -> str:
    return LEGACY.get(task, task)


def is_own(task: str) -> bool:
    return task in OWN_TASKS


def check_task_names(tasks) -> list[str]:
    """Canonical names for `tasks`; an unknown one raises EvalDataError with the nearest names."""
    names = [canonical(t) for t in tasks]
    bad = []
    for given, name in zip(tasks, names):
        if is_own(name):
            continue
        import mteb

        try:
            mteb.get_task(name)
        except (KeyError, ValueError):
            every = [t.metadata.name for t in mteb.get_tasks(exclude_superseded=False)]
            near = difflib.get_close_matches(name, [*every, *OWN_TASKS, *LEGACY], n=3)
            bad.append(f"{given}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    if bad:
        raise EvalDataError(f"eval.tasks: unknown task {'; '.join(bad)}. Tasks are MTEB's names (e.g. STSBenchmark, "
                            f"SICK-R, SciFact, Banking77Classification) or ours: {', '.join(OWN_TASKS)}")
    return list(dict.fromkeys(names))


# -- what a loaded task holds -------------------------------------------------------------------------


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
    source: str = ""

    def all_texts(self) -> list[str]:
        return self.texts + self.test_texts


# -- the files of our tasks ---------------------------------------------------------------------------


def _lines(path: str, encoding: str = "latin-1") -> list[str]:
    with open(path, "rb") as f:
        return f.read().decode(encoding).splitlines()


def _collapse(text: str) -> str:
    return " ".join(text.split())


def senteval_binary(sources: Sources, task: str, name: str) -> Labelled:
    """MR, CR, SUBJ, MPQA as SentEval reads them: latin-1, positive (SUBJ: objective) = 1 first."""
    pos, neg = (_lines(sources.path(f, task)) for f in SENTEVAL_FILES[name])
    texts, labels = [], []
    for label, lines in (("1", pos), ("0", neg)):
        for line in lines:
            if line.split():
                texts.append(_collapse(line))
                labels.append(label)
    return Labelled(texts, np.asarray(labels), source=", ".join(f.label for f in SENTEVAL_FILES[name]))


def trec_split(path: str) -> tuple[list[str], np.ndarray]:
    """SentEval's TREC reader: 'COARSE:fine question', latin-1; the coarse label."""
    texts, labels = [], []
    for line in _lines(path):
        if not line.strip():
            continue
        target, _, rest = line.strip().partition(":")
        texts.append(_collapse(rest.split(" ", 1)[1]))
        labels.append(target)
    return texts, np.asarray(labels)


def sst_split(path: str) -> tuple[list[str], np.ndarray]:
    """SentEval's SST reader: 'sentence<TAB>label' per line."""
    texts, labels = [], []
    for n, line in enumerate(_lines(path, "utf-8"), start=1):
        if not line.strip():
            continue
        text, sep, label = line.rpartition("\t")
        if not sep:
            raise EvalDataError(f"{path}:{n}: expected 'sentence<TAB>label'")
        texts.append(_collapse(text))
        labels.append(label.strip())
    return texts, np.asarray(labels)


def load_classification(sources: Sources, task: str) -> Labelled:
    name = task.split("/", 1)[1]
    if name in CV_TASKS:
        return senteval_binary(sources, task, name)
    read = trec_split if name == "trec" else sst_split
    train, test = SENTEVAL_FILES[name]
    tr_x, tr_y = read(sources.path(train, task))
    te_x, te_y = read(sources.path(test, task))
    return Labelled(tr_x, tr_y, te_x, te_y, source=f"{train.label}, {test.label}")


def load_clustering(sources: Sources, task: str) -> Labelled:
    name = task.split("/", 1)[1]
    if name == "stackoverflow":
        titles, labels = (_lines(sources.path(f, task), "utf-8") for f in STACKOVERFLOW)
        if len(titles) != len(labels):
            raise EvalDataError(f"{task}: {len(titles)} titles but {len(labels)} labels ({STACKOVERFLOW[0].label})")
        keep = [i for i, t in enumerate(titles) if t.strip()]
        return Labelled([_collapse(titles[i]) for i in keep], np.asarray([labels[i].strip() for i in keep]), source=STACKOVERFLOW[0].label)
    if name == "agnews":
        path = sources.path(AGNEWS, task)
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        texts = [" ".join(t for t in (_collapse(r[1]), _collapse(r[2])) if t) for r in rows]
        return Labelled(texts, np.asarray([r[0] for r in rows]), source=AGNEWS.label)
    f = hub_file(*BANKING77, "test.jsonl")
    rows = read_jsonl(sources.path(f, task))
    return Labelled([r["text"] for r in rows], np.asarray([r["label_text"] for r in rows]), source=f.label)


def load_own(sources: Sources, task: str) -> Labelled:
    try:
        return load_clustering(sources, task) if task.startswith("clustering/") else load_classification(sources, task)
    except (UnicodeDecodeError, IndexError, csv.Error, KeyError) as e:
        raise EvalDataError(f"{task}: malformed source file ({type(e).__name__}: {e})") from e


# -- Hub files ------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise EvalDataError(f"{path}:{n}: not a JSON line ({e})") from None
    return out


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """BEIR's qrels TSV (query-id, corpus-id, score; header line; CRLF fine)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(io.StringIO(f.read().replace("\r\n", "\n")), delimiter="\t")
        header = next(rows, None)
        if not header or header[:3] != ["query-id", "corpus-id", "score"]:
            raise EvalDataError(f"{path}:1: expected the header query-id, corpus-id, score; got {header}")
        for n, r in enumerate(rows, start=2):
            if len(r) < 3:
                raise EvalDataError(f"{path}:{n}: expected 3 tab-separated columns, got {len(r)}")
            qrels.setdefault(r[0], {})[r[1]] = int(r[2])
    return qrels


def read_pairs(uri: str) -> Pairs:
    """A pair file `score<TAB>sentence1<TAB>sentence2` with a header (pipelines/score_sts.py --data)."""
    import fsspec

    try:
        f = fsspec.open(uri, "rt", encoding="utf-8", newline="").open()
    except FileNotFoundError as e:
        raise EvalDataError(f"{uri}: pair file not found") from e
    with f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or rows[0][:3] != ["score", "sentence1", "sentence2"]:
        raise EvalDataError(f"{uri}:1: expected the header score, sentence1, sentence2")
    gold = []
    for line, r in enumerate(rows[1:], start=2):
        if len(r) != 3:
            raise EvalDataError(f"{uri}:{line}: expected 3 tab-separated columns, got {len(r)}")
        try:
            gold.append(float(r[0]))
        except ValueError:
            raise EvalDataError(f"{uri}:{line}: score {r[0]!r} is not a number") from None
    return Pairs([r[1] for r in rows[1:]], [r[2] for r in rows[1:]], np.asarray(gold))


def first_present(sources: Sources, repo: str, revision: str, names: list[str], task: str) -> SourceFile:
    """The first of `names` the source (or mirror) has; SourceError naming them all when none."""
    for name in names:
        f = hub_file(repo, revision, name)
        if sources.exists(f, task):
            return f
    raise SourceError(f"{task}: none of {', '.join(names)} in {repo}@{revision[:12]} ({sources.where}). "
                      f"Fill a mirror with python pipelines/fill_mirror.py --mirror MIRROR --set 'eval.tasks=[{task}]'")


def own_task_files(task: str) -> list[SourceFile]:
    """The source files of one of our tasks."""
    name = task.split("/", 1)[1]
    if task.startswith("classification/"):
        return list(SENTEVAL_FILES[name])
    return {"stackoverflow": list(STACKOVERFLOW), "agnews": [AGNEWS], "banking77": [hub_file(*BANKING77, "test.jsonl")]}[name]
