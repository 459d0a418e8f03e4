"""A model folder on object storage (moto S3) is copied once per node and loads like a local one."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np

from operators import models
from operators.config import ExtractionConfig, ModelConfig
from operators.embed import Embedder, EmbedSpec


def test_model_from_s3_uri_matches_the_local_folder(s3_bucket, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    fs = fsspec.filesystem("s3")
    for p in Path(tiny_bert).iterdir():
        fs.put_file(str(p), f"{s3_bucket}/models/tiny/{p.name}")
    ex = ExtractionConfig(pooling="mean")
    remote = ModelConfig(name=f"s3://{s3_bucket}/models/tiny")
    resolved = models.resolve_model(remote, ex)
    local = models.resolve_model(ModelConfig(name=tiny_bert), ex)
    assert resolved.identity["weights_sha256"] == local.identity["weights_sha256"]
    copies = list((tmp_path / "cache" / "models").glob("*/.complete"))
    assert len(copies) == 1
    texts = ["a remote model", "loads like a local one"]
    got = Embedder(EmbedSpec(remote, ex, resolved)).embed_texts(texts)[0]
    want = Embedder(EmbedSpec(ModelConfig(name=tiny_bert), ex, local)).embed_texts(texts)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(list((tmp_path / "cache" / "models").glob("*/.complete"))) == 1  # the actor reused the copy
