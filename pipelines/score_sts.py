"""Quick STS check: Spearman x 100 of one configuration on STS pair files.

    python pipelines/score_sts.py --config configs/models/smollm2-135m-prompteol.yaml \
        --data my_pairs.tsv

A file is `score<TAB>sentence1<TAB>sentence2` with a header line (any path or fsspec URI). For the
benchmarks themselves, use pipelines/evaluate.py (MTEB's STS tasks by name). prepare -> per file: read the pairs -> embed the unique
sentences in this process with the pipeline's own embedding operator (so the number measures
exactly what the corpus pipeline writes) -> score.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.config.schema import PipelineConfig
from operators.evaluation.eval_data import read_pairs
from operators.evaluation.scoring import pair_scores
from operators.model.prepare import prepare
from operators.run import cli


def score(cfg: PipelineConfig, args: argparse.Namespace) -> list[str]:
    pairs = {uri: read_pairs(uri) for uri in args.data}  # every file checked before the model loads
    prepared = prepare(cfg)  # a whitening artifact must match this extraction config
    from operators.model.embed import Embedder  # in this process: a quick check needs no cluster

    embedder = Embedder(prepared.spec())
    lines = []
    for uri, p in pairs.items():
        t = time.time()
        spearman, sentences = pair_scores(p, lambda texts: embedder.embed_texts(texts).vectors)
        lines.append(f"{uri}\tspearman x100 = {spearman:.2f}\t({len(p.gold)} pairs, {sentences} sentences, {time.time() - t:.0f}s)")
        print(lines[-1], flush=True)
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", required=True, help="STS pair file (repeatable)")


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, argv, score, lambda lines: f"done: {len(lines)} files scored", add_arguments)


if __name__ == "__main__":
    sys.exit(main())
