"""Model presets: each is a complete config citing its source; the offline-loadable ones run.
The real SmolLM2 PromptEOL preset ranks paraphrases first; its extraction runs through the whole
pipeline on local Ray on a tiny decoder.
"""

from __future__ import annotations

import numpy as np
import pytest

from operators.config.loading import load_config
from operators.config.schema import REPO_ROOT
from operators.model.resolution import resolve_model
from pipelines.embed_corpus import run
from tests.helpers import read_vectors, write_jsonl

PRESETS = sorted((REPO_ROOT / "configs" / "models").glob("*.yaml"))
OFFLINE = {"all-minilm-l6-v2.yaml", "smollm2-135m-prompteol.yaml", "all-minilm-l6-v2-onnx.yaml", "all-minilm-l6-v2-onnx-int8.yaml",
           "all-minilm-l6-v2-openvino.yaml", "all-minilm-l6-v2-openvino-int8.yaml"}


def test_presets_exist_for_every_family():
    names = {p.name for p in PRESETS}
    assert {
        "bert-base-uncased-first-last.yaml", "sentence-t5-base.yaml", "t5-base-decoder-first.yaml",
        "opt-1.3b-prompteol.yaml", "all-minilm-l6-v2.yaml", "smollm2-135m-prompteol.yaml", "bge-small-en-v1.5.yaml",
    } <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_is_a_complete_config_that_cites_its_source(preset):
    cfg = load_config(preset)
    assert cfg.input.uri == "configs/sample_corpus/"  # inherited from default.yaml via `extends`
    text = preset.read_text()
    assert "http" in text or "et al." in text
    if preset.name in OFFLINE:
        resolve_model(cfg.model, cfg.extraction)


def test_smollm2_prompteol_ranks_paraphrases_first(tmp_path):
    """The real SmolLM2 PromptEOL preset, through the embedding operator the pipeline runs: each
    sentence is closest to its paraphrase."""
    from operators.model.embed import Embedder
    from operators.model.prepare import prepare

    pairs = [
        ("A man is playing a guitar.", "A person plays the guitar."),
        ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
        ("Stocks fell sharply on Monday.", "The stock market dropped steeply at the start of the week."),
    ]
    cfg = load_config(REPO_ROOT / "configs" / "models" / "smollm2-135m-prompteol.yaml")
    vecs = Embedder(prepare(cfg).spec()).embed_texts([t for pair in pairs for t in pair]).vectors
    assert vecs.shape == (6, 576)
    v = {f"{i}{side}": vecs[2 * i + k] for i in range(3) for k, side in enumerate("ab")}

    def cos(a, b):
        return float(v[a] @ v[b] / np.linalg.norm(v[a]) / np.linalg.norm(v[b]))

    for i in range(3):
        para = cos(f"{i}a", f"{i}b")
        unrelated = max(cos(f"{i}a", f"{j}{s}") for j in range(3) if j != i for s in "ab")
        assert para > unrelated, (i, para, unrelated)


def test_the_prompteol_preset_runs_through_the_pipeline_on_a_decoder(ray_local, tmp_path, tiny_llama):
    """The preset's extraction (PromptEOL template, last-token pooling) on a decoder LLM, end to end
    on local Ray; the vectors equal the operator's on the same texts."""
    from operators.model.embed import Embedder
    from operators.model.prepare import prepare

    texts = ["A man is playing a guitar.", "A cat naps on the couch.", "Stocks fell sharply on Monday."]
    write_jsonl(tmp_path / "in" / "pairs.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    cfg = load_config(
        REPO_ROOT / "configs" / "models" / "smollm2-135m-prompteol.yaml",
        [f"model.name={tiny_llama}", "model.gguf_file=null", f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}",
         "ray.tokenize_on=tasks"],
    )
    assert cfg.extraction.pooling == "last_token" and "in one word" in cfg.extraction.template
    summary = run(cfg)
    assert summary.counts.rows_written == 3
    import fsspec

    got = read_vectors(fsspec.filesystem("file"), str(tmp_path / "out"))
    want = Embedder(prepare(cfg).spec()).embed_texts(texts).vectors
    np.testing.assert_allclose(np.stack([got[str(i)] for i in range(3)]), want, atol=1e-5)


@pytest.mark.parametrize("preset", ["all-minilm-l6-v2-openvino.yaml", "all-minilm-l6-v2-onnx-int8.yaml"])
def test_the_cpu_engine_presets_run_through_the_pipeline(ray_local, tmp_path, preset):
    """An engine preset end to end on local Ray (the export made on an embedding actor): float32
    OpenVINO equals torch's vectors within 1e-4; int8 ONNX is close to them, and its shards carry
    the engine in their provenance and a fingerprint of their own."""
    import json

    import fsspec
    import pyarrow.parquet as pq

    texts = [f"Sentence number {i} about a cat, a dog and the weather." for i in range(40)]
    write_jsonl(tmp_path / "in" / "part.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    base = [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}"]
    run(load_config(REPO_ROOT / "configs" / "models" / "all-minilm-l6-v2.yaml", base))
    want = read_vectors(fsspec.filesystem("file"), str(tmp_path / "out"))
    cfg = load_config(REPO_ROOT / "configs" / "models" / preset, [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out-engine'}"])
    assert run(cfg).counts.rows_written == 40
    got = read_vectors(fsspec.filesystem("file"), str(tmp_path / "out-engine"))
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    if cfg.model.quantization == "none":
        assert diff <= 1e-4
    else:
        assert 1e-3 < diff and min(float(got[k] @ want[k]) for k in want) > 0.97
    meta = json.loads(pq.ParquetFile(next((tmp_path / "out-engine").glob("*.parquet"))).metadata.metadata[b"corpus_embed"])
    assert meta["engine"] == {"name": cfg.model.engine, "quantization": cfg.model.quantization}
    assert meta["model"]["engine"] == cfg.model.engine
