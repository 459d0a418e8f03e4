"""The embedding operator: a callable class that loads a model once and embeds Arrow batches.

It knows nothing of Ray; the pipelines hand it to `map_batches` on an actor pool, and tests call
it directly. Input rows follow `readers.READ_SCHEMA`; rejected and end-of-shard rows pass
through untouched (no embedding), so every row reaches the writer and the counts reconcile.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import torch

from operators.methods.extraction import forward_states, pool, takes_position_ids
from operators.methods.pooling import POOLING, Head
from operators.methods.postprocess import Moments, PostProcessor, load_artifact, moments_row, output_dimension
from operators.model.resolution import local_source
from operators.model.tokenize import EmbedSpec, Encoded, TextEncoder, batch_encoding
from operators.model.vectors import ARROW_FLOATS, Embedded, bucket, device_type, forward_batch_size, output_schema, vector_table

__all__ = ["ARROW_FLOATS", "EmbedSpec", "Embedder", "output_schema", "pick_device"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    if device_type(requested, torch.cuda.is_available()) == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("model.device=cuda but no CUDA device is visible to this actor")
        return torch.device("cuda")
    return torch.device("cpu")


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


def load_model(spec: EmbedSpec, source: str, device: torch.device, attn_implementation: str | None = None) -> torch.nn.Module:
    """The transformers model of `spec` from the node-local `source`, in eval mode on `device`.
    T5 modes that only read the encoder load the encoder alone (half the weights).
    `attn_implementation` overrides model.attn_implementation (an engine's export)."""
    from transformers import AutoModel, AutoModelForTextEncoding

    r = spec.resolved
    kwargs = dict(revision=r.revision, trust_remote_code=spec.model.trust_remote_code)
    if r.gguf_file:
        kwargs["gguf_file"] = r.gguf_file
    attn = attn_implementation or spec.model.attn_implementation
    if attn != "auto":
        kwargs["attn_implementation"] = attn
    encoder_only = r.family == "encoder_decoder" and POOLING[spec.extraction.pooling].states != "decoder"
    loader = AutoModelForTextEncoding if encoder_only else AutoModel
    if spec.model.init == "random":  # the architecture alone, weights drawn from init_seed: the same on every actor
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "attn_implementation"})
        if "attn_implementation" in kwargs:
            config._attn_implementation = kwargs["attn_implementation"]
        torch.manual_seed(spec.model.init_seed)
        model = loader.from_config(config, trust_remote_code=spec.model.trust_remote_code)
        return model.to(dtype=TORCH_DTYPES[spec.model.dtype], device=device).eval()
    return loader.from_pretrained(source, dtype=TORCH_DTYPES[spec.model.dtype], **kwargs).to(device).eval()


# -- the model actor ----------------------------------------------------------------------------


