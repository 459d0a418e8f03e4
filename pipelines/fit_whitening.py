"""Fit whitening (and the other fitted post-processing) on a text corpus such as Wikitext.

    python pipelines/fit_whitening.py --set whitening.corpus=wikitext-2 --set whitening.artifact=out/white
    python pipelines/embed_corpus.py --set whitening.artifact=out/white --set whitening.k=256

prepare (raw extraction: post-processing off) -> read the corpus -> tokenize -> embed each batch
into mergeable moments (n, sum x, sum x x^T in float64) on the corpus pipeline's actor pool ->
merge them on the driver, one batch at a time: memory O(d^2), never O(N x d) -> fit -> write the
artifact (safetensors, no pickle, JSON metadata), tagged with the extraction fingerprint, so it is
refused for any other model or extraction config.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.config.schema import PipelineConfig
from operators.execution.stages import embed, init_ray, iter_tables, read_items, tokenize
from operators.methods.postprocess import merge_moment_tables
from operators.model.prepare import prepare
from operators.model.whitening import check_fit_destination, fit_texts, format_fit, write_fit
from operators.run import cli


def fit(cfg: PipelineConfig, args=None) -> dict:
    """Read, embed, accumulate, write the artifact; returns a summary."""
    started = time.time()
    check_fit_destination(cfg)  # an unwritable destination fails before embedding
    prepared = prepare(cfg, postprocess=False)
    texts = fit_texts(cfg, prepared.resolved.dimension)
    init_ray(cfg)
    n_blocks = max(1, len(texts) // cfg.rows_per_call)
    ds = read_items([{"text": t} for t in texts], n_blocks)
    ds = tokenize(ds, cfg, prepared, inputs=n_blocks)
    ds = embed(ds, cfg, prepared, "moments", blocks=n_blocks)
    moments = merge_moment_tables(iter_tables(ds), prepared.resolved.dimension)
    return write_fit(cfg, prepared, moments, len(texts), started)


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, argv, fit, format_fit)


if __name__ == "__main__":
    sys.exit(main())
