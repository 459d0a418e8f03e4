"""Prompt formatting and PromptEOL preprocessing, case by case."""

from __future__ import annotations

import pytest

from operators.methods.prompts import PROMPTBERT_TEMPLATE, PROMPTEOL_TEMPLATE, format_input, prompteol_preprocess


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A man plays guitar", "A man plays guitar."),  # a period is appended
        ("A man plays guitar.", "A man plays guitar."),
        ("Is it raining?", "Is it raining."),  # a final ? becomes .
        ('He said "hi"', "He said 'hi'"),  # ends in a quote: no period; " -> '
        ('He said "hi".', "He said 'hi'."),
        ("it's", "it's."),
        ("ends with a quote'", "ends with a quote'"),
        ("  padded words  ", "padded words."),
        ("", ""),
        ('What is "this"?', "What is 'this'."),
    ],
)
def test_prompteol_preprocessing(text, expected):
    assert prompteol_preprocess(text) == expected


def test_prompteol_template_wraps_the_cleaned_sentence():
    f = format_input('Why "now"?', template=PROMPTEOL_TEMPLATE, preprocess="prompteol")
    assert f.text == "This sentence : \"Why 'now'.\" means in one word:\""
    assert f.prefix_chars == 0


def test_instruction_and_demonstrations_are_a_counted_prefix():
    demo = 'This sentence : "A jockey riding a horse." means in one word:"Equestrian".\n'
    f = format_input("Cats purr", template=PROMPTEOL_TEMPLATE, instruction="Embed: ", demonstrations=(demo,))
    assert f.text == demo + 'Embed: This sentence : "Cats purr" means in one word:"'
    assert f.prefix_chars == len(demo) + len("Embed: ")


def test_mask_placeholder_follows_the_tokenizer():
    f = format_input("x", template=PROMPTBERT_TEMPLATE, mask_token="<mask>")
    assert f.text == 'This sentence : "x" means <mask> .'
    assert format_input("x", template=PROMPTBERT_TEMPLATE, mask_token="[MASK]").text.endswith("[MASK] .")
