"""The embed stage's output rows and the no-op model: the same rows, counts and schema as the model actor,
without torch, and the same forward batch size rule."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pyarrow as pa
import pytest

from operators.model.embed import Embedder
from operators.model.tokenize import tokenize_batch
from operators.model.vectors import NoopEmbedder
from tests.helpers import REPO, batch, spec_for, texts_of_mixed_length


def test_noop_model_matches_the_model_actor_but_for_the_vectors(minilm_path):
    spec = spec_for(minilm_path, max_batch_tokens=64)
    tokenized = tokenize_batch(batch(texts_of_mixed_length(40) + ["x"], [None] * 40 + ["empty text"]), spec)
    noop, real = NoopEmbedder(spec)(tokenized), Embedder(spec)(tokenized)
    assert noop.schema == real.schema
    for name in ("id", "n_tokens", "truncated", "padded_tokens"):
        assert noop.column(name).equals(real.column(name)), name
    assert noop.column("embedding").null_count == 1
    assert noop.column("embedding")[0].as_py() == [0.0] * 384
    assert 0 < sum(noop.column("n_tokens").to_pylist()) < sum(noop.column("padded_tokens").to_pylist())


def test_noop_model_imports_no_torch(minilm_path, tmp_path):
    """The no-op run measures the data path: its actor (handed a pickled spec and tokenized
    batches, as in the pipeline) must not pay for torch, transformers or a model."""
    spec = spec_for(minilm_path)
    t = tokenize_batch(batch(["one text", "two texts"]), spec)
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    with pa.OSFile(str(tmp_path / "batch.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    code = (
        "import pickle, sys, pyarrow as pa; from operators.model.vectors import NoopEmbedder; "
        f"spec = pickle.loads(open({str(tmp_path / 'spec.pkl')!r}, 'rb').read()); "
        f"out = NoopEmbedder(spec)(pa.ipc.open_file({str(tmp_path / 'batch.arrow')!r}).read_all()); "
        f"assert out.column('n_tokens').to_pylist() == {[len(ids) for ids in t.column('input_ids').to_pylist()]}, out; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() == "[]"


@pytest.mark.parametrize("device,cuda,want", [("auto", True, 256), ("auto", False, 32), ("cpu", True, 32), ("cuda", True, 256)])
def test_noop_model_sizes_forward_batches_by_the_resolved_device(minilm_path, monkeypatch, device, cuda, want):
    """With model.device auto on a GPU actor the model runs 256-text batches: the no-op model,
    which never imports torch, must pick the same, or its padding counts differ from a real run's."""
    from operators.model import vectors
    from operators.model.embed import Embedder

    monkeypatch.setattr(vectors, "cuda_visible", lambda: cuda)
    spec = spec_for(minilm_path, model_kw={"device": device})
    assert NoopEmbedder(spec).batch_size == want
    if not cuda or device == "cpu":  # and the model actor agrees where this machine can run it
        assert Embedder(spec).batch_size == want

