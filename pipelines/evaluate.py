"""Score configurations on held-out benchmarks: MTEB's tasks by name (STS, classification,
retrieval, ...) with mteb's own evaluators, and the clustering / SentEval tasks MTEB lacks.

    python pipelines/evaluate.py --config configs/models/all-minilm-l6-v2.yaml --output out/eval
    python pipelines/evaluate.py --config a.yaml --config b.yaml --set eval.tasks='[sts/stsb]' --output out/cmp
    python pipelines/evaluate.py --sweep configs/sweeps/minilm-layers-pooling.yaml --output out/sweep

Every config's tasks are loaded first (from the Hub, GitHub, or the mirror in eval.mirror /
CORPUS_EMBED_MIRROR, downloaded once into the cache): a bad name or a missing file fails before
any work. Per configuration: prepare -> embed their unique texts on Ray through the corpus
pipeline's own tokenize and embedding stages (extraction and post-processing included, so a score
measures exactly what production writes) -> score; then the reports. Embeddings are cached per
configuration fingerprint under OUTPUT/cache/, written as they arrive: re-scoring is cheap and a
rerun after a crash resumes. Writes OUTPUT/results.json, OUTPUT/results.md, OUTPUT/results.png,
and MTEB's own result files under OUTPUT/mteb/results/<model>/<config fingerprint>/<Task>.json.

--sweep FILE: a base config and what to vary (operators/evaluation/sweep.py). Variants that share a model and
its input text share one forward pass, pooled by every head they need on the actors; whitening and
ABTT variants are fitted from the same pass over the fit corpus. Writes the ranked results, the
chart, and OUTPUT/best/config.yaml, the winner as a config pipelines/embed_corpus.py runs.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.config.loading import load_config
from operators.evaluation.scoring import (
    check_held_out,
    evaluate,
    load_tasks,
    query_side_for,
    results_markdown,
    selected_tasks,
    write_reports,
)
from operators.evaluation.sweep import describe, load_sweep, run_sweep
from operators.evaluation.sweep_reports import sweep_markdown, write_sweep_reports
from operators.execution.stages import ray_embed_fn
from operators.model.prepare import prepare
from operators.run import cli

logger = logging.getLogger("corpus_embed.evaluate")


def run_names(cfgs: list, args: argparse.Namespace) -> list[str]:
    """Each run's name: its config file's stem; with --set, what --set changes from that file too,
    unless several configs are compared and their stems already tell them apart (--set applies to all)."""
    paths = args.config or [None]
    stems = [Path(p).stem if p else "default" for p in paths]
    if not args.set or (len(stems) > 1 and len(set(stems)) == len(stems)):
        return stems
    names = []
    for cfg, path, stem in zip(cfgs, paths, stems):
        change = describe(cfg, load_config(path, []))
        names.append(stem if change == "base" else f"{stem}: {change}")
    return names


def run(cfgs: list, args: argparse.Namespace) -> dict:
    if args.sweep:
        sweep = load_sweep(args.sweep, args.set, args.output)  # every variant validated before any work
        result = run_sweep(sweep, lambda cfg: prepare(cfg, postprocess=False), ray_embed_fn, args.output, logger.info)
        write_sweep_reports(sweep, result, args.output)
        return result
    names = run_names(cfgs, args)
    data = []
    for cfg in cfgs:  # every config's tasks, their data and the held-out rule checked before any embedding
        check_held_out(cfg)
        data.append(load_tasks(cfg, selected_tasks(cfg)))
    runs = []
    for cfg, name, path, tasks in zip(cfgs, names, args.config or [None], data):
        prepared = prepare(cfg)
        runs.append(evaluate(cfg, prepared, ray_embed_fn(cfg, prepared), posixpath.join(args.output, "cache"), name, path,
                             logger.info, tasks, query_side_for(cfg, prepare, ray_embed_fn), posixpath.join(args.output, "mteb")))
    return write_reports(runs, args.output)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="folder for results.json, results.md, results.png and the cache")
    p.add_argument("--sweep", help="a sweep file (base config + axes and/or variants): score every variant, sharing forward passes")


def summary(results: dict) -> str:
    return sweep_markdown(results) if "variants" in results else results_markdown(results["comparison"])


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, argv, run, summary, add_arguments, compare=True)


if __name__ == "__main__":
    sys.exit(main())
