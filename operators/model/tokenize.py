"""Tokenization, the CPU stage before the model actors.

`TextEncoder` (a callable class for a CPU actor pool; `tokenize_batch` wraps it for Ray tasks)
formats each text (template, instruction, demonstrations) and tokenizes it into one or more
windows of ids, carried to the model actors as list columns (TOKEN_COLUMNS). `plan_batches` is
the model actors' length bucketing (`vectors.bucket` applies it).

Preparation (`prepare.prepare`) loads the transformers tokenizer once and ships its Rust tokenizer to
the tokenize stage as a `PortableTokenizer`: those workers run the `tokenizers` library alone and
never import transformers or torch, which would cost each of them seconds of CPU at start and
hundreds of MB of memory (BENCHMARKS.md, "Figures the code relies on"). Models whose tokenizer
has no Rust backend (Python-only ones such as ByT5's) are refused by `resolve_model` before any work.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.config.schema import ExtractionConfig, ModelConfig, StorageConfig
from operators.methods.prompts import Formatted, format_input
from operators.model.resolution import ResolvedModel, hf_tokenizer, local_source


@dataclass(frozen=True)
class EmbedSpec:
    """Everything an embedding actor needs, in one picklable object."""

    model: ModelConfig
    extraction: ExtractionConfig
    resolved: ResolvedModel
    output_dtype: str = "float32"
    num_threads: int | None = None  # torch intra-op threads on CPU; None: leave torch's default
    postprocess: tuple = ()  # PipelineConfig.postprocess_steps(): typed steps (operators.methods.postprocess)
    artifact: str | None = None  # whitening artifact URI, when a step needs it
    artifact_storage: StorageConfig = field(default_factory=StorageConfig)
    # several heads (pooling.Head) read from one forward: the actor returns their raw vectors
    # side by side, in this order (a sweep); empty: the one head of `extraction`
    heads: tuple = ()

    @property
    def keeps_special(self) -> bool:
        """Whether tokenizing must return the special-token mask apart from `exclude` (a head
        that leaves special tokens out, beside heads that keep them)."""
        return any(h.exclude_special_tokens for h in self.heads)

    @classmethod
    def from_config(
        cls, cfg, resolved: ResolvedModel, num_threads: int | None = None, postprocess: bool = True, heads: tuple = (),
    ) -> "EmbedSpec":
        """The spec for `cfg`; postprocess=False gives raw extraction output (what a fit reads)."""
        steps = tuple(cfg.postprocess_steps()) if postprocess else ()
        return cls(
            model=cfg.model, extraction=cfg.extraction, resolved=resolved, output_dtype=cfg.output.dtype,
            num_threads=num_threads, postprocess=steps, artifact=cfg.whitening.artifact,
            artifact_storage=cfg.whitening.storage, heads=tuple(heads),
        )


# Columns the tokenize stage adds; they travel to the model actors and stop there.
TOKEN_COLUMNS = ("input_ids", "window_lengths", "exclude", "truncated")


@dataclass
class Encoded:
    """Tokenized texts: each text is one window of token ids, or several (long_documents: window)."""

    windows: list[np.ndarray]  # int64 token ids per window, unpadded
    owner: np.ndarray  # window -> text index
    truncated: np.ndarray  # per text: longer than max_length and cut
    exclude: list[np.ndarray] | None = None  # per window: tokens left out of mean/max pooling
    special: list[np.ndarray] | None = None  # per window: the special tokens, when EmbedSpec.keeps_special

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(w) for w in self.windows), dtype=np.int64, count=len(self.windows))


def load_tokenizer(spec: EmbedSpec):
    """The model's tokenizer, set up for embedding (a pad token, the padding side): a copy of the
    process's cached one (models.hf_tokenizer), so no caller sees another's changes."""
    r = spec.resolved
    tokenizer = copy.deepcopy(hf_tokenizer(local_source(r), r.revision, r.gguf_file, spec.model.trust_remote_code))
    if tokenizer.pad_token is None:  # decoder LLMs often ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if spec.model.padding_side != "auto":
        tokenizer.padding_side = spec.model.padding_side
    return tokenizer


@dataclass(frozen=True)
class PortableTokenizer:
    """The Rust tokenizer behind a transformers tokenizer (its JSON), with the attributes of the
    transformers tokenizer that change what it returns; `load()` rebuilds it with `tokenizers` alone."""

    json: str
    mask_token: str | None
    truncation_side: str
    split_special_tokens: bool
    digest: str

    @classmethod
    def from_transformers(cls, tokenizer) -> "PortableTokenizer":
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None:  # resolve_model refuses these models before any work
            raise ValueError(f"{type(tokenizer).__name__} is a Python-only tokenizer, with no Rust tokenizer to ship")
        text = backend.to_str()
        return cls(
            json=text, mask_token=tokenizer.mask_token, truncation_side=tokenizer.truncation_side,
            split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
            digest=hashlib.sha256(text.encode()).hexdigest(),
        )

    def load(self) -> "RustTokenizer":
        return RustTokenizer(self)


class RustTokenizer:
    """The part of a transformers tokenizer's `__call__` the tokenize stage uses (no padding, no
    tensors), on the `tokenizers` library: the same Rust `encode_batch` call with the same
    truncation, stride and special-token settings, so the ids, masks and offsets are the same."""

    def __init__(self, state: PortableTokenizer):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(state.json)
        self._tok.no_padding()
        self._tok.encode_special_tokens = state.split_special_tokens
        self._side = state.truncation_side
        self.mask_token = state.mask_token

    def __call__(
        self, text, *, add_special_tokens: bool = True, truncation: bool = False, max_length: int | None = None,
        stride: int = 0, return_overflowing_tokens: bool = False, return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
    ) -> dict:
        batched = isinstance(text, (list, tuple))
        if truncation and max_length is not None:
            self._tok.enable_truncation(max_length, stride=stride, strategy="longest_first", direction=self._side)
        else:
            self._tok.no_truncation()
        # without offsets, encode_batch_fast: the same ids and masks, 1.1-1.4x the rate (it skips offset tracking)
        # (tokenizers >= 0.21; older ones have encode_batch alone)
        encode = self._tok.encode_batch if return_offsets_mapping else getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(text) if batched else [text], add_special_tokens=add_special_tokens)
        flat, owner = [], []
        for i, e in enumerate(encodings):
            for x in [e, *e.overflowing] if return_overflowing_tokens else [e]:
                flat.append(x)
                owner.append(i)
        out = {"input_ids": [x.ids for x in flat]}
        if return_special_tokens_mask:
            out["special_tokens_mask"] = [x.special_tokens_mask for x in flat]
        if return_offsets_mapping:
            out["offset_mapping"] = [x.offsets for x in flat]
        if return_overflowing_tokens:
            out["overflow_to_sample_mapping"] = owner
        elif not batched:
            out = {k: v[0] for k, v in out.items()}
        return out


class TextEncoder:
    """Formats (template, instruction, demonstrations) and tokenizes texts into windows of ids.
    `portable`: the driver's tokenizer, rebuilt without transformers (see PortableTokenizer)."""

    def __init__(self, spec: EmbedSpec, tokenizer=None, portable: PortableTokenizer | None = None):
        self.spec = spec
        self.tokenizer = tokenizer or (portable.load() if portable else load_tokenizer(spec))
        self.max_length = spec.resolved.max_length

    def format(self, texts: list[str]) -> list[Formatted]:
        ex = self.spec.extraction
        if not (ex.template or ex.instruction or ex.demonstrations) and ex.preprocess == "none":
            return [Formatted(t, 0) for t in texts]  # the text as it is (format_input would return the same)
        return [
            format_input(
                t, template=ex.template, preprocess=ex.preprocess, instruction=ex.instruction,
                demonstrations=ex.demonstrations, mask_token=self.tokenizer.mask_token,
            )
            for t in texts
        ]

    def _tokenize(self, texts: list[str], *, windows: bool):
        ex = self.spec.extraction
        return self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            stride=self.spec.model.window_stride if windows else 0,
            return_overflowing_tokens=True,
            return_special_tokens_mask=ex.exclude_special_tokens or self.spec.keeps_special,
            return_offsets_mapping=ex.exclude_instruction,
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

    def encode(self, texts: list[str]) -> Encoded:
        """Overflow windows are requested so truncation is detected exactly. In truncate mode only
        each text's first window is kept; in window mode all of them."""
        ex = self.spec.extraction
        windows = self.spec.model.long_documents == "window"
        formatted = self.format(texts)
        prompted = bool(ex.template or ex.instruction or ex.demonstrations)
        enc = self._tokenize([f.text for f in formatted], windows=windows)
        mapping = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
        truncated = np.bincount(mapping, minlength=len(texts)) > 1
        if prompted and truncated.any():
            formatted = self._fit_prompts(list(texts), formatted, truncated)
            enc = self._tokenize([f.text for f in formatted], windows=False)
            mapping = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
        if windows:
            keep = np.arange(len(mapping))
            truncated = np.zeros(len(texts), dtype=bool)
        else:
            keep = np.flatnonzero(np.r_[True, mapping[1:] != mapping[:-1]])
        ids = [np.asarray(enc["input_ids"][j], dtype=np.int64) for j in keep]
        exclude = None
        if ex.exclude_special_tokens or ex.exclude_instruction:
            exclude = []
            for j in keep:
                m = np.zeros(len(enc["input_ids"][j]), dtype=bool)
                if ex.exclude_special_tokens:
                    m |= np.asarray(enc["special_tokens_mask"][j], dtype=bool)
                if ex.exclude_instruction:
                    off = np.asarray(enc["offset_mapping"][j], dtype=np.int64).reshape(-1, 2)
                    m |= (off[:, 0] < formatted[mapping[j]].prefix_chars) & (off[:, 1] > off[:, 0])
                exclude.append(m)
        special = [np.asarray(enc["special_tokens_mask"][j], dtype=bool) for j in keep] if self.spec.keeps_special else None
        return Encoded(ids, mapping[keep], truncated, exclude, special)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The tokenize stage: the batch plus TOKEN_COLUMNS (null for rows not embedded), built as
        flat arrays and offsets: a text's windows are consecutive (owner never decreases)."""
        ok = embeddable(batch)
        rows = np.flatnonzero(ok)
        texts = batch.column("text").take(pa.array(rows, type=pa.int64())).to_pylist()
        enc = self.encode(texts) if texts else Encoded([], np.zeros(0, np.int64), np.zeros(0, bool))
        n = batch.num_rows
        lengths = enc.lengths
        per_row_tokens = np.zeros(n, dtype=np.int64)
        per_row_windows = np.zeros(n, dtype=np.int64)
        per_row_tokens[rows] = np.bincount(enc.owner, weights=lengths, minlength=len(texts)).astype(np.int64)
        per_row_windows[rows] = np.bincount(enc.owner, minlength=len(texts))
        missing = pa.array(~ok)

        def lists(values: np.ndarray, counts: np.ndarray, type_: pa.DataType) -> pa.Array:
            offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
            return pa.ListArray.from_arrays(offsets, pa.array(values, type=type_), mask=missing)

        flat = np.concatenate(enc.windows) if enc.windows else np.zeros(0, np.int64)
        truncated = np.zeros(n, dtype=bool)
        truncated[rows] = enc.truncated
        out = batch
        for name in TOKEN_COLUMNS:
            if name in out.column_names:
                out = out.drop_columns([name])
        out = out.append_column("input_ids", lists(flat.astype(np.int32), per_row_tokens, pa.int32()))
        out = out.append_column("window_lengths", lists(lengths.astype(np.int32), per_row_windows, pa.int32()))
        if enc.exclude is not None:
            excl = lists(np.concatenate(enc.exclude) if enc.exclude else np.zeros(0, bool), per_row_tokens, pa.bool_())
        else:
            excl = pa.nulls(n, pa.list_(pa.bool_()))
        out = out.append_column("exclude", excl)
        return out.append_column("truncated", pa.array(truncated, type=pa.bool_()))


