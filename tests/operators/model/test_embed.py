"""The embedding operator, called directly (no Ray): real MiniLM against sentence-transformers,
truncation counting, pass-through of rejected and end-of-shard rows.

Extraction across model families on tiny random models, each against a manual forward:
T5 encoder/decoder modes, decoder-only last token under both paddings, PromptBERT's [MASK],
instruction exclusion, windowed long documents, Sentence-T5's Dense projection.

CUDA paths, for a machine with a GPU: `pytest -m gpu tests/operators/model/test_embed.py`.
Skipped without one (CI has none). Half-precision forwards on the GPU against float32 on the CPU,
each text alone: the tolerances the README states."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from operators.config.schema import ConfigError, ExtractionConfig, ModelConfig
from operators.io.readers import READ_SCHEMA
from operators.methods.prompts import PROMPTBERT_TEMPLATE, PROMPTEOL_TEMPLATE
from operators.model.embed import Embedder, EmbedSpec
from operators.model.resolution import resolve_model
from operators.model.tokenize import tokenize_batch
from tests.helpers import batch, sample_sentences, spec_for, texts_of_mixed_length


def make(name, *, pooling="mean", layers=(-1,), normalize=False, max_length=None, dtype="float32", output_dtype="float32", **ex):
    model = ModelConfig(name=name, max_length=max_length, dtype=dtype, batch_size=16)
    extraction = ExtractionConfig(pooling=pooling, layers=layers, normalize=normalize, **ex)
    return Embedder(EmbedSpec(model, extraction, resolve_model(model, extraction), output_dtype=output_dtype))




@pytest.fixture(scope="module")
def minilm(minilm_path):
    return make(minilm_path, normalize=True)


def test_minilm_mean_equals_sentence_transformers_encode(minilm, minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = sample_sentences(200) + ["Short.", "A much, much longer sentence " * 60]  # one over 256 tokens
    out = minilm.embed_texts(texts)
    ours, truncated = out.vectors, out.truncated
    st = SentenceTransformer(minilm_path, device="cpu")
    theirs = st.encode(texts, batch_size=32, convert_to_numpy=True)
    assert st.max_seq_length == minilm.max_length == 256
    assert np.abs(ours - theirs).max() <= 1e-5
    assert truncated.tolist() == [False] * 201 + [True]


def test_truncation_is_counted_and_cut_at_max_length(minilm_path):
    e = make(minilm_path, max_length=8)
    texts = ["one two three", "one two three four five six seven eight nine ten"]
    out = e.embed_texts(texts)
    vecs, n_tokens, truncated = out.vectors, out.n_tokens, out.truncated
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
    direct = minilm.embed_texts(["good one", "another good one"]).vectors
    got = np.array([out.column("embedding")[i].as_py() for i in (0, 2)])
    np.testing.assert_allclose(got, direct, atol=1e-6)
    assert "text" not in out.column_names  # texts do not travel to the writer


def test_batch_order_and_padding_do_not_change_vectors(minilm):
    texts = sample_sentences(40)
    alone = np.stack([minilm.embed_texts([t]).vectors[0] for t in texts[:5]])
    together = minilm.embed_texts(texts).vectors
    np.testing.assert_allclose(together[:5], alone, atol=1e-5)


@pytest.mark.parametrize("pooling,layers", [("cls", (-1,)), ("max", (1, -1)), ("mean", (-2, -1)), ("cls_pooler", (-1,))])
def test_operator_applies_the_configured_extraction(tiny_bert, pooling, layers):
    from operators.methods.extraction import pool

    e = make(tiny_bert, pooling=pooling, layers=layers)
    texts = ["first text here", "a second, longer text with more tokens in it"]
    vecs = e.embed_texts(texts).vectors
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
    want = ref.embed_texts(["a sentence about cats", "another about dogs"]).vectors
    got = np.array(out.column("embedding").to_pylist(), dtype=np.float32)
    # bf16 has an 8-bit mantissa: agreement to ~1e-2 relative, far from unrelated vectors
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99


TEXTS = ["a cat sat on the mat", "the quick brown fox jumps over the lazy dog again and again", "hello"]


def embedder(name, model_kw=None, **ex) -> Embedder:
    model = ModelConfig(name=name, batch_size=8, **(model_kw or {}))
    extraction = ExtractionConfig(**ex)
    return Embedder(EmbedSpec(model, extraction, resolve_model(model, extraction)))


# -- T5 -------------------------------------------------------------------------------------


def test_t5_encoder_modes_match_a_manual_encoder_forward(tiny_t5):
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    enc_model = T5EncoderModel.from_pretrained(tiny_t5).eval()
    for i, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = enc_model(**ids).last_hidden_state[0]
        first = embedder(tiny_t5, pooling="encoder_first").embed_texts(TEXTS).vectors[i]
        mean = embedder(tiny_t5, pooling="encoder_mean").embed_texts(TEXTS).vectors[i]
        np.testing.assert_allclose(first, h[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(mean, h.mean(dim=0).numpy(), atol=1e-5)  # EOS included


def test_t5_encoder_modes_load_the_encoder_alone(tiny_t5):
    e = embedder(tiny_t5, pooling="encoder_mean")
    assert type(e.model).__name__ == "T5EncoderModel"


def test_t5_decoder_first_matches_a_manual_forward(tiny_t5):
    from transformers import AutoTokenizer, T5Model

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    full = T5Model.from_pretrained(tiny_t5).eval()
    got = embedder(tiny_t5, pooling="decoder_first").embed_texts(TEXTS).vectors
    for i, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            out = full(**ids, decoder_input_ids=torch.tensor([[full.config.decoder_start_token_id]]))
        np.testing.assert_allclose(got[i], out.last_hidden_state[0, 0].numpy(), atol=1e-5)


def test_sentence_t5_layout_applies_its_dense_projection(tiny_t5, tmp_path):
    """A sentence-transformers folder (T5 encoder, mean, Dense 32->16, Normalize): our
    encoder_mean + projection + normalize equals sentence-transformers' own encode."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(4)
    st = SentenceTransformer(modules=[
        models.Transformer(tiny_t5),
        models.Pooling(32, pooling_mode="mean"),
        models.Dense(32, 16, bias=False, activation_function=torch.nn.Identity()),
        models.Normalize(),
    ], device="cpu")
    st.save(str(tmp_path / "st5"))
    want = SentenceTransformer(str(tmp_path / "st5"), device="cpu").encode(TEXTS, convert_to_numpy=True)
    e = embedder(str(tmp_path / "st5"), pooling="encoder_mean", normalize=True)
    got = e.embed_texts(TEXTS).vectors
    assert got.shape == (3, 16) and e.dimension == 16
    np.testing.assert_allclose(got, want, atol=1e-5)


