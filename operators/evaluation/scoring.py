"""Scoring a configuration on held-out benchmarks: task selection, loading, the embedding cache,
scores and reports. No Ray and no model here: `evaluate` takes the embedding function.

    embed_fn(keys, texts) -> iterable of (keys, vectors float32 [n, d]) batches, in any order

`execution.ray_embed_fn` is the one that runs the corpus pipeline's own embedding operator on Ray
(what the evaluate pipeline and the quality gate use); any other (a model in this process, a
test's numpy function) scores the same way. The tasks are loaded first (eval_data, mteb_tasks:
from the sources or the mirror), so bad data fails before any work. Each configuration's unique
texts (what every task will ask for, retrieval documents included) are embedded in one pass and
cached per config fingerprint, a Parquet part written every `eval.chunk` vectors as they arrive:
re-scoring is cheap, and a rerun after a crash embeds only what no part holds. MTEB's tasks are
then scored by mteb over those vectors, ours by their reference protocols (metrics.py).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import __version__
from operators.config.schema import ConfigError, PipelineConfig, StorageConfig
from operators.config.secrets import redact_text
from operators.evaluation.eval_data import (
    ALL_TASKS,
    CV_TASKS,
    MTEB_CLASSIFICATION,
    STS_SEVEN,
    EvalDataError,
    Labelled,
    canonical,
    check_task_names,
    is_own,
    load_own,
)
from operators.evaluation.metrics import (
    clustering_v_measure,
    mteb_classification_accuracy,
    senteval_cv_accuracy,
    senteval_order,
    senteval_split_accuracy,
    sts_spearman,
)
from operators.evaluation.mteb_tasks import DOCUMENT, QUERY, LookupEncoder, load_mteb_task, model_meta, run_mteb, task_inputs
from operators.io import cache
from operators.io.readers import looks_like_path
from operators.io.sources import Sources, corpus_files, is_local, mirror_from
from operators.io.storage import InputError, commit_file, list_shards

EmbedFn = Callable[[list[str], list[str]], Iterable[tuple[list[str], np.ndarray]]]


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def selected_tasks(cfg: PipelineConfig) -> list[str]:
    """eval.tasks as canonical names (MTEB's, or ours for what MTEB lacks); unknown names refused."""
    try:
        return check_task_names(cfg.eval.tasks or ALL_TASKS)
    except EvalDataError as e:
        raise ConfigError(str(e)) from None


def eval_sources(cfg: PipelineConfig) -> Sources:
    """Where the tasks' files come from: eval.mirror, else CORPUS_EMBED_MIRROR, else the sources."""
    return Sources(mirror_from(cfg.eval.mirror), str(cache.CACHE_DIR), cfg.eval.storage)


BENCHMARK_FOLDERS = ("hf/datasets/mteb", "senteval", "stackoverflow", "ag_news", "sts", "clf", "sts-raw", "banking77")


def check_held_out(cfg: PipelineConfig) -> None:
    """Nothing from the benchmarks may feed a fitted step: a whitening or calibration corpus any of
    whose files (a glob or folder expanded, links resolved) lies inside the mirror's benchmark
    folders is refused. Files are compared, not spellings: 'st?/raw/...' is caught as 'sts/raw/...'."""
    mirror = mirror_from(cfg.eval.mirror)
    if not mirror:
        return
    resolve = lambda p: str(Path(p.removeprefix("file://")).expanduser().resolve()) if is_local(p) else p.rstrip("/")  # noqa: E731
    bench = [resolve(posixpath.join(mirror, f)) + "/" for f in BENCHMARK_FOLDERS]
    for setting, corpus, storage in (("whitening.corpus", cfg.whitening.corpus, cfg.whitening.storage),
                                     ("model.calibration_corpus", cfg.model.calibration_corpus, StorageConfig())):
        if not corpus or corpus_files(corpus) is not None or not looks_like_path(corpus):
            continue
        try:
            files = [resolve(s.uri) for s in list_shards(corpus, "text", storage)]
        except InputError:
            files = [resolve(corpus)]  # nothing there: its own reader says so; the spelling is still checked
        inside = [f for f in files if any(f.startswith(b) for b in bench)]
        if inside:
            raise ConfigError(f"{setting}: {corpus} reads {inside[0]}, inside the benchmarks ({redact_text(mirror)}); "
                              "fit on held-out text such as wikitext-2")


def load_tasks(cfg: PipelineConfig, tasks: list[str], sources: Sources | None = None) -> dict:
    """Each task's data, read before any embedding: an mteb task with its data loaded, or ours
    (Labelled). A missing file, a checksum or revision mismatch, an unreachable source: SourceError."""
    sources = sources or eval_sources(cfg)
    data = {}
    for task in tasks:
        if is_own(task):
            data[task] = load_own(sources, task)
            value = data[task]
            cap = cfg.eval.max_train
            if value.test_texts and cap and len(value.texts) > cap:  # before embedding: saves the work
                keep = np.sort(np.random.default_rng(0).permutation(len(value.texts))[:cap])
                value.texts = [value.texts[i] for i in keep]
                value.labels = value.labels[keep]
        else:
            data[task] = load_mteb_task(task, sources)
    return data


def inputs_of(data: dict) -> dict[str, list[str]]:
    """The texts to embed, by side (QUERY: retrieval queries; DOCUMENT: everything else)."""
    out: dict[str, dict[str, None]] = {QUERY: {}, DOCUMENT: {}}
    for value in data.values():
        if isinstance(value, Labelled):
            out[DOCUMENT].update(dict.fromkeys(value.all_texts()))
        else:
            for side, texts in task_inputs(value).items():
                out[side].update(dict.fromkeys(texts))
    return {k: list(v) for k, v in out.items()}


def task_texts(data: dict) -> list[str]:
    """Every text of the tasks, embedded the same way (queries and documents alike)."""
    sides = inputs_of(data)
    return list(dict.fromkeys(sides[DOCUMENT] + sides[QUERY]))


def query_config(cfg: PipelineConfig) -> PipelineConfig | None:
    """The config queries are embedded with when eval.query_instruction differs from extraction.instruction."""
    q = cfg.eval.query_instruction
    if q is None or q == cfg.extraction.instruction:
        return None
    return cfg.model_copy(update={"extraction": cfg.extraction.model_copy(update={"instruction": q or None})})


def query_side_for(cfg: PipelineConfig, prepare_fn, embed_fn_for):
    """(prepared, embed_fn) for the queries when eval.query_instruction differs, else None."""
    qcfg = query_config(cfg)
    if qcfg is None:
        return None
    prepared = prepare_fn(qcfg)
    return prepared, embed_fn_for(qcfg, prepared)


# -- the embedding cache ------------------------------------------------------------------------


class EmbeddingCache:
    """Vectors by text key, in Parquet parts under one folder (one folder per config fingerprint)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.fs = fsspec.filesystem("file")
        self.fs.makedirs(folder, exist_ok=True)
        self.parts = sorted(self.fs.glob(posixpath.join(folder, "part-*.parquet")))

    def load(self) -> dict[str, np.ndarray]:
        vectors: dict[str, np.ndarray] = {}
        for part in self.parts:
            t = pq.read_table(part)
            emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32) if t.num_rows else []
            vectors.update(zip(t.column("key").to_pylist(), emb))
        return vectors

    def write_part(self, keys: list[str], emb: np.ndarray) -> None:
        n = len(self.parts)
        table = pa.table({"key": keys, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])})
        tmp = posixpath.join(self.folder, f".part-{n:05d}.tmp")
        final = posixpath.join(self.folder, f"part-{n:05d}.parquet")
        pq.write_table(table, tmp)
        commit_file(self.fs, tmp, final)
        self.parts.append(final)


def embed_cached(texts: list[str], embed_fn: EmbedFn, cache_dir: str, chunk: int, log=None) -> dict[str, np.ndarray]:
    """Vectors by text key for `texts`: the cached ones, and the rest from one `embed_fn` pass,
    a cache part written every `chunk` vectors as they arrive."""
    cache = EmbeddingCache(cache_dir)
    vectors = cache.load()
    todo = [t for t in dict.fromkeys(texts) if text_key(t) not in vectors]
    if log:
        log("%d texts: %d cached, %d to embed", len(texts), len(texts) - len(todo), len(todo))
    if not todo:
        return vectors
    parts = PartWriter(cache, vectors, chunk)
    for batch_keys, batch in embed_fn([text_key(t) for t in todo], todo):
        parts.add(batch_keys, np.asarray(batch, dtype=np.float32))
    parts.flush()
    return vectors


class PartWriter:
    """Vectors as they arrive: a cache part written every `chunk` of them, each added to
    `vectors` once written."""

    def __init__(self, cache: EmbeddingCache, vectors: dict, chunk: int):
        self.cache, self.vectors, self.chunk = cache, vectors, chunk
        self.keys: list[str] = []
        self.embs: list[np.ndarray] = []

    def add(self, keys: list[str], emb: np.ndarray) -> None:
        self.keys += keys
        self.embs.append(emb)
        if len(self.keys) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        emb = np.concatenate(self.embs)
        self.cache.write_part(self.keys, emb)
        self.vectors.update(zip(self.keys, emb))
        self.keys, self.embs = [], []


# -- scores -------------------------------------------------------------------------------------


def score(cfg: PipelineConfig, data: dict, vec, mteb_dir: str | None = None, meta=None) -> dict:
    """Per-task scores x 100 ({tasks: {name: {score, metric, protocol, ...}}, sts_avg}).
    `vec(texts, side)` returns their embeddings (side: QUERY for retrieval queries, else
    DOCUMENT); MTEB's tasks are scored by mteb itself, its results written under `mteb_dir` (a
    temporary folder when none) as `meta` (mteb_tasks.model_meta)."""
    import contextlib
    import tempfile

    tasks: dict = {}
    mteb_tasks = [value for value in data.values() if not isinstance(value, Labelled)]
    if mteb_tasks:
        with contextlib.nullcontext(mteb_dir) if mteb_dir else tempfile.TemporaryDirectory() as folder:
            encoder = LookupEncoder(lambda side, texts: vec(texts, side), meta or model_meta(cfg.model.name, "unnamed", None))
            tasks.update(run_mteb(mteb_tasks, encoder, folder))
    for task, value in data.items():
        if isinstance(value, Labelled):
            tasks[task] = own_score(task, value, lambda t: vec(t, DOCUMENT), cfg.eval.folds)
    tasks = {t: tasks[t] for t in data}  # in the order asked
    out: dict = {"tasks": tasks}
    if all(t in tasks for t in STS_SEVEN):
        out["sts_avg"] = float(np.mean([tasks[t]["score"] for t in STS_SEVEN]))
    return out


def own_score(task: str, value: Labelled, vec, folds: int) -> dict:
    """A task MTEB lacks, by its reference protocol: MTEB's clustering protocol for the clustering
    sets; SentEval's for MR, CR, SUBJ, MPQA (nested CV), TREC and SST-2 (C tuned by CV on the
    training split), each in SentEval's order."""
    kind, name = task.split("/", 1)
    if kind == "clustering":
        return {"score": clustering_v_measure(vec(value.texts), value.labels), "metric": "v_measure",
                "n": len(value.texts), "k": int(len(np.unique(value.labels))), "source": value.source,
                "protocol": "MTEB: mean V-measure of MiniBatchKMeans over 10 samples of 16384 drawn with replacement"}
    return {**classification_score(name, value, vec, folds), "metric": "accuracy", "source": value.source}


