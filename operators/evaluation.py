"""Scoring a configuration on held-out benchmarks: task selection, loading, the embedding cache,
scores and reports. No Ray and no model here: `evaluate` takes the embedding function.

    embed_fn(keys, texts) -> iterable of (keys, vectors float32 [n, d]) batches, in any order

`execution.embed_texts` is the one that runs the corpus pipeline's own embedding operator on Ray
(what the evaluate pipeline and the quality gate use); any other (a model in this process, a
test's numpy function) scores the same way. Each configuration's unique texts are embedded in one
pass and cached per config fingerprint, a Parquet part written every `eval.chunk` vectors as they
arrive: re-scoring is cheap, and a rerun after a crash embeds only what no part holds.
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
from operators.config import ConfigError, PipelineConfig
from operators.eval_data import (
    ALL_TASKS,
    CV_TASKS,
    MTEB_CLASSIFICATION,
    STS_YEARS,
    load_classification,
    load_clustering,
    read_pairs,
    sts_files,
)
from operators.metrics import (
    clustering_v_measure,
    mteb_classification_accuracy,
    senteval_cv_accuracy,
    senteval_order,
    senteval_split_accuracy,
    sts_spearman,
)
from operators.readers import looks_like_path
from operators.storage import commit_file

EmbedFn = Callable[[list[str], list[str]], Iterable[tuple[list[str], np.ndarray]]]


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def selected_tasks(cfg: PipelineConfig) -> list[str]:
    tasks = list(cfg.eval.tasks or ALL_TASKS)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown {', '.join(unknown)}; valid: {', '.join(ALL_TASKS)}")
    return tasks


def check_held_out(cfg: PipelineConfig) -> None:
    """Nothing from the benchmarks may feed a fitted step."""
    corpus = cfg.whitening.corpus
    if corpus and looks_like_path(corpus):
        bench = [posixpath.join(cfg.eval.data_dir, d) for d in ("sts", "clf", "senteval", "sts-raw")]
        norm = lambda p: str(Path(p).expanduser().resolve()) if "://" not in p else p  # noqa: E731
        if any(norm(corpus).startswith(norm(b)) for b in bench):
            raise ConfigError(f"whitening.corpus: {corpus} lies inside the benchmarks ({cfg.eval.data_dir}); fit on held-out text such as Wikitext")


def load_tasks(cfg: PipelineConfig, tasks: list[str]) -> dict:
    data, d = {}, cfg.eval.data_dir
    for task in tasks:
        kind, name = task.split("/")
        if kind == "sts":
            data[task] = {sub: read_pairs(uri) for sub, uri in sts_files(d, name, cfg.eval.sts_variant).items()}
        elif kind == "clustering":
            data[task] = load_clustering(d, name)
        else:
            data[task] = load_classification(d, name)
            cap = cfg.eval.max_train
            if data[task].test_texts and cap and len(data[task].texts) > cap:  # before embedding: saves the work
                keep = np.sort(np.random.default_rng(0).permutation(len(data[task].texts))[:cap])
                data[task].texts = [data[task].texts[i] for i in keep]
                data[task].labels = data[task].labels[keep]
    return data


def task_texts(data: dict) -> list[str]:
    seen: dict[str, None] = {}
    for task, value in data.items():
        if task.startswith("sts/"):
            for pairs in value.values():
                seen.update(dict.fromkeys(pairs.s1))
                seen.update(dict.fromkeys(pairs.s2))
        else:
            seen.update(dict.fromkeys(value.all_texts()))
    return list(seen)


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


def score(cfg: PipelineConfig, data: dict, vec) -> dict:
    """Per-task scores; `vec(list_of_texts)` returns their embeddings."""
    results: dict = {"sts": {}, "clustering": {}, "classification": {}}
    for task, value in data.items():
        kind, name = task.split("/")
        if kind == "sts":
            per = {sub: sts_spearman(vec(p.s1), vec(p.s2), p.gold) for sub, p in value.items()}
            if name in STS_YEARS:
                pooled_s1 = [s for p in value.values() for s in p.s1]
                pooled_s2 = [s for p in value.values() for s in p.s2]
                gold = np.concatenate([p.gold for p in value.values()])
                results["sts"][name] = {
                    "all": sts_spearman(vec(pooled_s1), vec(pooled_s2), gold),
                    "mean": float(np.mean(list(per.values()))),
                    "subsets": per,
                    "pairs": int(len(gold)),
                }
            else:
                results["sts"][name] = {"spearman": per["test"], "pairs": int(len(value["test"].gold))}
        elif kind == "clustering":
            results["clustering"][name] = {
                "v_measure": clustering_v_measure(vec(value.texts), value.labels),
                "n": len(value.texts), "k": int(len(np.unique(value.labels))),
                "protocol": "MTEB: mean V-measure of MiniBatchKMeans over 10 samples of 16384 drawn with replacement",
            }
        else:
            results["classification"][name] = classification_score(name, value, vec, cfg.eval.folds)
    sts = results["sts"]
    main7 = [sts[t]["all"] if t in STS_YEARS else sts[t]["spearman"] for t in (*STS_YEARS, "stsb", "sickr") if t in sts]
    if len(main7) == 7:
        results["sts"]["avg"] = float(np.mean(main7))
    return results


def classification_score(name: str, value, vec, folds: int) -> dict:
    """Accuracy x 100 under the task's reference protocol: MTEB's where MTEB has the task
    (banking77), else SentEval's (MR, CR, SUBJ, MPQA: nested CV; TREC, SST-2: C tuned by CV on
    the training split), each in SentEval's order."""
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
    return {"accuracy": acc, "protocol": protocol, "train": int(len(y))}


