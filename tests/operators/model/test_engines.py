"""The onnx and openvino engines (operators/model/engines.py), called directly (no Ray): every extraction
mode on every engine against the torch engine, to 1e-4 max abs, on the real MiniLM over the sample
corpus and on tiny random BERT, T5, Llama and OPT models; int8 close to float32 but not equal to it;
the export made once per node and keyed by what it depends on; refusals before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from operators.config.loading import load_config
from operators.config.schema import ConfigError, ExtractionConfig, ModelConfig
from operators.methods.prompts import PROMPTBERT_TEMPLATE, PROMPTEOL_TEMPLATE
from operators.model.embed import Embedder, EmbedSpec
from operators.model.resolution import resolve_model
from tests.helpers import REPO, sample_sentences, texts_of_mixed_length

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

ENGINES = ["onnx", "openvino"]
TEXTS = ["a cat sat on the mat", "the quick brown fox jumps over the lazy dog again and again", "hello", "a b"]


@pytest.fixture(autouse=True)
def engine_cache(tmp_path_factory, monkeypatch):
    """One export cache for the module (the exports are its cost), apart from the user's."""
    import operators.io.cache

    monkeypatch.setattr(operators.io.cache, "CACHE_DIR", tmp_path_factory.getbasetemp() / "engine-cache")


def embedder(name, engine="torch", model_kw=None, **ex) -> Embedder:
    model = ModelConfig(name=name, batch_size=8, engine=engine, **(model_kw or {}))
    extraction = ExtractionConfig(**ex)
    return Embedder(EmbedSpec(model, extraction, resolve_model(model, extraction), num_threads=1))


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


CASES = {
    "bert cls_pooler": ("tiny_bert", {}, {"pooling": "cls_pooler"}),
    "bert first-last mean, no special tokens": ("tiny_bert", {}, {"pooling": "mean", "layers": (1, -1), "exclude_special_tokens": True}),
    "bert static embeddings (layer 0), max": ("tiny_bert", {}, {"pooling": "max", "layers": (0,)}),
    "bert PromptBERT mask token": ("tiny_bert", {}, {"pooling": "mask_token", "template": PROMPTBERT_TEMPLATE}),
    "bert windows": ("tiny_bert", {"max_length": 16, "window_stride": 4, "long_documents": "window"}, {"pooling": "mean"}),
    "bert instruction excluded": ("tiny_bert", {}, {"pooling": "mean", "instruction": "Represent this sentence: ", "exclude_instruction": True}),
    "t5 encoder_mean": ("tiny_t5", {}, {"pooling": "encoder_mean"}),
    "t5 decoder_first": ("tiny_t5", {}, {"pooling": "decoder_first"}),
    "llama PromptEOL last token, left padding": ("tiny_llama", {"padding_side": "left"}, {"pooling": "last_token", "template": PROMPTEOL_TEMPLATE}),
    "opt last token, right padding, last two layers": ("tiny_opt", {"padding_side": "right"}, {"pooling": "last_token", "layers": (-2, -1)}),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_extraction_mode_equals_torch(request, engine, case):
    fixture, model_kw, ex = CASES[case]
    path = request.getfixturevalue(fixture)
    texts = TEXTS + [" ".join(f"word{i}" for i in range(60))]  # one long enough for several windows
    want = embedder(path, "torch", model_kw, **ex).embed_texts(texts).vectors
    got = embedder(path, engine, model_kw, **ex).embed_texts(texts).vectors
    assert got.shape == want.shape
    assert max_abs(got, want) <= 1e-4, case


@pytest.mark.parametrize("engine", ENGINES)
def test_minilm_on_the_sample_corpus_equals_torch(minilm_path, engine):
    texts = sample_sentences(64) + texts_of_mixed_length(32)
    want = embedder(minilm_path, "torch", normalize=True).embed_texts(texts).vectors
    got = embedder(minilm_path, engine, normalize=True).embed_texts(texts).vectors
    assert max_abs(got, want) <= 1e-4


@pytest.mark.parametrize("engine", ENGINES)
def test_int8_is_close_to_float32_but_quantized(minilm_path, engine):
    texts = sample_sentences(48)
    fp32 = embedder(minilm_path, engine, normalize=True).embed_texts(texts).vectors
    int8 = embedder(minilm_path, engine, {"quantization": "int8"}, normalize=True).embed_texts(texts).vectors
    cos = (fp32 * int8).sum(1)  # both normalised
    assert cos.min() > 0.97
    assert max_abs(fp32, int8) > 1e-3  # the int8 graph is not the float32 one


def test_static_int8_calibrates_on_local_text(minilm_path, tmp_path):
    """With model.calibration_corpus, onnx quantizes statically (QDQ nodes in the graph, which
    dynamic quantization does not write), calibrated on that text."""
    import onnx

    import operators.io.cache

    corpus = str(REPO / "configs" / "sample_corpus" / "part-003.txt")
    texts = sample_sentences(32)
    fp32 = embedder(minilm_path, "onnx", normalize=True).embed_texts(texts).vectors
    static = embedder(minilm_path, "onnx", {"quantization": "int8", "calibration_corpus": corpus, "calibration_rows": 40}, normalize=True)
    got = static.embed_texts(texts).vectors
    assert (fp32 * got).sum(1).min() > 0.9
    folders = sorted(f for f in (operators.io.cache.CACHE_DIR / "engines").glob("onnx-*") if f.is_dir())
    keys = {f: json.loads((f / "export.json").read_text()) for f in folders}
    [folder] = [f for f, k in keys.items() if k["calibration"] == [corpus, 40]]
    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_the_export_is_made_once_and_keyed_by_what_it_depends_on(tiny_bert):
    import operators.io.cache

    root = operators.io.cache.CACHE_DIR / "engines"

    def exports():
        return {f for f in root.glob("onnx-*") if f.is_dir()}

    before = exports() if root.exists() else set()
    embedder(tiny_bert, "onnx", pooling="mean", layers=(2,))
    made = exports() - before
    assert len(made) == 1
    [folder] = made
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    embedder(tiny_bert, "onnx", pooling="mean", layers=(2,))  # a second actor on the node: reused
    assert exports() - before == made and (folder / "model.onnx").stat().st_mtime_ns == stamp
    embedder(tiny_bert, "onnx", pooling="mean", layers=(1, 2))  # other layers: another graph
    assert len(exports() - before) == 2
    key = json.loads((folder / "export.json").read_text())
    assert key["layers"] == [2] and key["model"]["weights_sha256"] and key["runtime"]["onnxruntime"]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, needle",
    [
        (["model.engine=onnx", "model.dtype=bfloat16"], "runs float32 on CPU"),
        (["model.engine=openvino", "model.device=cuda"], "on GPUs use model.engine: torch"),
        (["model.quantization=int8"], "needs model.engine: onnx or openvino"),
        (["model.engine=onnx", "model.calibration_corpus=x.txt"], "set model.quantization: int8"),
    ],
)
def test_bad_engine_settings_fail_at_config_time(settings, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, settings)
    assert needle in str(e.value)


