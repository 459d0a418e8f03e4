"""Fit whitening (and the other fitted post-processing) on a text corpus such as Wikitext.

    python pipelines/fit_whitening.py --set 'whitening.corpus=../shared/data/wikitext-2/wiki.*.raw' \
        --set whitening.artifact=out/white
    python pipelines/embed_corpus.py --set whitening.artifact=out/white --set whitening.k=256

Embeds the corpus with the same operator and extraction config as the corpus pipeline
(post-processing off) on a Ray Data actor pool; each batch becomes mergeable moments
(n, sum x, sum x x^T in float64) that the driver adds up: memory O(d^2), never O(N x d). The
artifact (safetensors, no pickle, JSON metadata) is tagged with the extraction fingerprint, so
it is refused for any other model or extraction config.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa

from operators import __version__
from operators.config import ConfigError, PipelineConfig, fingerprint
from operators.embed import Embedder, EmbedSpec
from operators.models import resolve_model
from operators.postprocess import Fit, Moments, save_artifact
from operators.provenance import extraction_identity
from operators.readers import read_fit_corpus
from operators.storage import InputError, commit_file, get_fs

logger = logging.getLogger("corpus_embed.fit_whitening")


class BatchMoments:
    """Embed a batch of texts and return its moments as one row (n, sum, outer)."""

    def __init__(self, spec: EmbedSpec):
        self.embedder = Embedder(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        _, vecs, _, _, _ = self.embedder.embed_batch(batch)
        m = Moments.of(vecs)
        return pa.table({"n": [m.n], "sum": [m.sum.tolist()], "outer": [m.outer.ravel().tolist()]})


def fit(cfg: PipelineConfig) -> dict:
    """Read, embed, accumulate, write the artifact; returns a summary."""
    import ray

    from pipelines.embed_corpus import init_ray, map_on_actor_pool

    w = cfg.whitening
    if not w.corpus or not w.artifact:
        raise ConfigError("whitening.corpus and whitening.artifact must both be set, e.g. "
                          "--set 'whitening.corpus=../shared/data/wikitext-2/wiki.*.raw' --set whitening.artifact=out/white")
    started = time.time()
    resolved = resolve_model(cfg.model, cfg.extraction)
    identity = extraction_identity(cfg, resolved)
    fs, path = get_fs(w.artifact, w.storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)  # fail on an unwritable destination before embedding
    texts = read_fit_corpus(w.corpus, w.split, w.max_sentences, w.storage)
    if len(texts) <= resolved.dimension:
        raise InputError(
            f"whitening.corpus: {len(texts)} texts from {w.corpus}, fewer than the {resolved.dimension} dimensions: "
            "a covariance needs many more rows than dimensions"
        )
    logger.info("fitting on %d %s from %s", len(texts), w.split, w.corpus)

    init_ray(cfg)
    n_blocks = max(1, len(texts) // cfg.rows_per_call)
    ds = ray.data.from_items([{"text": t} for t in texts], override_num_blocks=n_blocks)
    ds = map_on_actor_pool(
        ds, cfg, BatchMoments,
        lambda threads: EmbedSpec.from_config(cfg, resolved, num_threads=threads, postprocess=False),  # raw extraction
        resolved, inputs=n_blocks, blocks=n_blocks,
    )
    d = resolved.dimension
    total = Moments.zeros(d)
    for row in ds.iter_rows():  # one partial at a time: O(d^2) on the driver
        total = total.merge(Moments(int(row["n"]), np.asarray(row["sum"]), np.asarray(row["outer"]).reshape(d, d)))
    if total.n != len(texts):
        raise RuntimeError(f"moments cover {total.n} of {len(texts)} texts")
    result = Fit.from_moments(total)
    lam = result.eigvals
    metadata = {
        "format": "corpus-embed/whitening@1",
        "extraction_fingerprint": fingerprint(identity),
        **identity,
        "corpus": {"source": w.corpus, "split": w.split, "max_sentences": w.max_sentences},
        "eigenvalues": {
            "max": float(lam[0]), "min": float(lam[-1]), "median": float(np.median(lam)),
            "below_floor": int((lam < w.eps * lam[0]).sum()), "floor_relative": w.eps,
        },
        "package_version": __version__,
        "created_at": time.time(),
    }
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    sha = save_artifact(fs, tmp, result, metadata)
    commit_file(fs, tmp, path)
    return {
        "artifact": w.artifact, "sha256": sha, "count": total.n, "dimension": d,
        "eigenvalues": metadata["eigenvalues"], "seconds": time.time() - started,
    }


def format_fit(s: dict) -> str:
    ev = s["eigenvalues"]
    return (
        f"done: whitening fitted on {s['count']} texts, {s['dimension']} dims, eigenvalues {ev['max']:.3g}..{ev['min']:.3g} "
        f"({ev['below_floor']} below the floor) in {s['seconds']:.1f}s -> {s['artifact']} (sha256 {s['sha256'][:16]})"
    )


def main(argv: list[str] | None = None) -> int:
    from pipelines.embed_corpus import cli

    return cli(__doc__, argv, fit, format_fit)


if __name__ == "__main__":
    sys.exit(main())
