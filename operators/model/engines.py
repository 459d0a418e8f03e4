"""CPU inference engines beside torch: ONNX Runtime and OpenVINO (model.engine), in float32 or int8
(model.quantization).

An engine runs one exported graph, `ExtractedStates`: the model's forward as the extraction reads
it. Inside it are the chosen layers averaged in float32 (`extraction.layers`), the pretrained
pooler's output for pooling=cls_pooler, T5's decoder start token (decoder_first), and a decoder's
positions counted over real tokens (left padding). Pooling over tokens, windows, the Dense
projection, normalisation and post-processing stay in torch, in the code the torch engine runs, so
every extraction mode works on every engine.

The export runs on the first actor of a node that needs it, under a file lock, into
CACHE_DIR/engines/<key>. The key covers the model's identity, the engine, the quantization and its
calibration, the states exported and the exporters' versions, so it runs once per node, like the
model copy:

  onnx      torch.onnx.export (TorchScript exporter)                          model.onnx
            int8: onnxruntime.quantization.quantize_dynamic (int8 weights, activations quantized
            at run time); with model.calibration_corpus, quantize_static (QDQ, calibrated)
  openvino  openvino.convert_model from the same module                       model.xml + .bin
            int8: nncf.compress_weights (int8 weights, data-free); with model.calibration_corpus,
            nncf.quantize (weights and activations, calibrated)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from operators.config.schema import ConfigError, ModelConfig
from operators.config.secrets import redact

EXPORT_VERSION = 1  # bump when the exported graph changes: old exports are then rebuilt
CALIBRATION_SPLIT = "sentences"
INPUTS = ("input_ids", "attention_mask")  # the exported graph's inputs, in order


def feed(names, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs a graph declares (`names`), by name: a graph that does not read the mask (layer 0
    alone) has no mask input."""
    return {name: value for name, value in zip(INPUTS, (input_ids, attention_mask)) if name in names}

# engine -> the packages it imports at run time, and its extra
ENGINE_PACKAGES = {
    "onnx": (("onnxruntime", "onnx"), "onnx"),
    "openvino": (("openvino",), "openvino"),
}
INT8_PACKAGES = {"onnx": (), "openvino": ("nncf",)}


def check_engine(model: ModelConfig) -> None:
    """Refuse, before any work, an engine whose packages this environment lacks, with the pip line."""
    if model.engine == "torch":
        return
    packages, extra = ENGINE_PACKAGES[model.engine]
    needed = packages + (INT8_PACKAGES[model.engine] if model.quantization == "int8" else ())
    missing = [p for p in needed if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(
            f"model.engine={model.engine}{' with model.quantization=int8' if model.quantization == 'int8' else ''} needs "
            f"{', '.join(missing)}, which is not installed: pip install 'corpus-embed[{extra}]'"
        )


def runtime_versions(engine: str) -> dict:
    from importlib.metadata import version

    packages = {"onnx": ("torch", "onnx", "onnxruntime"), "openvino": ("torch", "openvino", "nncf")}[engine]
    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except Exception:
            out[p] = None
    return out


# -- the exported graph -------------------------------------------------------------------------


def _torch_module_class():
    import torch

    from operators.methods.extraction import average_layers, forward_states, takes_position_ids

    class ExtractedStates(torch.nn.Module):
        """(input_ids, attention_mask) -> the chosen layers averaged in float32 [, the pooler's
        output of that average]: what pooling reads, as one graph."""

        def __init__(self, model, family: str, decoder_states: bool, layers: Sequence[int], pooler=None):
            super().__init__()
            self.model, self.family, self.decoder_states = model, family, decoder_states
            self.layers = tuple(layers)
            self.pooler = pooler
            self.takes_position_ids = takes_position_ids(model)

        def forward(self, input_ids, attention_mask):
            states = forward_states(
                self.model, self.family, self.decoder_states, input_ids, attention_mask,
                need_all_layers=set(self.layers) != {-1}, takes_position_ids=self.takes_position_ids,
            )
            h = average_layers(states, self.layers)
            return (h, self.pooler(h).float()) if self.pooler is not None else (h,)

    return ExtractedStates


def _example_inputs(tokenizer, vocab_size: int):
    """Two rows, the second padded on the tokenizer's side: tracing sees the masked path."""
    import torch

    ids = torch.randint(5, max(6, min(vocab_size, 1000)), (2, 12), dtype=torch.int64)
    mask = torch.ones(2, 12, dtype=torch.int64)
    if tokenizer.padding_side == "left":
        mask[1, :5] = 0
    else:
        mask[1, 7:] = 0
    ids[mask == 0] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ids, mask


def export_key(spec) -> dict:
    """What an export depends on: the cache key of engines.prepared_folder."""
    from operators.methods.pooling import POOLING

    mode = POOLING[spec.extraction.pooling]
    m = spec.model
    return {
        "version": EXPORT_VERSION,
        "model": spec.resolved.identity,
        "init": [m.init, m.init_seed] if m.init == "random" else None,
        "engine": m.engine,
        "quantization": m.quantization,
        "calibration": [m.calibration_corpus, m.calibration_rows] if m.quantization == "int8" and m.calibration_corpus else None,
        "family": spec.resolved.family,
        "decoder_states": mode.states == "decoder",
        "layers": list(spec.extraction.layers),
        "pooler": mode.needs_pooler,
        "max_length": spec.resolved.max_length,
        "runtime": runtime_versions(m.engine),
    }


def prepared_folder(spec, load_torch_model: Callable, encoder) -> Path:
    """The node's export of `spec`'s model for its engine, built by the first caller (others wait
    on a file lock): a folder holding model.onnx or model.xml/.bin, and export.json.
    `load_torch_model(attn_implementation)` loads the torch model on CPU."""
    from operators.io.cache import CACHE_DIR, build_once

    key = export_key(spec)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    dest = CACHE_DIR / "engines" / f"{spec.model.engine}-{digest}"

    def build(tmp: Path) -> None:
        # Decoders export with eager attention: under left padding a padded position attends to
        # nothing, which OpenVINO's fused attention turns into NaN that the next layer spreads.
        export(spec, load_torch_model("eager" if spec.resolved.family == "decoder" else None), encoder, tmp)
        (tmp / "export.json").write_text(json.dumps(redact(key), indent=2, sort_keys=True, default=str))

    return build_once(dest, build)


def export(spec, model, encoder, folder: Path) -> None:
    """Export `model` (a loaded torch model) for spec.model.engine into `folder`, quantized as set."""
    import torch

    from operators.methods.pooling import POOLING

    mode = POOLING[spec.extraction.pooling]
    pooler = getattr(model, "pooler", None) if mode.needs_pooler else None
    module = _torch_module_class()(model, spec.resolved.family, mode.states == "decoder", spec.extraction.layers, pooler).eval()
    vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
    example = _example_inputs(encoder.tokenizer, vocab)
    outputs = ["states", "pooled"] if pooler is not None else ["states"]
    folder.mkdir(parents=True, exist_ok=True)
    calibration = calibration_inputs(spec, encoder) if spec.model.quantization == "int8" and spec.model.calibration_corpus else None
    with torch.inference_mode(False), torch.no_grad():
        if spec.model.engine == "onnx":
            fp32 = folder / ("model.fp32.onnx" if spec.model.quantization == "int8" else "model.onnx")
            torch.onnx.export(
                module, example, str(fp32), input_names=["input_ids", "attention_mask"], output_names=outputs,
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                              "states": {0: "batch", 1: "states_seq"}, "pooled": {0: "batch"}},
                opset_version=17, do_constant_folding=True, dynamo=False,
            )
            if spec.model.quantization == "int8":
                quantize_onnx(fp32, folder / "model.onnx", calibration)
                fp32.unlink()
        else:
            import openvino as ov

            # inputs passed by name, so the converted model's inputs keep those names
            ov_model = ov.convert_model(module, example_input=dict(zip(INPUTS, example)))
            for port, name in zip(ov_model.outputs, outputs):
                port.get_tensor().set_names({name})
            if spec.model.quantization == "int8":
                ov_model = quantize_openvino(ov_model, calibration)
            ov.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=False)


