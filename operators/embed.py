"""The embedding operator: a callable class that loads a model once and embeds Arrow batches.

It knows nothing of Ray; the pipelines hand it to `map_batches` on an actor pool, and tests call
it directly. Input rows follow `readers.READ_SCHEMA`; rejected and end-of-shard rows pass
through untouched (no embedding), so every row reaches the writer and the counts reconcile.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from operators.config import ExtractionConfig, ModelConfig, StorageConfig
from operators.extraction import pool
from operators.models import ResolvedModel, local_source
from operators.postprocess import FITTED, PostProcessor, load_artifact, output_dimension
from operators.prompts import Formatted, format_input

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARROW_FLOATS = {"float32": pa.float32(), "float16": pa.float16()}
PASSTHROUGH = ("id", "shard", "line", "reason", "raw", "eof")


@dataclass(frozen=True)
class EmbedSpec:
    """Everything an embedding actor needs, in one picklable object."""

    model: ModelConfig
    extraction: ExtractionConfig
    resolved: ResolvedModel
    output_dtype: str = "float32"
    num_threads: int | None = None  # torch intra-op threads on CPU; None: leave torch's default
    postprocess: tuple[dict, ...] = ()  # PipelineConfig.postprocess_steps()
    artifact: str | None = None  # whitening artifact URI, when a step needs it
    artifact_storage: StorageConfig = field(default_factory=StorageConfig)

    @classmethod
    def from_config(cls, cfg, resolved: ResolvedModel, num_threads: int | None = None, postprocess: bool = True) -> "EmbedSpec":
        """The spec for `cfg`; postprocess=False gives raw extraction output (what a fit reads)."""
        steps = tuple(cfg.postprocess_steps()) if postprocess else ()
        return cls(
            model=cfg.model, extraction=cfg.extraction, resolved=resolved, output_dtype=cfg.output.dtype,
            num_threads=num_threads, postprocess=steps, artifact=cfg.whitening.artifact,
            artifact_storage=cfg.whitening.storage,
        )


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("model.device=cuda but no CUDA device is visible to this actor")
        return torch.device("cuda")
    return torch.device("cpu")


def output_schema(dimension: int, output_dtype: str = "float32") -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("shard", pa.string()),
            ("line", pa.int64()),
            ("reason", pa.string()),
            ("raw", pa.string()),
            ("eof", pa.bool_()),
            ("embedding", pa.list_(ARROW_FLOATS[output_dtype], dimension)),
            ("n_tokens", pa.int32()),  # tokens fed to the model, special tokens included
            ("truncated", pa.bool_()),  # longer than model.max_length and cut
        ]
    )


def load_projection(source: str, spec: dict, device: torch.device) -> torch.nn.Module:
    """The Dense layer of a sentence-transformers folder, as saved by sentence-transformers
    (weights `linear.weight`/`linear.bias` in model.safetensors or pytorch_model.bin)."""
    folder = os.path.join(source, spec["path"])
    st_file = os.path.join(folder, "model.safetensors")
    if os.path.exists(st_file):
        from safetensors.torch import load_file

        state = load_file(st_file)
    else:
        state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    linear = torch.nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    act = {"identity": torch.nn.Identity(), "tanh": torch.nn.Tanh(), "relu": torch.nn.ReLU(), "gelu": torch.nn.GELU()}[spec["activation"]]
    return torch.nn.Sequential(linear, act).to(device).eval()


class Embedder:
    """Load in __init__, embed in __call__(pa.Table) -> pa.Table."""

    def __init__(self, spec: EmbedSpec):
        from transformers import AutoModel, AutoModelForTextEncoding, AutoTokenizer

        self.spec = spec
        r = spec.resolved
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.device = pick_device(spec.model.device)
        source = local_source(r)
        kwargs = dict(revision=r.revision, trust_remote_code=spec.model.trust_remote_code)
        if r.gguf_file:
            kwargs["gguf_file"] = r.gguf_file
        self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if self.tokenizer.pad_token is None:  # decoder LLMs often ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if spec.model.padding_side != "auto":
            self.tokenizer.padding_side = spec.model.padding_side
        # T5 modes that only read the encoder load the encoder alone (half the weights).
        encoder_only = r.family == "encoder_decoder" and spec.extraction.pooling != "decoder_first"
        loader = AutoModelForTextEncoding if encoder_only else AutoModel
        self.model = loader.from_pretrained(source, dtype=TORCH_DTYPES[spec.model.dtype], **kwargs)
        self.model.to(self.device).eval()
        self.takes_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters
        self.max_length = r.max_length
        self.post = None
        if spec.postprocess:
            fit = None
            if any(s["op"] in FITTED for s in spec.postprocess):
                from operators.storage import get_fs

                fs, path = get_fs(spec.artifact, spec.artifact_storage)
                fit = load_artifact(fs, path)[0]
            self.post = PostProcessor(list(spec.postprocess), fit).to(self.device)
        self.dimension = output_dimension(list(spec.postprocess), r.dimension)
        self.schema = output_schema(self.dimension, spec.output_dtype)
        self.pooler = getattr(self.model, "pooler", None) if spec.extraction.pooling == "cls_pooler" else None
        if spec.extraction.pooling == "cls_pooler" and self.pooler is None:
            raise RuntimeError(f"pooling=cls_pooler: {type(self.model).__name__} has no pooler module")
        self.projection = load_projection(source, r.projection, self.device) if r.projection else None

    # -- tokenization -----------------------------------------------------------------------

    def format(self, texts: list[str]) -> list[Formatted]:
        ex = self.spec.extraction
        return [
            format_input(
                t, template=ex.template, preprocess=ex.preprocess, instruction=ex.instruction,
                demonstrations=ex.demonstrations, mask_token=self.tokenizer.mask_token,
            )
            for t in texts
        ]

    def _encode(self, texts: list[str], *, windows: bool) -> dict:
        ex = self.spec.extraction
        return self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            stride=self.spec.model.window_stride if windows else 0,
            padding=True,
            return_overflowing_tokens=True,
            return_special_tokens_mask=ex.exclude_special_tokens,
            return_offsets_mapping=ex.exclude_instruction,
            return_tensors="pt",
        )

    def _fit_prompts(self, texts: list[str], formatted: list[Formatted], too_long: np.ndarray) -> list[Formatted]:
        """With a template or instruction, cut the document, never the prompt around it: a
        truncated PromptEOL input must still end in 'in one word:"'."""
        out = list(formatted)
        for i in np.flatnonzero(too_long):
            for _ in range(4):
                n = len(self.tokenizer(out[i].text)["input_ids"])
                if n <= self.max_length:
                    break
                doc = self.tokenizer(texts[i], add_special_tokens=False, return_offsets_mapping=True)
                keep = max(1, len(doc["input_ids"]) - (n - self.max_length) - 1)
                texts[i] = texts[i][: doc["offset_mapping"][keep - 1][1]] if keep < len(doc["input_ids"]) else texts[i][:-1]
                out[i] = self.format([texts[i]])[0]
        return out

    def tokenize(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
        """Format and tokenize a mini-batch. Returns the model inputs (plus the masks pooling
        needs: special_tokens_mask, exclude_mask, target_mask), which input row each tokenized
        row belongs to, and which inputs were truncated.

        Overflow windows are requested so truncation is detected exactly. In truncate mode only
        each input's first window is kept; in window mode all windows are kept."""
        ex = self.spec.extraction
        windows = self.spec.model.long_documents == "window"
        formatted = self.format(texts)
        prompted = bool(ex.template or ex.instruction or ex.demonstrations)
        enc = self._encode([f.text for f in formatted], windows=windows)
        mapping = enc.pop("overflow_to_sample_mapping").numpy()
        counts = np.bincount(mapping, minlength=len(texts))
        truncated = counts > 1
        if prompted and truncated.any():
            formatted = self._fit_prompts(list(texts), formatted, truncated)
            enc = self._encode([f.text for f in formatted], windows=False)
            mapping = enc.pop("overflow_to_sample_mapping").numpy()
        if windows:
            keep = np.arange(len(mapping))
            truncated = np.zeros(len(texts), dtype=bool)
        else:
            keep = np.flatnonzero(np.r_[True, mapping[1:] != mapping[:-1]])
        rows = torch.from_numpy(keep)
        tensors = {k: v[rows] for k, v in enc.items() if isinstance(v, torch.Tensor)}
        offsets = tensors.pop("offset_mapping", None)
        if offsets is not None:
            prefix = torch.tensor([formatted[i].prefix_chars for i in mapping[keep]]).unsqueeze(1)
            starts, ends = offsets[..., 0], offsets[..., 1]
            tensors["exclude_mask"] = (starts < prefix) & (ends > starts)
        if ex.pooling == "mask_token":
            tensors["target_mask"] = tensors["input_ids"] == self.tokenizer.mask_token_id
        # Drop the columns that are padding in every row (windows of long texts set the width).
        attended = tensors["attention_mask"].bool().any(dim=0)
        cols = attended.nonzero().flatten()
        lo, hi = int(cols.min()), int(cols.max()) + 1
        tensors = {k: v[:, lo:hi] for k, v in tensors.items()}
        return tensors, mapping[keep], truncated

    # -- forward + extraction ---------------------------------------------------------------

    def forward(self, inputs: dict[str, torch.Tensor], need_all_layers: bool) -> tuple[torch.Tensor, ...]:
        """The hidden states pooling reads, per model family."""
        family = self.spec.resolved.family
        kw = dict(output_hidden_states=need_all_layers, return_dict=True)
        if family == "encoder_decoder" and self.spec.extraction.pooling == "decoder_first":
            # Sentence-T5's ST-Dec: the decoder sees only its start token.
            n = inputs["input_ids"].shape[0]
            start = torch.full((n, 1), self.model.config.decoder_start_token_id, device=self.device)
            out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], decoder_input_ids=start, **kw)
            return out.decoder_hidden_states if need_all_layers else (out.last_hidden_state,)
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
        if family == "decoder" and self.takes_position_ids:
            # Positions count real tokens only, so left padding gives the same states as right.
            model_inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(**model_inputs, **kw)
        return out.hidden_states if need_all_layers else (out.last_hidden_state,)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings float32 [n, d], n_tokens int32 [n], truncated bool [n]) in input order."""
        ex = self.spec.extraction
        n = len(texts)
        out = np.zeros((n, self.dimension), dtype=np.float32)
        n_tokens = np.zeros(n, dtype=np.int32)
        truncated = np.zeros(n, dtype=bool)
        # Length-sorted mini-batches waste less compute on padding.
        order = np.argsort([len(t) for t in texts], kind="stable")
        bs = self.spec.model.batch_size
        need_all_layers = set(ex.layers) != {-1}
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            tensors, owner, cut = self.tokenize([texts[i] for i in idx])
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
            hidden = self.forward(inputs, need_all_layers)
            mask = inputs["attention_mask"]
            if self.spec.resolved.family == "encoder_decoder" and ex.pooling == "decoder_first":
                mask = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)
            vecs = pool(
                hidden,
                mask,
                pooling=ex.pooling,
                layers=ex.layers,
                special_tokens_mask=inputs.get("special_tokens_mask"),
                exclude_special_tokens=ex.exclude_special_tokens,
                exclude_mask=inputs.get("exclude_mask"),
                target_mask=inputs.get("target_mask"),
                pooler=self.pooler,
            )
            lengths = tensors["attention_mask"].sum(dim=1)
            if len(owner) != len(idx):  # windows: average each input's windows, weighted by length
                weights = torch.zeros(len(idx), len(owner))
                weights[torch.from_numpy(owner), torch.arange(len(owner))] = lengths.float()
                weights = weights / weights.sum(dim=1, keepdim=True)
                vecs = weights.to(vecs.device) @ vecs
            if self.projection is not None:
                vecs = self.projection(vecs)
            if ex.normalize:
                vecs = torch.nn.functional.normalize(vecs, p=2, dim=-1)
            if self.post is not None:  # on the model's device
                vecs = self.post(vecs)
            out[idx] = vecs.float().cpu().numpy()
            n_tokens[idx] = np.bincount(owner, weights=lengths.numpy(), minlength=len(idx)).astype(np.int32)
            truncated[idx] = cut
        return out, n_tokens, truncated

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = pc.and_(pc.is_null(batch.column("reason")), pc.invert(batch.column("eof"))).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(ok)
        texts = batch.column("text").take(pa.array(rows, type=pa.int64())).to_pylist()
        vecs, ntok, cut = self.embed_texts(texts) if texts else (np.zeros((0, self.dimension), np.float32), [], [])
        full = np.zeros((n, self.dimension), dtype=np.float32)
        full[rows] = vecs
        tokens = np.zeros(n, dtype=np.int32)
        tokens[rows] = ntok
        truncated = np.zeros(n, dtype=bool)
        truncated[rows] = cut
        value_type = ARROW_FLOATS[self.spec.output_dtype]
        flat = pa.array(full.astype(value_type.to_pandas_dtype()).ravel(), type=value_type)
        embedding = pa.FixedSizeListArray.from_arrays(flat, self.dimension, mask=pa.array(~ok))
        columns = [batch.column(name) for name in PASSTHROUGH]
        columns += [embedding, pa.array(tokens, pa.int32()), pa.array(truncated, pa.bool_())]
        return pa.Table.from_arrays(columns, schema=self.schema)