_ENCODERS: dict[int, TextEncoder] = {}


def tokenize_batch(batch: pa.Table, spec: EmbedSpec, portable: PortableTokenizer | None = None) -> pa.Table:
    """`map_batches` function for the tokenize stage (Ray tasks): one TextEncoder per worker
    process, spec and tokenizer, reused across the tasks that process runs."""
    key = hash((pickle.dumps(spec), portable.digest if portable else None))
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = TextEncoder(spec, portable=portable)
    return _ENCODERS[key](batch)


def embeddable(batch: pa.Table) -> np.ndarray:
    """Rows to embed: not rejected by the reader, not end-of-shard markers, not reused from an
    earlier run (all rows of a bare table with only a text column)."""
    n = batch.num_rows
    ok = np.ones(n, dtype=bool)
    if "reason" in batch.column_names:
        ok &= pc.is_null(batch.column("reason")).to_numpy(zero_copy_only=False)
    if "eof" in batch.column_names:
        ok &= ~pc.fill_null(batch.column("eof"), False).to_numpy(zero_copy_only=False)
    if "reuse" in batch.column_names:  # incremental runs: the earlier vector is kept
        ok &= ~pc.fill_null(batch.column("reuse"), False).to_numpy(zero_copy_only=False)
    return ok


def batch_encoding(batch: pa.Table, encoder) -> tuple[np.ndarray, Encoded]:
    """(the rows to embed, their Encoded form) for a model actor's batch: decoded from the tokenize
    stage's columns when it carries them, else tokenized here (direct calls, tests) by `encoder()`,
    a callable giving the TextEncoder, so an actor that never needs one never builds one."""
    rows = np.flatnonzero(embeddable(batch))
    if "input_ids" in batch.column_names:
        return rows, decode_tokens(batch, rows)
    return rows, encoder().encode(batch.column("text").take(pa.array(rows, type=pa.int64())).to_pylist())


