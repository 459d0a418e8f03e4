"""The embedding operator: a callable class that loads a model once and embeds Arrow batches.

It knows nothing of Ray; the pipelines hand it to `map_batches` on an actor pool, and tests call
it directly. Input rows follow `readers.READ_SCHEMA`; rejected and end-of-shard rows pass
through untouched (no embedding), so every row reaches the writer and the counts reconcile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from operators.config import ExtractionConfig, ModelConfig
from operators.extraction import pool
from operators.models import ResolvedModel, local_source

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


class Embedder:
    """Load in __init__, embed in __call__(pa.Table) -> pa.Table."""

    def __init__(self, spec: EmbedSpec):
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.device = pick_device(spec.model.device)
        source = local_source(spec.resolved)
        kwargs = dict(revision=spec.resolved.revision, trust_remote_code=spec.model.trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        self.model = AutoModel.from_pretrained(source, dtype=TORCH_DTYPES[spec.model.dtype], **kwargs)
        self.model.to(self.device).eval()
        self.max_length = spec.resolved.max_length
        self.dimension = spec.resolved.dimension
        self.schema = output_schema(self.dimension, spec.output_dtype)
        self.pooler = getattr(self.model, "pooler", None) if spec.extraction.pooling == "cls_pooler" else None
        if spec.extraction.pooling == "cls_pooler" and self.pooler is None:
            raise RuntimeError(f"pooling=cls_pooler: {type(self.model).__name__} has no pooler module")

    # -- tokenization -----------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Tokenize with truncation at max_length; also report which texts were truncated.

        The tokenizer is asked for overflow windows so truncation is detected exactly (the
        first window is what gets embedded; a text with a second window was cut)."""
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_overflowing_tokens=True,
            return_special_tokens_mask=self.spec.extraction.exclude_special_tokens,
            return_tensors="pt",
        )
        mapping = enc.pop("overflow_to_sample_mapping").numpy()
        first = np.r_[True, mapping[1:] != mapping[:-1]]
        windows = np.bincount(mapping, minlength=len(texts))
        keep = torch.from_numpy(np.flatnonzero(first))
        width = int(enc["attention_mask"][keep].sum(dim=1).max())
        tensors = {k: v[keep][:, :width] for k, v in enc.items() if isinstance(v, torch.Tensor)}
        return tensors, windows > 1

    # -- forward + extraction ---------------------------------------------------------------

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
        last_only = set(ex.layers) == {-1}
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            tensors, cut = self.tokenize([texts[i] for i in idx])
            special = tensors.pop("special_tokens_mask", None)
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
            result = self.model(**inputs, output_hidden_states=not last_only, return_dict=True)
            hidden = (result.last_hidden_state,) if last_only else result.hidden_states
            vecs = pool(
                hidden,
                inputs["attention_mask"],
                pooling=ex.pooling,
                layers=ex.layers,
                special_tokens_mask=None if special is None else special.to(self.device),
                exclude_special_tokens=ex.exclude_special_tokens,
                pooler=self.pooler,
                normalize=ex.normalize,
            )
            out[idx] = vecs.float().cpu().numpy()
            n_tokens[idx] = tensors["attention_mask"].sum(dim=1).numpy()
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
