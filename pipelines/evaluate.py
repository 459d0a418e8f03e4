"""Score configurations on held-out benchmarks: STS, clustering, classification.

    python pipelines/evaluate.py --config configs/models/all-minilm-l6-v2.yaml --output out/eval
    python pipelines/evaluate.py --config a.yaml --config b.yaml --set eval.tasks='[sts/stsb]' --output out/cmp

Each configuration's texts are de-duplicated and embedded on Ray through the corpus pipeline's own
embedding operator (extraction and post-processing included), so a score measures exactly what
production writes. Embeddings are cached per configuration fingerprint under OUTPUT/cache/ in
chunks: re-scoring is cheap and a rerun after a crash resumes. Writes OUTPUT/results.json,
OUTPUT/results.md and OUTPUT/results.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import posixpath
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from operators import __version__
from operators.benchmarks import (
    ALL_TASKS, CV_TASKS, STS_YEARS, BenchmarkError, load_classification, load_clustering,
    read_pairs, sts_files,
)
from operators.config import ConfigError, PipelineConfig, load_config, resolved_config_text
from operators.embed import Embedder, EmbedSpec
from operators.metrics import classification_accuracy, clustering_v_measure, sts_spearman
from operators.models import ModelLoadError, resolve_model
from operators.postprocess import ArtifactError
from operators.provenance import build_provenance, check_artifact
from operators.readers import READ_SCHEMA, looks_like_path
from operators.storage import InputError, commit_file

logger = logging.getLogger("corpus_embed.evaluate")


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


def embed_cached(cfg: PipelineConfig, resolved, spec_for, texts: list[str], cache_dir: str) -> dict[str, np.ndarray]:
    """Embed `texts` on Ray in chunks, each chunk cached as a Parquet file as soon as it is done;
    texts already in the cache are not embedded again."""
    import ray

    from pipelines.embed_corpus import init_ray, map_on_actor_pool

    fs = fsspec.filesystem("file")
    fs.makedirs(cache_dir, exist_ok=True)
    vectors: dict[str, np.ndarray] = {}
    for part in sorted(fs.glob(posixpath.join(cache_dir, "part-*.parquet"))):
        t = pq.read_table(part)
        for k, v in zip(t.column("key").to_pylist(), t.column("embedding").to_numpy(zero_copy_only=False)):
            vectors[k] = np.asarray(v, dtype=np.float32)
    todo = [t for t in dict.fromkeys(texts) if text_key(t) not in vectors]
    logger.info("%d texts: %d cached, %d to embed", len(texts), len(texts) - len(todo), len(todo))
    if not todo:
        return vectors
    init_ray(cfg)
    n_parts = len(fs.glob(posixpath.join(cache_dir, "part-*.parquet")))
    for start in range(0, len(todo), cfg.eval.chunk):
        chunk = todo[start : start + cfg.eval.chunk]
        rows = pa.table(
            {
                "id": [text_key(t) for t in chunk], "text": chunk, "shard": ["eval"] * len(chunk),
                "line": list(range(1, len(chunk) + 1)), "reason": [None] * len(chunk), "raw": [None] * len(chunk),
                "eof": [False] * len(chunk),
            },
            schema=READ_SCHEMA,
        )
        step = cfg.rows_per_call  # one block per actor call, no shuffle stage
        blocks = [rows.slice(i, step) for i in range(0, len(chunk), step)]
        ds = map_on_actor_pool(ray.data.from_arrow(blocks), cfg, Embedder, spec_for, resolved, inputs=len(blocks), blocks=len(blocks))
        keys, embs = [], []
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            keys += batch.column("id").to_pylist()
            embs.append(np.stack(batch.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32))
        emb = np.concatenate(embs)
        table = pa.table({"key": keys, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])})
        tmp = posixpath.join(cache_dir, f".part-{n_parts:05d}.tmp")
        pq.write_table(table, tmp)
        commit_file(fs, tmp, posixpath.join(cache_dir, f"part-{n_parts:05d}.parquet"))
        n_parts += 1
        vectors.update(zip(keys, emb))
    return vectors


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
            }
        else:
            x, y = vec(value.texts), value.labels
            if name in CV_TASKS:
                acc = classification_accuracy(x, y, folds=cfg.eval.folds)
                protocol = f"{cfg.eval.folds}-fold CV"
            else:
                acc = classification_accuracy(x, y, vec(value.test_texts), value.test_labels)
                protocol = "train/test split"
            results["classification"][name] = {"accuracy": acc, "protocol": protocol, "train": int(len(y))}
    sts = results["sts"]
    main7 = [sts[t]["all"] if t in STS_YEARS else sts[t]["spearman"] for t in (*STS_YEARS, "stsb", "sickr") if t in sts]
    if len(main7) == 7:
        results["sts"]["avg"] = float(np.mean(main7))
    return results


def evaluate_config(path: str | None, sets: list[str], output: str) -> dict:
    cfg = load_config(path, sets)
    logger.info("config %s:\n%s", path or "default", resolved_config_text(cfg))
    return evaluate_cfg(cfg, output, path)


def task_score(run: dict, task: str) -> float:
    """The headline score x 100 of one task id (sts/stsb, clustering/banking77, ...) in a run."""
    group, name = task.split("/", 1)
    if group == "sts":
        r = run["sts"][name]
        return r["all"] if "all" in r else r["spearman"]
    if group == "clustering":
        return run["clustering"][name]["v_measure"]
    return run["classification"][name]["accuracy"]


def evaluate_cfg(cfg: PipelineConfig, output: str, path: str | None = None) -> dict:
    """Score `cfg` on its eval.tasks; embeddings cached under `output`/cache/<fingerprint>."""
    tasks = selected_tasks(cfg)
    check_held_out(cfg)
    t0 = time.time()
    data = load_tasks(cfg, tasks)
    resolved = resolve_model(cfg.model, cfg.extraction)
    _, _, artifact_sha = check_artifact(cfg, resolved)
    provenance, fp = build_provenance(cfg, resolved, artifact_sha)
    texts = task_texts(data)
    t1 = time.time()
    vectors = embed_cached(
        cfg, resolved, lambda threads: EmbedSpec.from_config(cfg, resolved, num_threads=threads), texts,
        posixpath.join(output, "cache", fp),
    )
    t2 = time.time()

    def vec(batch: list[str]) -> np.ndarray:
        return np.stack([vectors[text_key(t)] for t in batch])

    results = score(cfg, data, vec)
    t3 = time.time()
    return {
        "name": Path(path).stem if path else "default",
        "config": path,
        "config_fingerprint": fp,
        "model": {"name": cfg.model.name, **provenance["model"]},
        "extraction": provenance["extraction"],
        "postprocess": provenance["postprocess"],
        "dimension": provenance["dimension"],
        "sts_variant": cfg.eval.sts_variant,
        "data_dir": cfg.eval.data_dir,
        **results,
        "timings": {"load_s": t1 - t0, "embed_s": t2 - t1, "score_s": t3 - t2, "texts": len(texts)},
        "package_version": __version__,
    }


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


def write_reports(runs: list[dict], output: str) -> dict:
    results = dict(runs[0], comparison=runs)
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "results.json").write_text(json.dumps(results, indent=1, default=float))
    flat = [rows_for(r) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    lines = ["| task | " + " | ".join(r["name"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{f[k]:.2f}" if k in f else "" for f in flat) + " |")
    note = "STS: Spearman x 100 of cosine vs gold (years: 'all' = subsets pooled); clustering: V-measure x 100; classification: accuracy x 100."
    (Path(output) / "results.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="YAML config (repeat to compare); default: configs/default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    p.add_argument("--output", required=True, help="folder for results.json, results.md, results.png and the cache")
    args = p.parse_args(argv)
    try:
        runs = [evaluate_config(c, args.set, args.output) for c in (args.config or [None])]
    except (ConfigError, InputError, ModelLoadError, ArtifactError, BenchmarkError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    write_reports(runs, args.output)
    print(Path(args.output, "results.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
