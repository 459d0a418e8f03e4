"""Model presets: each is a complete config citing its source; the offline-loadable ones run.
The real SmolLM2 PromptEOL preset goes through the whole pipeline on local Ray.
"""

from __future__ import annotations

import numpy as np
import pytest

from operators.config import REPO_ROOT, load_config
from operators.models import resolve_model
from pipelines.embed_corpus import run
from tests.helpers import read_vectors, write_jsonl

PRESETS = sorted((REPO_ROOT / "configs" / "models").glob("*.yaml"))
OFFLINE = {"all-minilm-l6-v2.yaml", "smollm2-135m-prompteol.yaml"}


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


def test_smollm2_prompteol_through_the_pipeline(ray_local, tmp_path):
    pairs = [
        ("A man is playing a guitar.", "A person plays the guitar."),
        ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
        ("Stocks fell sharply on Monday.", "The stock market dropped steeply at the start of the week."),
    ]
    rows = [{"id": f"{i}{side}", "text": t} for i, pair in enumerate(pairs) for side, t in zip("ab", pair)]
    write_jsonl(tmp_path / "in" / "pairs.jsonl", rows)
    cfg = load_config(
        REPO_ROOT / "configs" / "models" / "smollm2-135m-prompteol.yaml",
        [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}"],
    )
    summary = run(cfg)
    assert summary.counts.rows_written == 6
    import fsspec

    v = read_vectors(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert all(x.shape == (576,) for x in v.values())

    def cos(a, b):
        return float(v[a] @ v[b] / np.linalg.norm(v[a]) / np.linalg.norm(v[b]))

    for i in range(3):
        para = cos(f"{i}a", f"{i}b")
        unrelated = max(cos(f"{i}a", f"{j}{s}") for j in range(3) if j != i for s in "ab")
        assert para > unrelated, (i, para, unrelated)
