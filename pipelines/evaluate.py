"""Score configurations on held-out benchmarks: STS, clustering, classification.

    python pipelines/evaluate.py --config configs/models/all-minilm-l6-v2.yaml --output out/eval
    python pipelines/evaluate.py --config a.yaml --config b.yaml --set eval.tasks='[sts/stsb]' --output out/cmp

Per configuration: prepare -> load the tasks -> embed their unique texts on Ray through the corpus
pipeline's own tokenize and embedding stages (extraction and post-processing included, so a score
measures exactly what production writes) -> score; then the reports. Embeddings are cached per
configuration fingerprint under OUTPUT/cache/, written as they arrive: re-scoring is cheap and a
rerun after a crash resumes. Writes OUTPUT/results.json, OUTPUT/results.md and OUTPUT/results.png.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import cli
from operators.evaluation import check_held_out, evaluate, results_markdown, selected_tasks, write_reports
from operators.execution import ray_embed_fn
from operators.prepare import prepare

logger = logging.getLogger("corpus_embed.evaluate")


def run(cfgs: list, args: argparse.Namespace) -> dict:
    names = [Path(p).stem if p else "default" for p in (args.config or [None])]
    for cfg in cfgs:  # every config's tasks and held-out rule checked before any embedding
        selected_tasks(cfg)
        check_held_out(cfg)
    runs = []
    for cfg, name, path in zip(cfgs, names, args.config or [None]):
        prepared = prepare(cfg)
        runs.append(evaluate(cfg, prepared, ray_embed_fn(cfg, prepared), posixpath.join(args.output, "cache"), name, path, logger.info))
    return write_reports(runs, args.output)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="folder for results.json, results.md, results.png and the cache")


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, argv, run, lambda results: results_markdown(results["comparison"]), add_arguments, compare=True)


if __name__ == "__main__":
    sys.exit(main())