class Embedder:
    """The model actor: load in __init__, embed in __call__(pa.Table) -> pa.Table.

    Batches that carry the tokenize stage's columns are embedded as they are; batches of text
    only (direct calls, tests) are tokenized here first."""

    def __init__(self, spec: EmbedSpec):
        self.spec = spec
        r = spec.resolved
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        # the onnx and openvino engines run on CPU, and so does what follows them
        self.device = pick_device(spec.model.device) if spec.model.engine == "torch" else torch.device("cpu")
        self.encoder = TextEncoder(spec)
        self.tokenizer = self.encoder.tokenizer
        self.max_length = r.max_length
        self.batch_size = forward_batch_size(spec, self.device.type == "cuda")
        self.heads = spec.heads or (Head.of(spec.extraction),)
        if spec.heads and spec.postprocess:
            raise ValueError("EmbedSpec.heads gives raw vectors: post-processing applies to one head")
        self.dimension = output_dimension(list(spec.postprocess), r.dimension) * len(self.heads)
        self.schema = output_schema(self.dimension, spec.output_dtype)
        self.post = None
        source = local_source(r)
        self.mode = POOLING[spec.extraction.pooling]  # the heads share its states (encoder or decoder)
        self.model = self.engine = self.pooler = None
        if spec.model.engine == "torch":
            self.model = load_model(spec, source, self.device)
            self.takes_position_ids = takes_position_ids(self.model)
            needs_pooler = any(POOLING[h.pooling].needs_pooler for h in self.heads)
            self.pooler = getattr(self.model, "pooler", None) if needs_pooler else None
            if needs_pooler and self.pooler is None:
                raise RuntimeError(f"pooling=cls_pooler: {type(self.model).__name__} has no pooler module")
        else:
            from operators.model.engines import load_states

            self.engine = load_states(spec, source, lambda attn=None: load_model(spec, source, torch.device("cpu"), attn), self.encoder)
        if spec.postprocess:
            fit = None
            if any(s.fitted for s in spec.postprocess):
                from operators.io.storage import get_fs

                fs, path = get_fs(spec.artifact, spec.artifact_storage)
                fit = load_artifact(fs, path)[0]
            self.post = PostProcessor(list(spec.postprocess), fit).to(self.device)
        self.projection = load_projection(source, r.projection, self.device) if r.projection else None

    @property
    def attn_implementation(self) -> str | None:
        return getattr(getattr(self.model, "config", None), "_attn_implementation", None)

    # -- forward + extraction ---------------------------------------------------------------

    def states(self, inputs: dict[str, torch.Tensor], need_all_layers: bool):
        """What pooling reads for one padded batch: (hidden states, the layers to average over
        them, the pooler head). An engine's graph has averaged the layers (and run the pooler)."""
        if self.engine is None:
            hidden = forward_states(
                self.model, self.spec.resolved.family, self.mode.states == "decoder", inputs["input_ids"],
                inputs["attention_mask"], need_all_layers, self.takes_position_ids,
            )
            return hidden, self.spec.extraction.layers, self.pooler
        outs = self.engine(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy())
        pooled = torch.from_numpy(outs[1]) if len(outs) > 1 else None
        return (torch.from_numpy(outs[0]),), (-1,), (None if pooled is None else (lambda _h: pooled))

    def pad(self, enc: Encoded, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Pad windows `idx` to their longest, on the tokenizer's padding side; on CUDA through
        pinned host memory with a non-blocking copy."""
        lengths = [len(enc.windows[i]) for i in idx]
        width = max(lengths)
        ids = np.full((len(idx), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        exclude = np.zeros((len(idx), width), dtype=bool) if enc.exclude is not None else None
        special = np.zeros((len(idx), width), dtype=bool) if enc.special is not None else None
        left = self.tokenizer.padding_side == "left"
        for row, (i, n) in enumerate(zip(idx, lengths)):
            cols = slice(width - n, width) if left else slice(0, n)
            ids[row, cols] = enc.windows[i]
            mask[row, cols] = 1
            if exclude is not None:
                exclude[row, cols] = enc.exclude[i]
            if special is not None:
                special[row, cols] = enc.special[i]
        arrays = {"input_ids": ids, "attention_mask": mask}
        if exclude is not None:
            arrays["exclude_mask"] = exclude
        if special is not None:  # a sweep's heads that leave special tokens out
            arrays["special_mask"] = special
        pin = self.device.type == "cuda"
        return {k: (torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v)).to(self.device, non_blocking=pin) for k, v in arrays.items()}

    @torch.inference_mode()
    def embed_encoded(self, enc: Encoded, n: int) -> Embedded:
        """The vectors and counts of `n` texts, in input order. Windows go through the model in
        length-bucketed batches; each batch's states are pooled by every head (EmbedSpec.heads:
        their raw vectors side by side; else the one head of `extraction`, post-processed)."""
        lengths = enc.lengths
        batches, n_tokens, padded_tokens = bucket(enc, n, self.spec.model.max_batch_tokens, self.batch_size)
        out = np.zeros((n, self.dimension), dtype=np.float32)
        if not len(lengths):
            return Embedded(out, n_tokens, enc.truncated.copy(), padded_tokens)
        heads = self.heads
        if self.spec.keeps_special and enc.special is None:
            raise ValueError("a head leaves special tokens out, but the batch carries no special-token mask: tokenize on the actor")
        need_all_layers = any(set(h.layers) != {-1} for h in heads)
        needs_target = any(POOLING[h.pooling].needs_mask_template for h in heads)
        pooled: list[list[torch.Tensor]] = [[] for _ in heads]
        for idx in batches:
            inputs = self.pad(enc, idx)
            hidden, layers, pooler = self.states(inputs, need_all_layers)
            mask = inputs["attention_mask"]
            special = inputs.get("special_mask")
            if self.spec.resolved.family == "encoder_decoder" and self.mode.states == "decoder":
                mask = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)
            target = inputs["input_ids"] == self.tokenizer.mask_token_id if needs_target else None
            for h, head in enumerate(heads):
                exclude = inputs.get("exclude_mask")
                if head.exclude_special_tokens and special is not None:
                    exclude = special if exclude is None else exclude | special
                pooled[h].append(pool(
                    hidden, mask, pooling=head.pooling, layers=layers if self.engine is not None else head.layers,
                    exclude_mask=exclude, target_mask=target, pooler=pooler,
                ))
        order = torch.from_numpy(np.argsort(np.concatenate(batches), kind="stable")).to(self.device)
        weights = None
        if len(lengths) != n:  # windows: average each text's windows, weighted by length
            weights = torch.zeros(n, len(lengths))
            weights[torch.from_numpy(enc.owner), torch.arange(len(lengths))] = torch.from_numpy(lengths).float()
            weights = (weights / weights.sum(dim=1, keepdim=True)).to(self.device)
        per_head = []
        for head, parts in zip(heads, pooled):
            vecs = torch.cat(parts)[order]  # back to window order
            if weights is not None:
                vecs = weights @ vecs
            if self.projection is not None:
                vecs = self.projection(vecs)
            if head.normalize:
                vecs = torch.nn.functional.normalize(vecs, p=2, dim=-1)
            per_head.append(vecs)
        vecs = torch.cat(per_head, dim=1) if len(per_head) > 1 else per_head[0]
        if self.post is not None:  # on the model's device
            vecs = self.post(vecs)
        out[:] = vecs.float().cpu().numpy()
        return Embedded(out, n_tokens, enc.truncated.copy(), padded_tokens)

    def embed_texts(self, texts: list[str]) -> Embedded:
        """The vectors and counts of `texts`, in input order."""
        return self.embed_encoded(self.encoder.encode(texts), len(texts))

    def embed_batch(self, batch: pa.Table) -> Embedded:
        """The vectors and counts of a read or tokenized batch's embeddable rows (`.rows`)."""
        rows, enc = batch_encoding(batch, lambda: self.encoder)
        embedded = self.embed_encoded(enc, len(rows))
        embedded.rows = rows
        return embedded

    def __call__(self, batch: pa.Table) -> pa.Table:
        return vector_table(batch, self.embed_batch(batch), self.schema)


class EmbeddingMoments:
    """The whitening fit's operator: embed a batch (raw extraction) and return its mergeable
    moments as one row: n, and sum x and sum x x^T as float64 bytes (d and d x d values, shipped
    as one buffer each, not as Python lists)."""

    def __init__(self, spec: EmbedSpec):
        self.embedder = Embedder(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        m = Moments.of(self.embedder.embed_batch(batch).vectors)
        return moments_row(m)
