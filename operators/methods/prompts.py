"""Turning a document into the model's input text: instructions, prompt templates, PromptEOL
preprocessing, in-context demonstrations. Pure Python; runs wherever tokenization runs.

The formatted string is  demonstrations + instruction + template(preprocess(text)).
`prefix_chars` reports how many leading characters are instruction (and demonstrations), so
the tokens they produce can be left out of pooling while the model still attends to them.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'
PROMPTBERT_TEMPLATE = 'This sentence : "{text}" means [MASK] .'
MASK_PLACEHOLDER = "[MASK]"


def prompteol_preprocess(text: str) -> str:
    """The sentence clean-up of PromptEOL (Jiang et al., 2023, scaling_sentemb evaluation code):
    end with a period unless the text ends in . ? " or ', turn double quotes into single quotes
    (they would close the template's quotes), and turn a final '?' into '.'."""
    text = text.strip()
    if text and text[-1] not in ".?\"'":
        text += "."
    text = text.replace('"', "'")
    if text and text[-1] == "?":
        text = text[:-1] + "."
    return text


PREPROCESSORS = {"none": lambda s: s, "prompteol": prompteol_preprocess}


@dataclass(frozen=True)
class Formatted:
    text: str
    prefix_chars: int  # leading characters that belong to the instruction/demonstrations


def format_input(
    text: str,
    *,
    template: str | None = None,
    preprocess: str = "none",
    instruction: str | None = None,
    demonstrations: tuple[str, ...] = (),
    mask_token: str | None = None,
) -> Formatted:
    body = PREPROCESSORS[preprocess](text)
    if template:
        body = template.replace("{text}", body)
        if mask_token and MASK_PLACEHOLDER in body and mask_token != MASK_PLACEHOLDER:
            body = body.replace(MASK_PLACEHOLDER, mask_token)
    prefix = "".join(demonstrations) + (instruction or "")
    return Formatted(prefix + body, len(prefix))


def check_template(template: str | None) -> str | None:
    """The problem with a template, or None."""
    if template is None:
        return None
    if template.count("{text}") != 1:
        return "must contain {text} exactly once, e.g. 'This sentence : \"{text}\" means in one word:\"'"
    return None
