"""The pooling modes, in one table: what each reduces, which model families allow it, what it needs.

The config's choices (`config.Pooling`), the check of a mode against the model's family
(`models.resolve_model`), the extraction dispatch (`extraction.pool`) and the embedding actor's
forward (`embed.Embedder`) all read this table; adding a mode is one row here and, for a new
reduction, one branch in `extraction.pool`. Torch-free, so the driver and the config import it.
"""

from __future__ import annotations

from dataclasses import dataclass

ENCODER, ENCODER_DECODER, DECODER = "encoder", "encoder_decoder", "decoder"
FAMILY_NAMES = {ENCODER: "a BERT-style encoder", ENCODER_DECODER: "a T5-style encoder-decoder", DECODER: "a decoder-only"}


@dataclass(frozen=True)
class PoolingMode:
    name: str
    reduces: str  # the reduction extraction.pool applies: cls, cls_pooler, mean, max, last_token, mask_token
    families: tuple[str, ...]  # the model families it fits
    states: str = "encoder"  # whose hidden states it reads: the encoder's (or the decoder LLM's), or a T5 decoder's
    reads_cls: bool = False  # reads the [CLS] special token: exclude_special_tokens cannot apply
    needs_pooler: bool = False  # the model's pretrained pooler head, last layer only
    needs_mask_template: bool = False  # a template with [MASK] (PromptBERT)
    excludes_instruction: bool = False  # exclude_instruction can leave instruction tokens out of it
    summary: str = ""


POOLING = {m.name: m for m in (
    PoolingMode("cls", "cls", (ENCODER,), reads_cls=True, summary="H[:, 0], the [CLS] state"),
    PoolingMode("cls_pooler", "cls_pooler", (ENCODER,), reads_cls=True, needs_pooler=True,
                summary="the model's pretrained pooler head over [CLS] (BERT: tanh(W H[:, 0] + b))"),
    PoolingMode("mean", "mean", (ENCODER, DECODER), excludes_instruction=True, summary="mean over the selected tokens"),
    PoolingMode("max", "max", (ENCODER, DECODER), excludes_instruction=True, summary="max over the selected tokens"),
    PoolingMode("last_token", "last_token", (ENCODER, DECODER),
                summary="the last attended token, whichever side the padding is on (PromptEOL)"),
    PoolingMode("mask_token", "mask_token", (ENCODER,), needs_mask_template=True,
                summary="mean over the [MASK] position(s) of a prompt (PromptBERT)"),
    PoolingMode("encoder_first", "cls", (ENCODER_DECODER,), summary="Sentence-T5 ST-Enc first: the encoder's first state"),
    PoolingMode("encoder_mean", "mean", (ENCODER_DECODER,), excludes_instruction=True,
                summary="Sentence-T5 ST-Enc mean: mean over the encoder's states"),
    PoolingMode("decoder_first", "cls", (ENCODER_DECODER,), states="decoder",
                summary="Sentence-T5 ST-Dec: the decoder's first state, its start token only"),
)}
POOLING_NAMES = tuple(POOLING)
REDUCTIONS = tuple(dict.fromkeys(m.reduces for m in POOLING.values()))


@dataclass(frozen=True)
class Head:
    """One way to read a vector out of one forward pass: the pooling mode, the layers averaged,
    whether special tokens are left out, and L2 normalisation. A sweep's variants that differ only
    in these share the forward (`EmbedSpec.heads`)."""

    pooling: str = "mean"
    layers: tuple[int, ...] = (-1,)
    exclude_special_tokens: bool = False
    normalize: bool = False

    @classmethod
    def of(cls, extraction) -> "Head":
        """The head of an ExtractionConfig."""
        return cls(extraction.pooling, tuple(extraction.layers), extraction.exclude_special_tokens, extraction.normalize)


def modes_for(family: str) -> tuple[str, ...]:
    """The pooling modes a model family allows, in the table's order."""
    return tuple(name for name, m in POOLING.items() if family in m.families)