def test_a_missing_runtime_fails_before_any_work_with_the_pip_line(minilm_path, monkeypatch):
    """Nothing can uninstall a package for one test: the package lookup answers 'absent' for it."""
    import importlib.util

    import operators.model.engines

    real = importlib.util.find_spec
    monkeypatch.setattr(operators.model.engines.importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    model = ModelConfig(name=minilm_path, engine="openvino", quantization="int8")
    with pytest.raises(ConfigError) as e:
        resolve_model(model, ExtractionConfig())
    assert "nncf" in str(e.value) and "pip install 'corpus-embed[openvino]'" in str(e.value)
    resolve_model(ModelConfig(name=minilm_path, engine="openvino"), ExtractionConfig())  # float32 needs no nncf


def test_engine_and_quantization_enter_the_fingerprint_and_the_provenance(minilm_path):
    from operators.model.prepare import prepare

    base = ["model.name=" + minilm_path]
    torch_fp = prepare(load_config(None, base), isolate=False)
    onnx_fp = prepare(load_config(None, base + ["model.engine=onnx"]), isolate=False)
    int8_fp = prepare(load_config(None, base + ["model.engine=onnx", "model.quantization=int8"]), isolate=False)
    assert len({torch_fp.fingerprint, onnx_fp.fingerprint, int8_fp.fingerprint}) == 3
    assert len({p.provenance["extraction_fingerprint"] for p in (torch_fp, onnx_fp, int8_fp)}) == 3  # whitening artifacts too
    assert "engine" not in torch_fp.provenance["model"]  # fingerprints from before engines still hold
    assert int8_fp.provenance["engine"] == {"name": "onnx", "quantization": "int8"}
    assert torch_fp.provenance["engine"] == {"name": "torch", "quantization": "none"}


def test_a_calibration_corpus_that_is_not_there_fails_before_any_work(tiny_bert, tmp_path):
    """Checked by prepare (exit 2 from every pipeline), not on the actors with 're-run to retry it'."""
    from operators.io.storage import InputError
    from operators.model.prepare import prepare

    base = [f"model.name={tiny_bert}", "model.engine=onnx", "model.quantization=int8"]
    with pytest.raises(InputError, match=r"model.calibration_corpus: .*no-such-file.txt does not exist"):
        prepare(load_config(None, [*base, f"model.calibration_corpus={tmp_path}/no-such-file.txt"]), isolate=False)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match=r"empty.txt holds no text to calibrate on"):
        prepare(load_config(None, [*base, f"model.calibration_corpus={tmp_path}/empty.txt"]), isolate=False)
