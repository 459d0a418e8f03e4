"""Every pooling mode and layer set against a hand computation on a tiny random BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.methods.extraction import pool

TEXTS = ["a short one.", "A much longer sentence, so that the first row carries padding tokens!"]


@pytest.fixture(scope="module")
def forward(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModel.from_pretrained(tiny_bert).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    special = enc.pop("special_tokens_mask")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    assert enc["attention_mask"][0].sum() < enc["attention_mask"][1].sum()  # row 0 is padded
    return model, enc, special, out


def hand(hidden_states, attention_mask, special, pooling, layers, exclude_special=False, model=None):
    """Row by row, token by token, in float64 numpy."""
    hs = [h.double().numpy() for h in hidden_states]
    mask = attention_mask.numpy().astype(bool)
    if exclude_special:
        mask &= ~special.numpy().astype(bool)
    rows = []
    for b in range(mask.shape[0]):
        h = sum(hs[layer][b] for layer in layers) / len(layers)
        toks = [h[t] for t in range(h.shape[0]) if mask[b, t]]
        if pooling == "cls":
            rows.append(h[0])
        elif pooling == "cls_pooler":
            w = model.pooler.dense.weight.detach().double().numpy()
            bias = model.pooler.dense.bias.detach().double().numpy()
            rows.append(np.tanh(w @ h[0] + bias))
        elif pooling == "mean":
            rows.append(sum(toks) / len(toks))
        elif pooling == "max":
            rows.append(np.max(np.stack(toks), axis=0))
    return np.stack(rows)


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
@pytest.mark.parametrize("layers", [(-1,), (1, -1), (-2, -1), (0,), (0, 1, 2, 3)])
def test_pooling_over_layers_matches_hand_computation(forward, pooling, layers):
    model, enc, special, out = forward
    got = pool(out.hidden_states, enc["attention_mask"], pooling=pooling, layers=layers)
    want = hand(out.hidden_states, enc["attention_mask"], special, pooling, layers)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_first_last_is_not_last(forward):
    """Guards against a layer selection that silently ignores `layers`."""
    model, enc, special, out = forward
    last = pool(out.hidden_states, enc["attention_mask"], pooling="mean", layers=(-1,))
    first_last = pool(out.hidden_states, enc["attention_mask"], pooling="mean", layers=(1, -1))
    assert not torch.allclose(last, first_last, atol=1e-3)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_exclude_special_tokens(forward, pooling):
    model, enc, special, out = forward
    got = pool(out.hidden_states, enc["attention_mask"], pooling=pooling, special_tokens_mask=special, exclude_special_tokens=True)
    want = hand(out.hidden_states, enc["attention_mask"], special, pooling, (-1,), exclude_special=True)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    with_special = pool(out.hidden_states, enc["attention_mask"], pooling=pooling)
    assert not torch.allclose(got, with_special, atol=1e-4)


def test_cls_pooler_is_the_models_pooler_head(forward):
    model, enc, special, out = forward
    got = pool(out.hidden_states, enc["attention_mask"], pooling="cls_pooler", pooler=model.pooler)
    want = hand(out.hidden_states, enc["attention_mask"], special, "cls_pooler", (-1,), model=model)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    np.testing.assert_allclose(got.numpy(), out.pooler_output.numpy(), atol=1e-6)


def test_normalize_gives_unit_vectors_in_the_same_direction(forward):
    model, enc, special, out = forward
    raw = pool(out.hidden_states, enc["attention_mask"], pooling="mean")
    unit = pool(out.hidden_states, enc["attention_mask"], pooling="mean", normalize=True)
    np.testing.assert_allclose(unit.norm(dim=-1).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit.numpy(), (raw / raw.norm(dim=-1, keepdim=True)).numpy(), atol=1e-6)


def test_padding_never_leaks_into_max_pooling():
    h = torch.tensor([[[1.0, -5.0], [2.0, -6.0], [99.0, 99.0]]])  # last position is padding
    mask = torch.tensor([[1, 1, 0]])
    got = pool((h,), mask, pooling="max")
    assert got.tolist() == [[2.0, -5.0]]
    assert pool((h,), mask, pooling="mean").tolist() == [[1.5, -5.5]]


def test_half_precision_hidden_states_pool_in_float32():
    h = torch.randn(2, 4, 8).to(torch.bfloat16)
    mask = torch.ones(2, 4, dtype=torch.long)
    got = pool((h,), mask, pooling="mean")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), h.float().mean(dim=1).numpy(), atol=1e-6)


def test_bad_arguments_raise_with_choices():
    h = (torch.zeros(1, 2, 3),)
    m = torch.ones(1, 2)
    with pytest.raises(ValueError, match="cls, cls_pooler, mean, max"):
        pool(h, m, pooling="sum")
    with pytest.raises(IndexError, match="out of range"):
        pool(h, m, layers=(3,))
    with pytest.raises(ValueError, match="pooler"):
        pool(h, m, pooling="cls_pooler")
