"""The embed stage's output rows, torch-free: the output schema, assembling an output batch from
a read/tokenized batch and its vectors, and the no-op model the benchmark's data-path ceiling runs.

`NoopEmbedder` stands where the model actor would (same input, same output schema, same length
bucketing and padding counts) but embeds nothing: it loads no weights and imports neither torch
nor a model, so a no-op run measures what reading, tokenizing, Ray and writing cost.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from operators.methods.postprocess import output_dimension
from operators.model.tokenize import EmbedSpec, Encoded, TextEncoder, batch_encoding, plan_batches

ARROW_FLOATS = {"float32": pa.float32(), "float16": pa.float16()}
PASSTHROUGH = ("id", "shard", "line", "reason", "raw", "eof")


@dataclass
class Embedded:
    """A model's output for n texts (or, from `embed_batch`, for a batch's embeddable `rows`)."""

    vectors: np.ndarray  # float32 [n, d], in input order
    n_tokens: np.ndarray  # int32 [n]: tokens fed to the model, special tokens included
    truncated: np.ndarray  # bool [n]: longer than max_length and cut
    padded_tokens: np.ndarray  # int32 [n]: n_tokens plus the padding its forward batches added
    rows: np.ndarray | None = None  # the batch rows these are for (rejected, eof and reused rows left out)


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
            ("padded_tokens", pa.int32()),  # n_tokens plus the padding its forward batch added
            ("content_hash", pa.string()),  # of the text (incremental runs compare it with the last run's)
            ("reuse", pa.bool_()),  # the last run's vector for this id and text is kept; embedding is null here
        ]
    )


def cuda_visible() -> bool:
    """Whether this process sees a CUDA device, without importing torch where it is not loaded
    (Ray gives each actor CUDA_VISIBLE_DEVICES for the GPUs it reserved)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return env.strip() not in ("", "-1")
    return os.path.exists("/dev/nvidia0")


def device_type(requested: str, cuda: bool) -> str:
    """The device a model actor runs on: model.device, with auto -> cuda when one is visible."""
    return "cuda" if requested == "cuda" or (requested == "auto" and cuda) else "cpu"


def forward_batch_size(spec: EmbedSpec, cuda: bool) -> int:
    """Texts per forward pass: model.forward_batch_size, else 32 on CPU (small batches stay in cache), 256 on GPU."""
    return spec.model.forward_batch_size or (256 if cuda else 32)


def bucket(enc: Encoded, n: int, max_tokens: int, max_rows: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(forward batches of window indices, n_tokens [n], padded_tokens [n]) for `n` texts: the
    windows' length bucketing, and per text its real tokens and the tokens its batches padded to."""
    lengths = enc.lengths
    batches = plan_batches(lengths, max_tokens, max_rows)
    padded = np.zeros(len(lengths), dtype=np.int64)
    for idx in batches:
        padded[idx] = lengths[idx].max()
    n_tokens = np.bincount(enc.owner, weights=lengths, minlength=n).astype(np.int32)
    padded_tokens = np.bincount(enc.owner, weights=padded, minlength=n).astype(np.int32)
    return batches, n_tokens, padded_tokens


def vector_table(batch: pa.Table, embedded: Embedded, schema: pa.Schema) -> pa.Table:
    """The output batch: every input row, in order, with the vectors and counts of `embedded.rows`
    and a null embedding elsewhere (rejected, end-of-shard, reused rows)."""
    rows, vecs = embedded.rows, embedded.vectors
    ntok, cut, pad = embedded.n_tokens, embedded.truncated, embedded.padded_tokens
    n = batch.num_rows
    dimension = schema.field("embedding").type.list_size
    value_type = schema.field("embedding").type.value_type
    ok = np.zeros(n, dtype=bool)
    ok[rows] = True
    full = np.zeros((n, dimension), dtype=value_type.to_pandas_dtype())
    full[rows] = vecs
    columns = {}
    for name, values, dtype in (("n_tokens", ntok, np.int32), ("truncated", cut, bool), ("padded_tokens", pad, np.int32)):
        col = np.zeros(n, dtype=dtype)
        col[rows] = values
        columns[name] = col
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(full.ravel(), type=value_type), dimension, mask=pa.array(~ok))
    out = [batch.column(name) for name in PASSTHROUGH]
    out += [embedding, pa.array(columns["n_tokens"], pa.int32()), pa.array(columns["truncated"], pa.bool_()),
            pa.array(columns["padded_tokens"], pa.int32())]
    for name, typ, default in (("content_hash", pa.string(), None), ("reuse", pa.bool_(), False)):
        out.append(batch.column(name) if name in batch.column_names else pa.array([default] * n, typ))
    return pa.Table.from_arrays(out, schema=schema)


class NoopEmbedder:
    """The model actor's stand-in for the data-path ceiling: zero vectors of the output dimension,
    with the real token and padding counts."""

    def __init__(self, spec: EmbedSpec):
        self.spec = spec
        # the same device rule as the model actor's, so the padding counts match a real run's
        self.batch_size = forward_batch_size(spec, device_type(spec.model.device, cuda_visible()) == "cuda")
        self.dimension = output_dimension(list(spec.postprocess), spec.resolved.dimension)
        self.schema = output_schema(self.dimension, spec.output_dtype)
        self._encoder: TextEncoder | None = None  # only for batches that arrive untokenized

    def _text_encoder(self) -> TextEncoder:
        self._encoder = self._encoder or TextEncoder(self.spec)
        return self._encoder

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, enc = batch_encoding(batch, self._text_encoder)
        _, ntok, pad = bucket(enc, len(rows), self.spec.model.max_batch_tokens, self.batch_size)
        vecs = np.zeros((len(rows), self.dimension), dtype=np.float32)
        return vector_table(batch, Embedded(vecs, ntok, enc.truncated, pad, rows), self.schema)
