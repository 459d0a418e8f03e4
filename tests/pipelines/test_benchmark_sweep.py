"""The sweep benchmark end to end on local Ray with a tiny model and benchmark folder: every run it
reports, and the fits' cost in texts embedded (the fit corpus once, whatever the variants).
Marked slow: `.venv/bin/python -m pytest -m slow tests/pipelines/test_benchmark_sweep.py`."""

from __future__ import annotations

import json

import pytest
import yaml

from pipelines import benchmark_sweep
from tests.helpers import REPO, fit_corpus, make_bench


@pytest.mark.slow  # six Ray passes (~2 min on 2 cores); the sweep's own pass counting is tested in tests/operators/evaluation/test_sweep.py
def test_the_benchmark_reports_each_run_and_embeds_the_fit_corpus_once(ray_local, tmp_path, tiny_bert, capsys):
    bench = make_bench(tmp_path / "bench")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "default.yaml"),
        "set": {"model.name": tiny_bert, "eval.mirror": str(bench), "eval.tasks": ["sts/stsb"]},
        "axes": {"extraction.layers": [[-1], [0]]},
    }))
    out = tmp_path / "out"
    corpus = fit_corpus(tmp_path / "fit")
    assert benchmark_sweep.main(["--sweep", str(sweep), "--output", str(out), "--fit-corpus", corpus, "--fit-rows", "64",
                                 "--whiten-ks", "16,8"]) == 0
    report = json.loads((out / "benchmark.json").read_text())
    assert report["variants"] == 2 and [p["heads"] for p in report["passes"]] == [2]
    assert report["one_s"] > 0 and report["sweep_s"] > 0 and report["separate_s"] > 0
    assert report["fit_texts_embedded"] == {"one": 64, "six": 64}
    printed = capsys.readouterr().out
    assert "sweep of 2 / one variant" in printed and "six fitted variants / one" in printed
