"""MTEB's own tasks and evaluators over the pipeline's embeddings.

`load_mteb_task` builds the mteb task object and hands it the data read from its Hub repo at the
revision mteb pins (through sources.Sources: the Hub, a mirror, or the cache), as mteb's own
`load_data` would have, then runs the task's `dataset_transform`. `task_inputs` lists what mteb
will ask the encoder for (texts by prompt type: STS pairs, classification splits, retrieval
queries and documents, a document being its title and text joined as mteb joins them), so the
evaluation embeds them all in one pass through the corpus pipeline. `run_mteb` then runs
`mteb.evaluate` with `LookupEncoder`, which answers from those vectors (anything not prefetched
is embedded on demand, counted), and writes the results in MTEB's own format under
`<output>/mteb/results/<model>/<config fingerprint>/<Task>.json`, loadable with
`mteb.ResultCache(<output>/mteb).load_results()`.

Tasks read through Sources: MTEB's STS, classification and BEIR-layout retrieval tasks with one
('default') subset. Any other MTEB task is loaded by mteb itself (`datasets` from the Hub), which
needs the network; with a mirror set, such a task is refused before any work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from operators.evaluation.eval_data import EvalDataError, first_present, read_jsonl, read_qrels
from operators.io.sources import SourceError, Sources

log = logging.getLogger("corpus_embed.mteb")

QUERY, DOCUMENT = "query", "document"


def get_task(name: str):
    import mteb

    return mteb.get_task(name)


def task_type(task) -> str:
    from mteb.abstasks import AbsTaskClassification, AbsTaskRetrieval, AbsTaskSTS

    for cls, kind in ((AbsTaskSTS, "sts"), (AbsTaskClassification, "classification"), (AbsTaskRetrieval, "retrieval")):
        if isinstance(task, cls):
            return kind
    return "other"


def readable(task) -> bool:
    """Whether Sources can read the task's data: one subset, and a type whose Hub layout we know."""
    return task_type(task) != "other" and list(task.hf_subsets) == ["default"]


def layout(task) -> dict[str, list[str]]:
    """Where each part of a readable task's data may lie in its Hub repo: part -> candidate files,
    the first present wins. STS and classification: one JSON-lines file per split (classification's
    training split too); retrieval: BEIR's corpus, queries and qrels/<split>.tsv."""
    splits = list(task.eval_splits)
    if task_type(task) == "retrieval":
        return {"corpus": ["corpus.jsonl", "corpus.jsonl.gz"], "queries": ["queries.jsonl", "queries.jsonl.gz"],
                **{f"qrels/{s}": [f"qrels/{s}.tsv"] for s in splits}}
    if task_type(task) == "classification":
        splits = list(dict.fromkeys([getattr(task, "train_split", "train"), *splits]))
    return {s: [f"{s}.jsonl.gz", f"{s}.jsonl", f"data/{s}.jsonl.gz", f"data/{s}.jsonl"] for s in splits}


def task_files(task, sources: Sources) -> dict:
    """Each part of the task's data (layout) as the SourceFile present at the source or mirror."""
    repo, rev = task.metadata.dataset["path"], task.metadata.dataset["revision"]
    return {part: first_present(sources, repo, rev, names, task.metadata.name) for part, names in layout(task).items()}


def _dataset(rows: list[dict], path: str, need: tuple[str, ...]):
    from datasets import Dataset

    if not rows:
        raise EvalDataError(f"{path}: no rows")
    missing = [c for c in need if c not in rows[0]]
    if missing:
        raise EvalDataError(f"{path}: rows lack {', '.join(missing)} (have {', '.join(rows[0])})")
    return Dataset.from_list(rows)


def load_mteb_task(name: str, sources: Sources):
    """The mteb task `name` with its data loaded from `sources` (or by mteb itself, see above)."""
    from datasets import DatasetDict

    task = get_task(name)
    kind = task_type(task)
    if not readable(task):
        if sources.mirror:
            raise SourceError(f"{name}: an MTEB task of type {type(task).__name__} with subsets {list(task.hf_subsets)[:4]}; "
                              f"corpus-embed reads STS, classification and BEIR-layout retrieval tasks from {sources.where}, "
                              "and this one only through mteb's own loader, which needs the Hub: unset the mirror where the Hub is reachable")
        task.load_data()
        return task
    paths = {part: sources.path(f, name) for part, f in task_files(task, sources).items()}
    splits = list(task.eval_splits)
    if kind == "sts":
        need = (*task.column_names, "score")
        task.dataset = DatasetDict({s: _dataset(read_jsonl(paths[s]), paths[s], need) for s in splits})
    elif kind == "classification":
        need = (task.input_column_name if isinstance(task.input_column_name, str) else "text", task.label_column_name)
        task.dataset = DatasetDict({s: _dataset(read_jsonl(p), p, need) for s, p in paths.items()})
    else:
        corpus, queries = retrieval_corpus(paths["corpus"], paths["queries"])  # read once, whatever the splits
        task.dataset = {"default": {s: {"corpus": corpus, "queries": queries, "relevant_docs": read_qrels(paths[f"qrels/{s}"]),
                                        "top_ranked": None} for s in splits}}
    task.dataset_transform()
    task.data_loaded = True
    return task


