"""The embedding operator, called directly (no Ray): real MiniLM against sentence-transformers,
truncation counting, pass-through of rejected and end-of-shard rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from operators.config import ExtractionConfig, ModelConfig
from operators.embed import Embedder, EmbedSpec
from operators.models import resolve_model
from operators.readers import READ_SCHEMA
from tests.conftest import sample_sentences


def make(name, *, pooling="mean", layers=(-1,), normalize=False, max_length=None, dtype="float32", output_dtype="float32", **ex):
    model = ModelConfig(name=name, max_length=max_length, dtype=dtype, batch_size=16)
    extraction = ExtractionConfig(pooling=pooling, layers=layers, normalize=normalize, **ex)
    return Embedder(EmbedSpec(model, extraction, resolve_model(model, extraction), output_dtype=output_dtype))


def batch(texts, reasons=None):
    n = len(texts)
    reasons = reasons or [None] * n
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "text": [None if r else t for t, r in zip(texts, reasons)],
            "shard": ["s"] * n,
            "line": list(range(1, n + 1)),
            "reason": reasons,
            "raw": [None] * n,
            "eof": [False] * n,
        },
        schema=READ_SCHEMA,
    )


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return make(minilm_path, normalize=True)


def test_minilm_mean_equals_sentence_transformers_encode(minilm, minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = sample_sentences(200) + ["Short.", "A much, much longer sentence " * 60]  # one over 256 tokens
    ours, _, truncated = minilm.embed_texts(texts)
    st = SentenceTransformer(minilm_path, device="cpu")
    theirs = st.encode(texts, batch_size=32, convert_to_numpy=True)
    assert st.max_seq_length == minilm.max_length == 256
    assert np.abs(ours - theirs).max() <= 1e-5
    assert truncated.tolist() == [False] * 201 + [True]


def test_truncation_is_counted_and_cut_at_max_length(minilm_path):
    e = make(minilm_path, max_length=8)
    texts = ["one two three", "one two three four five six seven eight nine ten"]
    vecs, n_tokens, truncated = e.embed_texts(texts)
    assert truncated.tolist() == [False, True]
    assert n_tokens.tolist() == [5, 8]  # [CLS] + 3 words + [SEP]; cut to 8 with [SEP] kept
    cut_by_hand = e.tokenizer(texts[1], truncation=True, max_length=8, return_tensors="pt")
    with torch.no_grad():
        h = e.model(**cut_by_hand).last_hidden_state
    np.testing.assert_allclose(vecs[1], h.mean(dim=1)[0].numpy(), atol=1e-5)


def test_rejected_and_eof_rows_pass_through_without_embedding(minilm):
    b = batch(["good one", "bad", "another good one"], reasons=[None, "null text", None])
    eof = pa.table({"id": [""], "text": [None], "shard": ["s"], "line": [3], "reason": [None], "raw": [None], "eof": [True]}, schema=READ_SCHEMA)
    out = minilm(pa.concat_tables([b, eof]))
    assert out.num_rows == 4
    assert out.column("embedding").null_count == 2
    assert out.column("embedding")[1].as_py() is None and out.column("embedding")[3].as_py() is None
    assert out.column("reason").to_pylist() == [None, "null text", None, None]
    assert out.column("eof").to_pylist() == [False, False, False, True]
    direct, _, _ = minilm.embed_texts(["good one", "another good one"])
    got = np.array([out.column("embedding")[i].as_py() for i in (0, 2)])
    np.testing.assert_allclose(got, direct, atol=1e-6)
    assert "text" not in out.column_names  # texts do not travel to the writer


def test_batch_order_and_padding_do_not_change_vectors(minilm):
    texts = sample_sentences(40)
    alone = np.stack([minilm.embed_texts([t])[0][0] for t in texts[:5]])
    together, _, _ = minilm.embed_texts(texts)
    np.testing.assert_allclose(together[:5], alone, atol=1e-5)


@pytest.mark.parametrize("pooling,layers", [("cls", (-1,)), ("max", (1, -1)), ("mean", (-2, -1)), ("cls_pooler", (-1,))])
def test_operator_applies_the_configured_extraction(tiny_bert, pooling, layers):
    from operators.extraction import pool

    e = make(tiny_bert, pooling=pooling, layers=layers)
    texts = ["first text here", "a second, longer text with more tokens in it"]
    vecs, _, _ = e.embed_texts(texts)
    enc = e.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = e.model(**enc, output_hidden_states=True)
    want = pool(out.hidden_states, enc["attention_mask"], pooling=pooling, layers=layers, pooler=e.model.pooler)
    np.testing.assert_allclose(vecs, want.numpy(), atol=1e-5)


def test_float16_output_and_bfloat16_model(minilm_path):
    e = make(minilm_path, dtype="bfloat16", output_dtype="float16")
    out = e(batch(["a sentence about cats", "another about dogs"]))
    assert out.schema.field("embedding").type == pa.list_(pa.float16(), 384)
    ref = make(minilm_path)
    want, _, _ = ref.embed_texts(["a sentence about cats", "another about dogs"])
    got = np.array(out.column("embedding").to_pylist(), dtype=np.float32)
    # bf16 has an 8-bit mantissa: agreement to ~1e-2 relative, far from unrelated vectors
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99
