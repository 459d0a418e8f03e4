"""A model folder on object storage (moto S3) is copied once per node and loads like a local one.
"""

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
    got = Embedder(EmbedSpec(remote, ex, resolved)).embed_texts(texts).vectors
    want = Embedder(EmbedSpec(ModelConfig(name=tiny_bert), ex, local)).embed_texts(texts).vectors
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(list((tmp_path / "cache" / "models").glob("*/.complete"))) == 1  # the actor reused the copy


def test_a_model_bucket_cannot_write_outside_the_cache(s3_bucket, tiny_bert, tmp_path, monkeypatch):
    """An object key with '..' in a model folder on S3 is refused before anything is copied."""
    import boto3
    import pytest

    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    s3 = boto3.client("s3")
    for p in Path(tiny_bert).iterdir():
        s3.upload_file(str(p), s3_bucket, f"m2/{p.name}")
    s3.put_object(Bucket=s3_bucket, Key="m2/../../../../escape.pth", Body=b"import os; os.system('echo owned')\n")
    s3.put_object(Bucket=s3_bucket, Key="m2/sub/../../../x.pth", Body=b"print('owned')\n")
    with pytest.raises(models.ModelLoadError, match="unsafe object name"):
        models.resolve_model(ModelConfig(name=f"s3://{s3_bucket}/m2"), ExtractionConfig())
    assert not list(tmp_path.rglob("*.pth"))  # nothing landed anywhere under the cache's parents
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_weights_that_cannot_load_are_refused_before_work(tiny_bert, tmp_path):
    import shutil

    import pytest
    import torch

    cut = tmp_path / "cut"
    shutil.copytree(tiny_bert, cut)
    (w,) = cut.glob("*.safetensors")
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(models.ModelLoadError, match="truncated or damaged"):
        models.resolve_model(ModelConfig(name=str(cut)), ExtractionConfig())

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert, pickled)
    next(pickled.glob("*.safetensors")).unlink()

    class Payload:  # a pickle that runs code when loaded without weights_only
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"weight": Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(models.ModelLoadError, match="does not load as plain tensors"):
        models.resolve_model(ModelConfig(name=str(pickled)), ExtractionConfig())
