"""A model folder on object storage (moto S3) is copied once per node and loads like a local one.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np

from operators.config.schema import ExtractionConfig, ModelConfig
from operators.io import cache
from operators.model import resolution
from operators.model.embed import Embedder, EmbedSpec


def test_model_from_s3_uri_matches_the_local_folder(s3_bucket, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    fs = fsspec.filesystem("s3")
    for p in Path(tiny_bert).iterdir():
        fs.put_file(str(p), f"{s3_bucket}/models/tiny/{p.name}")
    ex = ExtractionConfig(pooling="mean")
    remote = ModelConfig(name=f"s3://{s3_bucket}/models/tiny")
    resolved = resolution.resolve_model(remote, ex)
    local = resolution.resolve_model(ModelConfig(name=tiny_bert), ex)
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

    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    s3 = boto3.client("s3")
    for p in Path(tiny_bert).iterdir():
        s3.upload_file(str(p), s3_bucket, f"m2/{p.name}")
    s3.put_object(Bucket=s3_bucket, Key="m2/../../../../escape.pth", Body=b"import os; os.system('echo owned')\n")
    s3.put_object(Bucket=s3_bucket, Key="m2/sub/../../../x.pth", Body=b"print('owned')\n")
    with pytest.raises(resolution.ModelLoadError, match="unsafe object name"):
        resolution.resolve_model(ModelConfig(name=f"s3://{s3_bucket}/m2"), ExtractionConfig())
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
    with pytest.raises(resolution.ModelLoadError, match="truncated or damaged"):
        resolution.resolve_model(ModelConfig(name=str(cut)), ExtractionConfig())

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert, pickled)
    next(pickled.glob("*.safetensors")).unlink()

    class Payload:  # a pickle that runs code when loaded without weights_only
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"weight": Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(resolution.ModelLoadError, match="does not load as plain tensors"):
        resolution.resolve_model(ModelConfig(name=str(pickled)), ExtractionConfig())


def test_every_file_that_changes_the_vectors_is_in_the_identity(tiny_bert, tmp_path):
    """config.json, tokenizer.json, modules.json and a pooling config edited with the weights
    unchanged: a new identity, so a new config fingerprint (a nightly run re-embeds) and a new
    engine export key; a README edit changes nothing."""
    import json
    import shutil

    from operators.config.loading import load_config
    from operators.model.embed import EmbedSpec
    from operators.model.engines import export_key
    from operators.model.prepare import prepare

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    cfg = load_config(None, [f"model.name={folder}"])

    def ids():
        p = prepare(cfg)
        spec = EmbedSpec(cfg.model.model_copy(update={"engine": "onnx"}), cfg.extraction, p.resolved)
        return p.resolved.identity["files_sha256"], p.fingerprint, json.dumps(export_key(spec), sort_keys=True)

    seen = [ids()]

    def edit(name, change):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tree = json.loads(path.read_text()) if path.exists() else {}
        change(tree)
        path.write_text(json.dumps(tree))
        seen.append(ids())

    edit("config.json", lambda t: t.update(layer_norm_eps=1e-5))
    edit("config.json", lambda t: t.update(hidden_act="gelu_new"))
    edit("tokenizer.json", lambda t: t["normalizer"].update(lowercase=False) if t.get("normalizer") else t.update(added_tokens=[]))
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    seen.append(ids())
    edit("1_Pooling/config.json", lambda t: t.update(pooling_mode_cls_token=True))
    for before, after in zip(seen, seen[1:]):
        assert all(a != b for a, b in zip(before, after)), "an edit left an identity unchanged"
    (folder / "README.md").write_text("a note")
    assert ids() == seen[-1]


def test_s3_folder_marker_objects_are_not_files(s3_bucket, tiny_bert, tmp_path, monkeypatch):
    """A zero-byte 'folder/' key (as S3 consoles write) in a model folder on S3 is no file to copy."""
    import boto3

    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    fs = fsspec.filesystem("s3")
    for p in Path(tiny_bert).iterdir():
        fs.put_file(str(p), f"{s3_bucket}/m/{p.name}")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="m/1_Pooling/", Body=b"")
    s3.put_object(Bucket=s3_bucket, Key="m/1_Pooling/config.json", Body=b'{"pooling_mode_mean_tokens": true}')
    folder = resolution.copy_to_local_cache(f"s3://{s3_bucket}/m", resolution.StorageConfig())
    assert (folder / "1_Pooling" / "config.json").is_file() and (folder / "config.json").is_file()


def test_modules_json_cannot_reach_outside_the_model_folder(tiny_bert, tmp_path):
    """A Dense module at '../../outside_dense' is refused, never read; a malformed modules.json
    gives a clear ModelLoadError, not a raw AttributeError."""
    import json
    import shutil

    import pytest

    folder = tmp_path / "deep" / "er" / "model"
    shutil.copytree(tiny_bert, folder)
    outside = tmp_path / "deep" / "outside_dense"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text(json.dumps({"in_features": 32, "out_features": 4}))
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "1", "path": "../../outside_dense",
                                                      "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(resolution.ModelLoadError, match="names a Dense module outside the model folder"):
        resolution.st_projection(folder)
    (folder / "modules.json").write_text(json.dumps({"0": "x"}))
    with pytest.raises(resolution.ModelLoadError, match="is not a list of modules"):
        resolution.st_projection(folder)