def pair_scores(pairs, vec) -> tuple[float, int]:
    """(Spearman x 100, unique sentences) of one STS pair set, each unique sentence embedded once
    by `vec(list_of_texts)`."""
    unique = sorted(set(pairs.s1) | set(pairs.s2))
    vecs = vec(unique)
    index = {s: i for i, s in enumerate(unique)}
    return sts_spearman(vecs[[index[s] for s in pairs.s1]], vecs[[index[s] for s in pairs.s2]], pairs.gold), len(unique)


def task_score(run: dict, task: str) -> float:
    """The headline score x 100 of one task id (sts/stsb, clustering/banking77, ...) in a run."""
    group, name = task.split("/", 1)
    if group == "sts":
        r = run["sts"][name]
        return r["all"] if "all" in r else r["spearman"]
    if group == "clustering":
        return run["clustering"][name]["v_measure"]
    return run["classification"][name]["accuracy"]


def evaluate(cfg: PipelineConfig, prepared, embed_fn: EmbedFn, cache_root: str, name: str = "default",
             path: str | None = None, log=None) -> dict:
    """Score `cfg` on its eval.tasks with `embed_fn`; vectors cached under `cache_root`/<fingerprint>."""
    tasks = selected_tasks(cfg)
    check_held_out(cfg)
    t0 = time.time()
    data = load_tasks(cfg, tasks)
    texts = task_texts(data)
    t1 = time.time()
    vectors = embed_cached(texts, embed_fn, posixpath.join(cache_root, prepared.fingerprint), cfg.eval.chunk, log)
    t2 = time.time()

    def vec(batch: list[str]) -> np.ndarray:
        return np.stack([vectors[text_key(t)] for t in batch])

    results = score(cfg, data, vec)
    t3 = time.time()
    p = prepared.provenance
    return {
        "name": name, "config": path, "config_fingerprint": prepared.fingerprint,
        "model": {"name": cfg.model.name, **p["model"]}, "extraction": p["extraction"], "postprocess": p["postprocess"],
        "dimension": p["dimension"], "sts_variant": cfg.eval.sts_variant, "data_dir": cfg.eval.data_dir,
        **results,
        "timings": {"load_s": t1 - t0, "embed_s": t2 - t1, "score_s": t3 - t2, "texts": len(texts)},
        "package_version": __version__,
    }


# -- reports ------------------------------------------------------------------------------------


def rows_for(run: dict) -> dict[str, float]:
    """Flat task -> headline score, for the table and the chart."""
    out = {}
    for name, r in run["sts"].items():
        if name == "avg":
            continue
        out[f"STS {name}"] = r["all"] if "all" in r else r["spearman"]
    if "avg" in run["sts"]:
        out["STS avg"] = run["sts"]["avg"]
    for name, r in run["clustering"].items():
        out[f"clustering {name}"] = r["v_measure"]
    for name, r in run["classification"].items():
        out[f"classification {name}"] = r["accuracy"]
    return out


def results_markdown(runs: list[dict]) -> str:
    flat = [rows_for(r) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    lines = ["| task | " + " | ".join(r["name"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{f[k]:.2f}" if k in f else "" for f in flat) + " |")
    note = "STS: Spearman x 100 of cosine vs gold (years: 'all' = subsets pooled); clustering: V-measure x 100; classification: accuracy x 100."
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
