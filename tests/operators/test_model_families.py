"""Extraction across model families on tiny random models, each against a manual forward:
T5 encoder/decoder modes, decoder-only last token under both paddings, PromptBERT's [MASK],
instruction exclusion, windowed long documents, Sentence-T5's Dense projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.config import ConfigError, ExtractionConfig, ModelConfig
from operators.embed import Embedder, EmbedSpec
from operators.models import resolve_model
from operators.prompts import PROMPTBERT_TEMPLATE, PROMPTEOL_TEMPLATE

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
        first = embedder(tiny_t5, pooling="encoder_first").embed_texts(TEXTS)[0][i]
        mean = embedder(tiny_t5, pooling="encoder_mean").embed_texts(TEXTS)[0][i]
        np.testing.assert_allclose(first, h[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(mean, h.mean(dim=0).numpy(), atol=1e-5)  # EOS included


def test_t5_encoder_modes_load_the_encoder_alone(tiny_t5):
    e = embedder(tiny_t5, pooling="encoder_mean")
    assert type(e.model).__name__ == "T5EncoderModel"


def test_t5_decoder_first_matches_a_manual_forward(tiny_t5):
    from transformers import AutoTokenizer, T5Model

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    full = T5Model.from_pretrained(tiny_t5).eval()
    got = embedder(tiny_t5, pooling="decoder_first").embed_texts(TEXTS)[0]
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
    got = e.embed_texts(TEXTS)[0]
    assert got.shape == (3, 16) and e.dimension == 16
    np.testing.assert_allclose(got, want, atol=1e-5)


# -- decoder-only LLMs -------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_last_token_is_the_same_under_left_and_right_padding(request, fixture):
    path = request.getfixturevalue(fixture)
    left = embedder(path, {"padding_side": "left"}, pooling="last_token").embed_texts(TEXTS)[0]
    right = embedder(path, {"padding_side": "right"}, pooling="last_token").embed_texts(TEXTS)[0]
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
    got = e.embed_texts(TEXTS)[0]
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
    np.testing.assert_allclose(p.embed_texts(["Is it raining?"])[0][0], want.numpy(), atol=1e-5)


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
    got = e.embed_texts(TEXTS)[0]
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
    got = with_.embed_texts(TEXTS)[0]
    with torch.no_grad():
        h = with_.model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).last_hidden_state
    keep = plain["attention_mask"].bool() & ~excluded
    want = (h * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert not np.allclose(got, without.embed_texts(TEXTS)[0], atol=1e-4)


# -- long documents -----------------------------------------------------------------------------


def test_windowed_long_document_is_the_length_weighted_mean_of_its_windows(tiny_bert):
    doc = " ".join(f"word{i}" for i in range(120))
    e = embedder(tiny_bert, {"max_length": 32, "window_stride": 8, "long_documents": "window"}, pooling="mean")
    vec, n_tokens, truncated = e.embed_texts([doc, "short text"])
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
    v2, _, t2 = cut.embed_texts([doc])
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
