"""Preparation: the same result in this process and in the isolated child, and a driver that
prepares, plans and builds the Ray chain without importing torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from operators.config import load_config
from operators.models import ModelLoadError
from operators.prepare import prepare, prepare_here
from tests.helpers import REPO, make_corpus


def test_the_child_process_prepares_what_this_one_does(tmp_path):
    cfg = load_config(None)
    here, child = prepare_here(cfg), prepare(cfg, isolate=True)
    assert child == here  # resolved model, provenance, fingerprint, tokenizer: all of it
    assert here.dimension == 384 and here.tokenizer.digest and here.provenance["config_fingerprint"] == here.fingerprint
    with pytest.raises(ModelLoadError, match="no weight files"):  # and its errors arrive as themselves
        prepare(load_config(None, [f"model.name={tmp_path}"]), isolate=True)


def test_the_driver_imports_no_torch(tmp_path):
    """A job's driver: prepare (in a child process), plan, and the chain's stages built as Ray Data
    operators, with neither torch nor transformers ever imported into it."""
    folder = make_corpus(tmp_path / "in", shards=2, rows=5)
    code = f"""
import sys
from operators.config import load_config
from operators.prepare import prepare
from operators.planning import plan_run
import pipelines.embed_corpus, pipelines.evaluate, pipelines.fit_whitening, pipelines.benchmark, pipelines.score_sts
cfg = load_config(None, ["input.uri={folder}", "output.uri={tmp_path / 'out'}"])
prepared = prepare(cfg)
plan = plan_run(cfg, prepared)
assert len(plan.todo) == 2 and prepared.dimension == 384
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))
"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip().splitlines()[-1] == "[]"