# -- decoder-only LLMs -------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_last_token_is_the_same_under_left_and_right_padding(request, fixture):
    path = request.getfixturevalue(fixture)
    left = embedder(path, {"padding_side": "left"}, pooling="last_token").embed_texts(TEXTS).vectors
    right = embedder(path, {"padding_side": "right"}, pooling="last_token").embed_texts(TEXTS).vectors
    np.testing.assert_allclose(left, right, atol=1e-5)
    # and equal to each text run alone, unpadded
    e = embedder(path, pooling="last_token")
    for i, text in enumerate(TEXTS):
        ids = e.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            h = e.model(**ids).last_hidden_state[0, -1]
        np.testing.assert_allclose(left[i], h.numpy(), atol=1e-5)


def test_decoder_mean_and_prompteol_template(tiny_llama):
    e = embedder(tiny_llama, {"padding_side": "left"}, pooling="mean")
    got = e.embed_texts(TEXTS).vectors
    for i, text in enumerate(TEXTS):
        ids = e.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            h = e.model(**ids).last_hidden_state[0]
        np.testing.assert_allclose(got[i], h.mean(dim=0).numpy(), atol=1e-5)
    p = embedder(tiny_llama, pooling="last_token", template=PROMPTEOL_TEMPLATE, preprocess="prompteol")
    formatted = p.encoder.format(["Is it raining?"])[0].text
    assert formatted == 'This sentence : "Is it raining." means in one word:"'
    ids = p.tokenizer(formatted, return_tensors="pt")
    with torch.no_grad():
        want = p.model(**ids).last_hidden_state[0, -1]
    np.testing.assert_allclose(p.embed_texts(["Is it raining?"]).vectors[0], want.numpy(), atol=1e-5)


