"""Whitening end to end: fit through local Ray on a raw text file (Wikitext's stand-in; the named
Wikitext corpus itself is read in tests/operators/io/test_readers.py), compare with numpy on the same
embeddings, apply in the corpus pipeline, refuse mismatched and corrupt artifacts."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from operators.config.loading import load_config
from operators.config.schema import StorageConfig
from operators.io.readers import read_fit_corpus
from operators.methods.postprocess import load_artifact
from operators.model.embed import Embedder, EmbedSpec
from operators.model.resolution import resolve_model
from pipelines import embed_corpus, fit_whitening
from tests.helpers import REPO, make_corpus, read_vectors

WIKI = str(REPO / "configs" / "sample_corpus" / "part-003.txt")  # Wikipedia sentences, one a line
N = 400


def sets(tmp_path, model, *extra):
    return [
        f"model.name={model}", f"whitening.corpus={WIKI}", f"whitening.artifact={tmp_path / 'white.safetensors'}",
        f"whitening.max_sentences={N}", "ray.batch_size=100", f"input.uri={tmp_path / 'in'}",
        f"output.uri={tmp_path / 'out'}", *extra,
    ]


@pytest.fixture(scope="module")
def fitted(ray_local, tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("white")
    cfg = load_config(None, sets(tmp, tiny_bert, "extraction.normalize=false"))
    summary = fit_whitening.fit(cfg)
    return tmp, cfg, summary


def test_fit_equals_numpy_on_the_same_embeddings(fitted):
    tmp, cfg, summary = fitted
    assert summary["count"] == N and summary["dimension"] == 32
    texts = read_fit_corpus(WIKI, "sentences", N, StorageConfig())
    embedder = Embedder(EmbedSpec.from_config(cfg, resolve_model(cfg.model, cfg.extraction), postprocess=False))
    x = embedder.embed_texts(texts).vectors
    fit, meta, sha = load_artifact(fsspec.filesystem("file"), cfg.whitening.artifact)
    assert sha == summary["sha256"] and meta["corpus"]["source"] == WIKI and meta["count"] == N
    np.testing.assert_allclose(fit.mean, x.mean(axis=0), atol=1e-6)
    cov = (fit.eigvecs * fit.eigvals) @ fit.eigvecs.T
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), atol=1e-6)

    # applied: the fit corpus comes out with mean ~0 and covariance ~I
    white = Embedder(EmbedSpec.from_config(cfg, resolve_model(cfg.model, cfg.extraction)))
    y = white.embed_texts(texts).vectors
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-3)
    # The final LayerNorm (unit scale, zero shift at init) makes every vector sum to ~0, so one
    # eigenvalue is ~0: the floor keeps that direction at ~0 instead of blowing it up.
    assert fit.eigvals[-1] < 1e-6 * fit.eigvals[0]
    cov_y = np.cov(y, rowvar=False)
    np.testing.assert_allclose(cov_y[:31, :31], np.eye(31), atol=2e-3)
    assert abs(cov_y[31, 31]) < 1e-3


def test_corpus_pipeline_applies_the_artifact_and_records_it(fitted):
    tmp, cfg, summary = fitted
    make_corpus(tmp / "in", shards=1, rows=20)
    run_cfg = load_config(None, sets(tmp, cfg.model.name, "extraction.normalize=false", "whitening.k=8"))
    result = embed_corpus.run(run_cfg)
    assert result.counts.rows_written == 20
    vectors = read_vectors(fsspec.filesystem("file"), str(tmp / "out"))
    assert all(v.shape == (8,) for v in vectors.values())
    (shard,) = (tmp / "out").glob("*.parquet")
    meta = json.loads(pq.ParquetFile(shard).metadata.metadata[b"corpus_embed"])
    assert meta["postprocess"] == [{"op": "whiten", "k": 8, "method": "pca", "eps": 1e-6}]
    assert meta["whitening_artifact"]["sha256"] == summary["sha256"] and meta["dimension"] == 8


def test_mismatched_and_corrupt_artifacts_are_refused(fitted, capsys):
    tmp, cfg, _ = fitted
    other = sets(tmp, cfg.model.name, "extraction.pooling=cls")
    make_corpus(tmp / "in", shards=1, rows=5)
    assert embed_corpus.main(sum((["--set", a] for a in other), [])) == 2
    assert "was fitted for another model or extraction config" in capsys.readouterr().err
    blob = (tmp / "white.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(blob[:100])
    cut = sets(tmp, cfg.model.name, "extraction.normalize=false", f"whitening.artifact={tmp / 'cut.safetensors'}")
    assert embed_corpus.main(sum((["--set", a] for a in cut), [])) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_fit_needs_corpus_and_artifact(capsys):
    assert fit_whitening.main(["--set", "whitening.artifact=/tmp/x"]) == 2
    assert "whitening.corpus and whitening.artifact must both be set" in capsys.readouterr().err