def decode_tokens(batch: pa.Table, rows: np.ndarray) -> Encoded:
    """The Encoded form of the tokenize stage's columns for `rows`."""
    sub = batch.take(pa.array(rows, type=pa.int64()))
    ids = pc.list_flatten(sub.column("input_ids")).to_numpy().astype(np.int64)
    lengths = pc.list_flatten(sub.column("window_lengths")).to_numpy().astype(np.int64)
    per_text = pc.list_value_length(sub.column("window_lengths")).to_numpy()
    bounds = np.r_[0, np.cumsum(lengths)]
    windows = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    exclude = None
    if "exclude" in sub.column_names and sub.column("exclude").null_count < sub.num_rows:
        flags = pc.list_flatten(sub.column("exclude")).to_numpy(zero_copy_only=False).astype(bool)
        exclude = [flags[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    owner = np.repeat(np.arange(len(rows)), per_text)
    return Encoded(windows, owner, sub.column("truncated").to_numpy(zero_copy_only=False).astype(bool), exclude)


def plan_batches(lengths: np.ndarray, max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Length bucketing: sort the windows by length, then cut the sorted run into batches of at
    most max_rows windows and max_tokens padded tokens (a single longer window goes alone)."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or i - start >= max_rows or lengths[order[i]] * (i + 1 - start) > max_tokens:
            batches.append(order[start:i])
            start = i
    return batches