def test_long_prompted_documents_keep_the_end_of_the_prompt(tiny_llama):
    e = embedder(tiny_llama, {"max_length": 24}, pooling="last_token", template=PROMPTEOL_TEMPLATE)
    enc = e.encoder.encode(["word " * 200])
    assert enc.truncated.tolist() == [True]
    ids = enc.windows[0]
    assert len(ids) <= 24
    assert e.tokenizer.decode(ids, skip_special_tokens=True).endswith('means in one word : "')


# -- PromptBERT, instructions ------------------------------------------------------------------


def test_mask_token_pooling_reads_the_mask_position(tiny_bert):
    e = embedder(tiny_bert, pooling="mask_token", template=PROMPTBERT_TEMPLATE)
    got = e.embed_texts(TEXTS).vectors
    for i, text in enumerate(TEXTS):
        ids = e.tokenizer(PROMPTBERT_TEMPLATE.replace("{text}", text), return_tensors="pt")
        pos = (ids["input_ids"][0] == e.tokenizer.mask_token_id).nonzero().item()
        with torch.no_grad():
            h = e.model(**ids).last_hidden_state[0, pos]
        np.testing.assert_allclose(got[i], h.numpy(), atol=1e-5)


def test_instruction_exclusion_changes_exactly_the_pooling_mask(tiny_bert):
    instruction = "Represent this sentence for searching relevant passages: "
    with_ = embedder(tiny_bert, pooling="mean", instruction=instruction, exclude_instruction=True)
    without = embedder(tiny_bert, pooling="mean", instruction=instruction)
    enc = with_.encoder.encode(TEXTS)
    assert all(np.array_equal(a, b) for a, b in zip(enc.windows, without.encoder.encode(TEXTS).windows))  # the model sees the instruction
    plain = with_.pad(enc, np.arange(len(TEXTS)))
    n_instr = len(with_.tokenizer(instruction, add_special_tokens=False)["input_ids"])
    excluded = plain["exclude_mask"]
    assert excluded.sum(dim=1).tolist() == [n_instr] * len(TEXTS)
    assert excluded[:, 1 : 1 + n_instr].all() and not excluded[:, 0].any()  # right after [CLS]
    got = with_.embed_texts(TEXTS).vectors
    with torch.no_grad():
        h = with_.model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).last_hidden_state
    keep = plain["attention_mask"].bool() & ~excluded
    want = (h * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert not np.allclose(got, without.embed_texts(TEXTS).vectors, atol=1e-4)


# -- long documents -----------------------------------------------------------------------------


def test_windowed_long_document_is_the_length_weighted_mean_of_its_windows(tiny_bert):
    doc = " ".join(f"word{i}" for i in range(120))
    e = embedder(tiny_bert, {"max_length": 32, "window_stride": 8, "long_documents": "window"}, pooling="mean")
    out = e.embed_texts([doc, "short text"])
    vec, n_tokens, truncated = out.vectors, out.n_tokens, out.truncated
    assert truncated.tolist() == [False, False]
    enc = e.tokenizer(doc, truncation=True, max_length=32, stride=8, return_overflowing_tokens=True)
    assert len(enc["input_ids"]) > 3  # several windows
    vecs, weights = [], []
    for ids in enc["input_ids"]:
        with torch.no_grad():
            h = e.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        vecs.append(h.mean(dim=0).numpy())
        weights.append(len(ids))
    want = np.average(np.stack(vecs), axis=0, weights=weights)
    np.testing.assert_allclose(vec[0], want, atol=1e-5)
    assert n_tokens[0] == sum(weights)
    cut = embedder(tiny_bert, {"max_length": 32}, pooling="mean")
    out = cut.embed_texts([doc])
    v2, t2 = out.vectors, out.truncated
    assert t2.tolist() == [True] and not np.allclose(v2[0], vec[0], atol=1e-4)


# -- wrong combinations fail at config time ---------------------------------------------------


@pytest.mark.parametrize(
    "fixture, ex, model_kw, needle",
    [
        ("tiny_bert", {"pooling": "decoder_first"}, {}, "for it use one of: cls, cls_pooler, mean, max"),
        ("tiny_t5", {"pooling": "mean"}, {}, "encoder_first, encoder_mean, decoder_first"),
        ("tiny_llama", {"pooling": "cls"}, {}, "for it use one of: last_token, mean, max"),
        ("tiny_bert", {"pooling": "mean", "template": PROMPTEOL_TEMPLATE}, {"long_documents": "window"}, "long_documents=window"),
    ],
)
def test_wrong_combinations_say_what_would_work(request, fixture, ex, model_kw, needle):
    model = ModelConfig(name=request.getfixturevalue(fixture), **model_kw)
    with pytest.raises(ConfigError) as e:
        resolve_model(model, ExtractionConfig(**ex))
    assert needle in str(e.value)


def test_config_level_prompt_errors():
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        ExtractionConfig(pooling="mask_token")
    with pytest.raises(ValueError, match=r"\{text\} exactly once"):
        ExtractionConfig(template="no placeholder")
    with pytest.raises(ValueError, match="no extraction.instruction"):
        ExtractionConfig(exclude_instruction=True)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_TOLERANCE = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-4}  # float32: TF32 matmuls may be on


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_buckets_equal_cpu_float32(minilm_path, dtype):
    texts = texts_of_mixed_length(200)
    gpu = Embedder(spec_for(minilm_path, dtype=dtype, model_kw={"device": "cuda"}, pooling="mean", normalize=True))
    assert gpu.device.type == "cuda" and gpu.batch_size == 256
    cpu = Embedder(spec_for(minilm_path, batch_size=1, model_kw={"device": "cpu"}, pooling="mean", normalize=True))
    got = gpu.embed_texts(texts).vectors
    want = np.stack([cpu.embed_texts([t]).vectors[0] for t in texts])
    assert np.abs(got - want).max() <= GPU_TOLERANCE[dtype]


