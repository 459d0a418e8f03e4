"""Sentence-embedding extraction: pooling over chosen tokens and layers. Pure torch, no Ray.

Given the tuple of hidden states a transformer returns (index 0 is the embedding output,
index i the output of layer i, -1 the last layer):

1. Layers. The chosen layers are averaged token-wise:  H = mean_{l in layers} hidden_states[l].
   [1, -1] is the "first-last average" of BERT-flow/BERT-whitening/SimCSE, [-2, -1] "last two".
2. Tokens. A mask M (batch x seq) selects the pooled tokens: the attention mask, minus special
   tokens ([CLS], [SEP], ...) when they are excluded.
3. Pooling over those tokens:
   cls        H[:, 0]
   cls_pooler pooler(H), the model's pretrained head over [CLS] (BERT: tanh(W H[:, 0] + b));
              `pooler` takes batch x seq x dim like transformers' BertPooler
   mean       sum_t M_t H_t / sum_t M_t
   max        max over t with M_t = 1 (masked positions never win)
   last_token H[:, t_last], t_last the last attended position, so left and right padding agree
              (PromptEOL's last token for decoder LLMs)
   mask_token mean of H over the [MASK] position(s) (PromptBERT)
   T5 (Sentence-T5): encoder_first and encoder_mean are cls and mean over the encoder's states,
   decoder_first is the first decoder state; the caller passes the matching hidden states.
4. Optional L2 normalisation.

Instruction tokens (Instructor/BGE/E5 prefixes) can be left out of mean/max pooling through
`exclude_mask` while the model has attended to them.

Pooling runs in float32 whatever dtype the model ran in, so bf16/fp16 forwards lose no more
precision than the forward itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from operators.methods.pooling import POOLING


def average_layers(hidden_states: Sequence[torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    n = len(hidden_states)
    for layer in layers:
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} out of range: the model returns {n} hidden states (0..{n - 1})")
    stacked = torch.stack([hidden_states[layer].float() for layer in layers], dim=0)
    return stacked.mean(dim=0)


def token_mask(
    attention_mask: torch.Tensor,
    special_tokens_mask: torch.Tensor | None = None,
    exclude_special: bool = False,
    exclude_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The tokens mean/max pooling reads: attended, minus special tokens when excluded, minus
    `exclude_mask` (instruction tokens)."""
    mask = attention_mask.bool()
    if exclude_special:
        if special_tokens_mask is None:
            raise ValueError("exclude_special_tokens needs the tokenizer's special_tokens_mask")
        mask = mask & ~special_tokens_mask.bool()
    if exclude_mask is not None:
        mask = mask & ~exclude_mask.bool()
    return mask


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row, whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


@torch.no_grad()
def pool(
    hidden_states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    *,
    pooling: str = "mean",
    layers: Sequence[int] = (-1,),
    special_tokens_mask: torch.Tensor | None = None,
    exclude_special_tokens: bool = False,
    exclude_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    pooler: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Pool per-layer hidden states (each batch x seq x dim) into one float32 vector per row.

    Args:
        exclude_mask: tokens (batch x seq) left out of mean/max pooling, e.g. an instruction.
        target_mask: the [MASK] position(s) for pooling="mask_token".
    """
    if pooling not in POOLING:
        raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLING)}")
    pooling = POOLING[pooling].reduces  # the T5 modes reduce the states the caller hands in like cls/mean
    h = average_layers(hidden_states, layers)
    if pooling == "last_token":
        rows = torch.arange(h.shape[0], device=h.device)
        out = h[rows, last_positions(attention_mask)]
    elif pooling == "mask_token":
        if target_mask is None:
            raise ValueError("pooling=mask_token needs the [MASK] positions (target_mask)")
        m = (target_mask.bool() & attention_mask.bool()).unsqueeze(-1)
        if not bool(m.any(dim=1).all()):
            raise ValueError("pooling=mask_token: a row has no [MASK] token (was the template cut by max_length?)")
        out = (h * m).sum(dim=1) / m.sum(dim=1).to(h.dtype)
    elif pooling == "cls":
        out = h[:, 0]
    elif pooling == "cls_pooler":
        if pooler is None:
            raise ValueError("pooling=cls_pooler needs the model's pooler head; this model has none")
        out = pooler(h.to(_param_dtype(pooler, h.dtype))).float()
    else:
        mask = token_mask(attention_mask, special_tokens_mask, exclude_special_tokens, exclude_mask)
        m = mask.unsqueeze(-1)
        if pooling == "mean":
            out = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1).to(h.dtype)
        else:
            out = h.masked_fill(~m, float("-inf")).amax(dim=1)
            out = torch.where(mask.any(dim=1, keepdim=True), out, torch.zeros_like(out))
    if normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=-1)
    return out


def takes_position_ids(model) -> bool:
    """Whether the model's forward takes position_ids (decoders: forward_states passes them)."""
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters


def forward_states(model, family: str, decoder_states: bool, input_ids, attention_mask, need_all_layers: bool,
                   takes_position_ids: bool) -> tuple[torch.Tensor, ...]:
    """The hidden states pooling reads, per model family: every layer's when need_all_layers,
    else the last one's alone. The torch engine runs it, and the engines' exports trace it."""
    kw = dict(output_hidden_states=need_all_layers, return_dict=True)
    if family == "encoder_decoder" and decoder_states:
        # Sentence-T5's ST-Dec: the decoder sees only its start token.
        start = torch.full_like(input_ids[:, :1], model.config.decoder_start_token_id)
        out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start, use_cache=False, **kw)
        return out.decoder_hidden_states if need_all_layers else (out.last_hidden_state,)
    model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family == "decoder":
        kw["use_cache"] = False
        if takes_position_ids:
            # Positions count real tokens only, so left padding gives the same states as right.
            model_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(**model_inputs, **kw)
    return out.hidden_states if need_all_layers else (out.last_hidden_state,)


def _param_dtype(module, default: torch.dtype) -> torch.dtype:
    params = getattr(module, "parameters", None)
    if params is None:
        return default
    first = next(iter(params()), None)
    return first.dtype if first is not None else default