def classification_score(name: str, value, vec, folds: int) -> dict:
    """Accuracy x 100 under the task's reference protocol (see own_score)."""
    x, y = vec(value.texts), value.labels
    if name in MTEB_CLASSIFICATION:
        p = MTEB_CLASSIFICATION[name]
        acc = mteb_classification_accuracy(x, y, vec(value.test_texts), value.test_labels, **p)
        protocol = f"MTEB: {p['experiments']} experiments of {p['samples_per_label']} training samples per label, logistic regression"
    elif name in CV_TASKS:
        order = senteval_order(value.texts, y)
        acc = senteval_cv_accuracy(x[order], y[order], folds=folds)
        protocol = f"SentEval: {folds}-fold CV, C tuned by an inner {folds}-fold CV"
    else:
        order = senteval_order(value.texts, y)
        acc = senteval_split_accuracy(x[order], y[order], vec(value.test_texts), value.test_labels, folds=folds)
        protocol = f"SentEval: C tuned by {folds}-fold CV on the training split, scored on the test split"
        if name == "sst2":
            protocol += " (SentEval tunes SST-2 on its dev split, which this data lacks)"
    return {"score": acc, "protocol": protocol, "train": int(len(y))}


def pair_scores(pairs, vec) -> tuple[float, int]:
    """(Spearman x 100, unique sentences) of one STS pair set, each unique sentence embedded once
    by `vec(list_of_texts)`."""
    unique = sorted(set(pairs.s1) | set(pairs.s2))
    vecs = vec(unique)
    index = {s: i for i, s in enumerate(unique)}
    return sts_spearman(vecs[[index[s] for s in pairs.s1]], vecs[[index[s] for s in pairs.s2]], pairs.gold), len(unique)