def test_postprocessing_runs_on_the_device(minilm_path):
    e = Embedder(spec_for(minilm_path, dtype="float16", model_kw={"device": "cuda"}, pooling="mean", normalize=True))
    assert next(e.model.parameters()).device.type == "cuda"
    assert e.attn_implementation in ("sdpa", "flash_attention_2", "eager")
    vecs = e.embed_texts(sample_sentences(8)).vectors
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-3)


TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_bucketed_batches_equal_each_text_alone(minilm_path, dtype):
    texts = texts_of_mixed_length(48)
    fast = Embedder(spec_for(minilm_path, dtype=dtype, batch_size=32, max_batch_tokens=512, pooling="mean", normalize=True))
    alone = Embedder(spec_for(minilm_path, dtype=dtype, batch_size=1, pooling="mean", normalize=True))
    out = fast.embed_encoded(fast.encoder.encode(texts), len(texts))
    got, n_tokens, padded = out.vectors, out.n_tokens, out.padded_tokens
    want = np.stack([alone.embed_texts([t]).vectors[0] for t in texts])
    assert np.abs(got - want).max() <= TOLERANCE[dtype]
    assert (padded >= n_tokens).all() and padded.sum() > n_tokens.sum()  # some padding happened, and was counted
    assert n_tokens.sum() / padded.sum() > 0.8  # sorted buckets keep most of each batch real


def test_decoder_left_padding_in_buckets_equals_alone(tiny_llama):
    """Last-token pooling reads the right position whatever a bucket's padding."""
    texts = ["a b", "a much longer text than the first", "mid length text"]
    fast = Embedder(spec_for(tiny_llama, model_kw={"padding_side": "left"}, pooling="last_token"))
    alone = Embedder(spec_for(tiny_llama, batch_size=1, pooling="last_token"))
    got = fast.embed_texts(texts).vectors
    want = np.stack([alone.embed_texts([t]).vectors[0] for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_empty_batch_has_the_output_schema(minilm_path):
    e = Embedder(spec_for(minilm_path))
    out = e(tokenize_batch(batch([]), e.spec))
    assert out.num_rows == 0 and out.schema == e.schema
    assert isinstance(out, pa.Table)
