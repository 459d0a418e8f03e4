"""The whitening fit's steps around the embedding: check the destination, read the fit corpus,
turn the merged moments into an artifact tagged with the extraction fingerprint. No Ray, no torch.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np

from operators import __version__
from operators.config.schema import ConfigError, PipelineConfig, fingerprint
from operators.config.secrets import redact_text
from operators.io.readers import read_fit_corpus
from operators.io.storage import InputError, commit_file, get_fs
from operators.methods.postprocess import Fit, Moments, save_artifact
from operators.model.provenance import extraction_identity

logger = logging.getLogger("corpus_embed.fit_whitening")


def check_fit_destination(cfg: PipelineConfig) -> None:
    """whitening.corpus and whitening.artifact set, and the artifact's folder writable, before any work."""
    w = cfg.whitening
    if not w.corpus or not w.artifact:
        raise ConfigError("whitening.corpus and whitening.artifact must both be set, e.g. "
                          "--set whitening.corpus=wikitext-2 --set whitening.artifact=out/white")
    fs, path = get_fs(w.artifact, w.storage)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)


def fit_texts(cfg: PipelineConfig, dimension: int) -> list[str]:
    """The fit corpus's sentences (or lines); InputError when there are too few for a covariance."""
    w = cfg.whitening
    texts = read_fit_corpus(w.corpus, w.split, w.max_sentences, w.storage, cfg.eval.mirror)
    if len(texts) <= dimension:
        raise InputError(
            f"whitening.corpus: {len(texts)} texts from {w.corpus}, fewer than the {dimension} dimensions: "
            "a covariance needs many more rows than dimensions"
        )
    logger.info("fitting on %d %s from %s", len(texts), w.split, w.corpus)
    return texts


def write_fit(cfg: PipelineConfig, prepared, total: Moments, texts: int, started: float) -> dict:
    """Fit from the merged moments and write the artifact (safetensors + JSON metadata) atomically;
    returns the summary the command line prints."""
    if total.n != texts:
        raise RuntimeError(f"moments cover {total.n} of {texts} texts")
    w = cfg.whitening
    result = Fit.from_moments(total)
    lam = result.eigvals
    identity = extraction_identity(cfg, prepared.resolved)
    metadata = {
        "format": "corpus-embed/whitening@1",
        "extraction_fingerprint": fingerprint(identity),
        **identity,
        "corpus": {"source": redact_text(w.corpus), "split": w.split, "max_sentences": w.max_sentences},
        "eigenvalues": {
            "max": float(lam[0]), "min": float(lam[-1]), "median": float(np.median(lam)),
            "below_floor": int((lam < w.eps * lam[0]).sum()), "floor_relative": w.eps,
        },
        "package_version": __version__,
        "created_at": time.time(),
    }
    fs, path = get_fs(w.artifact, w.storage)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    sha = save_artifact(fs, tmp, result, metadata)
    commit_file(fs, tmp, path)
    return {
        "artifact": w.artifact, "sha256": sha, "count": total.n, "dimension": len(result.mean),
        "eigenvalues": metadata["eigenvalues"], "seconds": time.time() - started,
    }


def format_fit(s: dict) -> str:
    ev = s["eigenvalues"]
    return (
        f"done: whitening fitted on {s['count']} texts, {s['dimension']} dims, eigenvalues {ev['max']:.3g}..{ev['min']:.3g} "
        f"({ev['below_floor']} below the floor) in {s['seconds']:.1f}s -> {s['artifact']} (sha256 {s['sha256'][:16]})"
    )