def retrieval_corpus(corpus_path: str, queries_path: str) -> tuple:
    """BEIR's corpus and queries files as the Datasets of mteb's RetrievalSplitData: ids as
    strings, the corpus with title and text."""
    from datasets import Dataset

    corpus = read_jsonl(corpus_path)
    queries = read_jsonl(queries_path)
    for rows, path in ((corpus, corpus_path), (queries, queries_path)):
        if rows and not {"_id", "text"} <= set(rows[0]):
            raise EvalDataError(f"{path}: rows lack _id and text (have {', '.join(rows[0])})")
    return (Dataset.from_dict({"id": [str(r["_id"]) for r in corpus], "title": [r.get("title") or "" for r in corpus],
                               "text": [r["text"] or "" for r in corpus]}),
            Dataset.from_dict({"id": [str(r["_id"]) for r in queries], "text": [r["text"] for r in queries]}))


def document_text(title: str | None, text: str) -> str:
    """A document as mteb hands it to an encoder: its title and text joined."""
    return (title + " " + text).strip() if title else text


def task_inputs(task) -> dict[str, list[str]]:
    """What mteb will ask the encoder to embed, by prompt type (QUERY / DOCUMENT)."""
    kind = task_type(task)
    out: dict[str, list[str]] = {QUERY: [], DOCUMENT: []}
    if kind == "other":
        return out
    data = task.dataset
    for split in task.eval_splits:
        if kind == "sts":
            ds = data[split]
            for col in task.column_names:
                out[DOCUMENT] += ds[col]
        elif kind == "classification":
            col = task.input_column_name if isinstance(task.input_column_name, str) else "text"
            for s in dict.fromkeys([getattr(task, "train_split", "train"), split]):
                out[DOCUMENT] += data[s][col]
        else:
            part = data["default"][split]
            wanted = {q for q, docs in part["relevant_docs"].items() if any(v > 0 for v in docs.values())}
            out[QUERY] += [t for i, t in zip(part["queries"]["id"], part["queries"]["text"]) if i in wanted]
            out[DOCUMENT] += [document_text(t, x) for t, x in zip(part["corpus"]["title"], part["corpus"]["text"])]
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


class LookupEncoder:
    """An mteb encoder answering from the pipeline's vectors: `lookup(side, texts)` returns their
    vectors, embedding through the pipeline whatever was not embedded yet."""

    def __init__(self, lookup: Callable[[str, list[str]], np.ndarray], meta):
        self.lookup = lookup
        self._meta = meta

    @property
    def mteb_model_meta(self):
        return self._meta

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        side = QUERY if prompt_type is not None and str(getattr(prompt_type, "value", prompt_type)) == QUERY else DOCUMENT
        return self.lookup(side, texts)

    def similarity(self, a, b):
        from mteb.similarity_functions import cos_sim

        return cos_sim(a, b)

    def similarity_pairwise(self, a, b):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(a, b)


def model_meta(model_name: str, fingerprint: str, dimension: int | None):
    """An MTEB ModelMeta for a configuration: results go to <model>/<config fingerprint>/."""
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    name = model_name.replace("package://", "package/").strip("/")
    if "/" not in name:
        name = f"corpus-embed/{name}"
    name = "/".join(name.split("/")[-2:])
    return ModelMeta.create_empty({"name": name, "revision": fingerprint, "embed_dim": dimension,
                                   "similarity_fn_name": ScoringFunction.COSINE, "framework": ["PyTorch"]})


def run_mteb(tasks: list, encoder: LookupEncoder, folder: str) -> dict[str, dict]:
    """Run `tasks` through mteb.evaluate, results written in MTEB's format under `folder`; returns
    per task {score (main score x 100), metric, scores (mteb's scores of the first eval split),
    mteb_version}."""
    import mteb

    cache = mteb.ResultCache(cache_path=folder)
    result = mteb.evaluate(encoder, tasks, cache=cache, overwrite_strategy="always", co2_tracker=False,
                           show_progress_bar=False, encode_kwargs={"batch_size": 256})
    out = {}
    for tr in result.task_results:
        task = next(t for t in tasks if t.metadata.name == tr.task_name)
        split = task.eval_splits[0]
        scores = tr.scores[split][0]
        out[tr.task_name] = {
            "score": float(scores["main_score"]) * 100, "metric": task.metadata.main_score,
            "scores": {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "protocol": f"MTEB {mteb.__version__}: {type(task).__mro__[1].__name__}, split {split}, {task.metadata.main_score}",
            "dataset": f"{task.metadata.dataset['path']}@{task.metadata.dataset['revision']}",
            "mteb_result": str(cache.get_task_result_path(tr.task_name, encoder.mteb_model_meta)),
        }
    return out


def mteb_task_files(name: str, sources: Sources) -> list:
    """The source files of an MTEB task that Sources reads (the ones present at the source)."""
    task = get_task(name)
    if not readable(task):
        raise SourceError(f"{name}: read by mteb's own loader from the Hub; it has no mirror layout here")
    return list(task_files(task, sources).values())