def task_score(run: dict, task: str) -> float:
    """The headline score x 100 of one task (any of its names), or sts/avg, in a run."""
    if task == "sts/avg":
        return run["sts_avg"]
    return run["tasks"][canonical(task)]["score"]


def evaluate(cfg: PipelineConfig, prepared, embed_fn: EmbedFn, cache_root: str, name: str = "default",
             path: str | None = None, log=None, data: dict | None = None, query_side=None, mteb_dir: str | None = None) -> dict:
    """Score `cfg` on its eval.tasks with `embed_fn`; vectors cached under `cache_root`/<fingerprint>.
    `data`: the tasks already loaded (load_tasks); `query_side`: (prepared, embed_fn) of
    query_config(cfg), when queries are embedded with another instruction."""
    tasks = selected_tasks(cfg)
    check_held_out(cfg)
    t0 = time.time()
    data = data if data is not None else load_tasks(cfg, tasks)
    sides = inputs_of(data)
    if query_side is None and query_config(cfg) is not None and sides[QUERY]:
        raise ConfigError("eval.query_instruction: queries need their own embedding pass, which this caller does not provide")
    doc_texts = list(dict.fromkeys(sides[DOCUMENT] + (sides[QUERY] if query_side is None else [])))
    t1 = time.time()
    vectors = embed_cached(doc_texts, embed_fn, posixpath.join(cache_root, prepared.fingerprint), cfg.eval.chunk, log)
    queries = vectors
    if query_side is not None and sides[QUERY]:
        q_prepared, q_embed = query_side
        queries = embed_cached(sides[QUERY], q_embed, posixpath.join(cache_root, q_prepared.fingerprint), cfg.eval.chunk, log)
    t2 = time.time()
    missed = []

    def vec(batch: list[str], side: str = DOCUMENT) -> np.ndarray:
        table, fn = (queries, query_side[1] if query_side else embed_fn) if side == QUERY else (vectors, embed_fn)
        todo = [t for t in dict.fromkeys(batch) if text_key(t) not in table]
        if todo:  # asked for a text the prefetch did not list: embedded now, counted
            missed.extend(todo)
            for keys, emb in fn([text_key(t) for t in todo], todo):
                table.update(zip(keys, np.asarray(emb, dtype=np.float32)))
        return np.stack([table[text_key(t)] for t in batch])

    p = prepared.provenance
    meta = model_meta(cfg.model.name, prepared.fingerprint, p["dimension"])
    results = score(cfg, data, vec, mteb_dir, meta)
    t3 = time.time()
    if missed and log:
        log("%d texts were not in the prefetched set and were embedded on demand", len(missed))
    sources = eval_sources(cfg)
    return {
        "name": name, "config": path, "config_fingerprint": prepared.fingerprint,
        "model": {"name": cfg.model.name, **p["model"]}, "extraction": p["extraction"], "postprocess": p["postprocess"],
        "dimension": p["dimension"], "data_from": sources.where, "query_instruction": cfg.eval.query_instruction,
        **results,
        "timings": {"load_s": t1 - t0, "embed_s": t2 - t1, "score_s": t3 - t2, "texts": len(doc_texts) + (len(sides[QUERY]) if query_side else 0),
                    "embedded_on_demand": len(missed)},
        "package_version": __version__,
    }


