"""Preparation: a job's driver prepares in a child interpreter exactly what a process with
transformers prepares in itself, gets the child's errors as themselves, and plans and builds the
chain without ever importing torch or transformers."""

from __future__ import annotations

import subprocess
import sys

from operators.config.loading import load_config
from operators.model.prepare import prepare_here
from tests.helpers import REPO, make_corpus


def test_the_driver_prepares_in_a_child_and_imports_no_torch(tmp_path):
    folder = make_corpus(tmp_path / "in", shards=2, rows=5)
    sets = [f"input.uri={folder}", f"output.uri={tmp_path / 'out'}"]
    code = f"""
import pickle, sys
from operators.config.loading import load_config
from operators.model.resolution import ModelLoadError
from operators.model.prepare import prepare
from operators.run.planning import plan_run
import pipelines.embed_corpus, pipelines.evaluate, pipelines.fit_whitening, pipelines.benchmark, pipelines.score_sts
cfg = load_config(None, {sets!r})
prepared = prepare(cfg)  # no transformers here: in a child interpreter
plan = plan_run(cfg, prepared)
assert len(plan.todo) == 2
try:
    prepare(load_config(None, ["model.name={tmp_path}"]))
except ModelLoadError as e:
    error = str(e)
sys.stdout.buffer.write(pickle.dumps((prepared, error, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))))
"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=300)
    assert got.returncode == 0, got.stderr.decode()[-3000:]
    import pickle

    child, error, heavy = pickle.loads(got.stdout)
    assert heavy == []  # the driver never imported torch or transformers
    here = prepare_here(load_config(None, sets))
    assert child == here  # resolved model, provenance, fingerprint, tokenizer: all of it
    assert here.dimension == 384 and here.tokenizer.digest and here.provenance["config_fingerprint"] == here.fingerprint
    assert "no weight files" in error  # the child's ModelLoadError, raised as itself in the driver
