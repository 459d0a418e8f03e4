"""Quick STS check: Spearman x 100 of one configuration on STS pair files.

    python pipelines/score_sts.py --config configs/models/smollm2-135m-prompteol.yaml \
        --data ../shared/data/sts/raw/stsb.test.tsv

A file is `score<TAB>sentence1<TAB>sentence2` with a header line (the layout of shared/data/sts).
Embeds the unique sentences in this process with the pipeline's own embedding operator, so the
number measures exactly what the corpus pipeline writes.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsspec
import numpy as np

from operators.config import load_config
from operators.embed import Embedder, EmbedSpec
from operators.metrics import sts_spearman
from operators.models import resolve_model
from operators.provenance import check_artifact


def read_pairs(uri: str) -> tuple[list[str], list[str], np.ndarray]:
    s1, s2, gold = [], [], []
    with fsspec.open(uri, "rt", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["score", "sentence1", "sentence2"]:
            raise SystemExit(f"{uri}: expected a 'score, sentence1, sentence2' header, got {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) < 3:
                raise SystemExit(f"{uri}:{line}: expected 3 tab-separated columns, got {len(row)}")
            gold.append(float(row[0]))
            s1.append(row[1])
            s2.append(row[2])
    return s1, s2, np.asarray(gold)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--data", action="append", required=True, help="STS pair file (repeatable)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    resolved = resolve_model(cfg.model, cfg.extraction)
    check_artifact(cfg, resolved)  # a whitening artifact must match this extraction config
    embedder = Embedder(EmbedSpec.from_config(cfg, resolved))
    for uri in args.data:
        s1, s2, gold = read_pairs(uri)
        unique = sorted(set(s1) | set(s2))
        t = time.time()
        vecs, _, _ = embedder.embed_texts(unique)
        index = {s: i for i, s in enumerate(unique)}
        score = sts_spearman(vecs[[index[s] for s in s1]], vecs[[index[s] for s in s2]], gold)
        print(f"{uri}\tspearman x100 = {score:.2f}\t({len(gold)} pairs, {len(unique)} sentences, {time.time() - t:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
