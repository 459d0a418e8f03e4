"""The pooling table is the one source: the config's choices, the family check and the dispatch."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from operators.config.loading import load_config
from operators.config.schema import ConfigError, ExtractionConfig, Pooling
from operators.methods.extraction import pool
from operators.methods.pooling import FAMILY_NAMES, POOLING, REDUCTIONS, modes_for


def test_the_config_accepts_exactly_the_table_and_names_it_on_a_typo():
    assert set(get_args(Pooling)) == set(POOLING)
    with pytest.raises(ConfigError, match="'meen' is not valid; choose one of 'cls'"):
        load_config(None, ["extraction.pooling=meen"])


@pytest.mark.parametrize("name", list(POOLING))
def test_every_mode_dispatches_to_its_reduction(name):
    torch.manual_seed(0)
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    target = torch.zeros(2, 5, dtype=torch.bool)
    target[:, 1] = True
    kw = dict(target_mask=target, pooler=lambda x: torch.tanh(x[:, 0]))
    got = pool((h,), mask, pooling=name, **kw)
    want = pool((h,), mask, pooling=POOLING[name].reduces, **kw) if name != POOLING[name].reduces else None
    reference = {
        "cls": h[:, 0], "cls_pooler": torch.tanh(h[:, 0]), "mean": (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
        "max": torch.stack([h[0, :3].amax(0), h[1].amax(0)]), "last_token": torch.stack([h[0, 2], h[1, 4]]), "mask_token": h[:, 1],
    }[POOLING[name].reduces]
    torch.testing.assert_close(got, reference)
    if want is not None:
        torch.testing.assert_close(got, want)


def test_families_and_requirements_come_from_the_table():
    assert set(REDUCTIONS) == {"cls", "cls_pooler", "mean", "max", "last_token", "mask_token"}
    assert modes_for("encoder_decoder") == ("encoder_first", "encoder_mean", "decoder_first")
    assert "last_token" in modes_for("decoder") and "cls" not in modes_for("decoder")
    assert all(set(m.families) <= set(FAMILY_NAMES) for m in POOLING.values())
    for name, mode in POOLING.items():  # each requirement the table names is enforced by the config
        if mode.reads_cls:
            with pytest.raises(ValueError, match="exclude_special_tokens must be false"):
                ExtractionConfig(pooling=name, exclude_special_tokens=True)
        if mode.needs_mask_template:
            with pytest.raises(ValueError, match=r"\[MASK\]"):
                ExtractionConfig(pooling=name)
        if not mode.excludes_instruction:
            with pytest.raises(ValueError, match="exclude_instruction applies to pooling"):
                ExtractionConfig(pooling=name, instruction="Represent: ", exclude_instruction=True,
                                 template="x [MASK] {text}" if mode.needs_mask_template else None)
