"""Quick STS check: Spearman x 100 of one configuration on STS pair files.

    python pipelines/score_sts.py --config configs/models/smollm2-135m-prompteol.yaml \
        --data ../shared/data/sts/raw/stsb.test.tsv

A file is `score<TAB>sentence1<TAB>sentence2` with a header line (the layout of shared/data/sts),
read by the evaluation stage's own reader.
Embeds the unique sentences in this process with the pipeline's own embedding operator, so the
number measures exactly what the corpus pipeline writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from operators.benchmarks import BenchmarkError, read_pairs
from operators.config import load_config
from operators.embed import Embedder, EmbedSpec
from operators.metrics import sts_spearman
from operators.models import resolve_model
from operators.provenance import check_artifact


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
        try:
            pairs = read_pairs(uri)
        except BenchmarkError as e:
            raise SystemExit(f"error: {e}") from None
        s1, s2, gold = pairs.s1, pairs.s2, pairs.gold
        unique = sorted(set(s1) | set(s2))
        t = time.time()
        vecs, _, _ = embedder.embed_texts(unique)
        index = {s: i for i, s in enumerate(unique)}
        score = sts_spearman(vecs[[index[s] for s in s1]], vecs[[index[s] for s in s2]], gold)
        print(f"{uri}\tspearman x100 = {score:.2f}\t({len(gold)} pairs, {len(unique)} sentences, {time.time() - t:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