# -- reports ------------------------------------------------------------------------------------


def rows_for(run: dict) -> dict[str, float]:
    """Flat task -> headline score, for the table and the chart."""
    out = {name: r["score"] for name, r in run["tasks"].items()}
    if "sts_avg" in run:
        out["STS avg"] = run["sts_avg"]
    return out


def results_markdown(runs: list[dict]) -> str:
    flat = [rows_for(r) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    lines = ["| task | " + " | ".join(r["name"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{f[k]:.2f}" if k in f else "" for f in flat) + " |")
    note = ("Scores x 100: each task's main score (MTEB's tasks by mteb's own evaluators: STS cosine Spearman, "
            "classification accuracy, retrieval nDCG@10; clustering V-measure; SentEval accuracy).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_reports(runs: list[dict], output: str) -> dict:
    """OUTPUT/results.json (the first run, all in `comparison`), results.md and results.png."""
    results = dict(runs[0], comparison=runs)
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (Path(output) / "results.md").write_text(results_markdown(runs))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = [rows_for(r) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    fig, ax = plt.subplots(figsize=(max(6, len(keys) * 0.6), 4.5))
    width = 0.8 / len(runs)
    for i, (run, f) in enumerate(zip(runs, flat)):
        ax.bar(np.arange(len(keys)) + i * width, [f.get(k, 0) for k in keys], width, label=run["name"])
    ax.set_xticks(np.arange(len(keys)) + width * (len(runs) - 1) / 2, keys, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("score x 100")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("corpus-embed evaluation")
    fig.tight_layout()
    fig.savefig(Path(output) / "results.png", dpi=120)
    plt.close(fig)
    return results