# -- int8 ---------------------------------------------------------------------------------------


def calibration_inputs(spec, encoder) -> list[tuple[np.ndarray, np.ndarray]]:
    """model.calibration_rows texts of model.calibration_corpus, tokenized as the pipeline
    tokenizes them, one unpadded (input_ids, attention_mask) pair each."""
    from operators.config.schema import StorageConfig
    from operators.io.readers import read_fit_corpus

    texts = read_fit_corpus(spec.model.calibration_corpus, CALIBRATION_SPLIT, spec.model.calibration_rows, StorageConfig())
    if not texts:
        raise ConfigError(f"model.calibration_corpus: {spec.model.calibration_corpus} holds no text to calibrate on")
    enc = encoder.encode(texts)
    return [(w[None, :].astype(np.int64), np.ones((1, len(w)), dtype=np.int64)) for w in enc.windows]


def quantize_onnx(fp32: Path, out: Path, calibration) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if calibration is None:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
        return
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    names = {i.name for i in onnx.load(str(fp32), load_external_data=False).graph.input}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else feed(names, *item)

    quantize_static(
        str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
    )


def quantize_openvino(ov_model, calibration):
    import nncf

    if calibration is None:
        return nncf.compress_weights(ov_model)
    names = set(ov_input_names(ov_model.inputs))
    return nncf.quantize(
        ov_model, nncf.Dataset(calibration, lambda item: feed(names, *item)),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
    )


# -- the runtimes -------------------------------------------------------------------------------


class OnnxStates:
    """ONNX Runtime on CPU, `threads` intra-op threads (the actor's share of the node)."""

    def __init__(self, folder: Path, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, feed(self.inputs, input_ids, attention_mask))


def ov_input_names(ports) -> list[str]:
    """Which of input_ids / attention_mask each input port is (a port can carry several names)."""
    return [next(n for n in INPUTS if n in port.get_names()) for port in ports]


class OpenVinoStates:
    """OpenVINO's CPU plugin, `threads` inference threads, unpinned: several single-threaded actors
    share a node, and pinning would put them all on the same cores. float32 inference precision
    (the plugin would pick bf16 on CPUs that have it)."""

    def __init__(self, folder: Path, threads: int | None):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs = set(ov_input_names(self.compiled.inputs))

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer(feed(self.inputs, input_ids, attention_mask))
        # the request's buffers are reused by its next call: copy them out
        return [np.array(result[port]) for port in self.compiled.outputs]


def load_states(spec, source: str, load_torch_model: Callable, encoder):
    """The engine runner for `spec` on this node, exporting the model first if no actor here has."""
    folder = prepared_folder(spec, load_torch_model, encoder)
    if spec.model.engine == "onnx":
        return OnnxStates(folder, spec.num_threads)
    return OpenVinoStates(folder, spec.num_threads)

