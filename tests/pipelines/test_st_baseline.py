"""pipelines/st_baseline.py, the sentence-transformers baselines of `benchmark.py --engines`."""

from __future__ import annotations

import json


def test_the_sentence_transformers_baseline_script(tmp_path, tiny_bert, capsys):
    """pipelines/st_baseline.py, on the torch backend (the others need `make bench-env`): one
    timed encode of every text, reported as JSON on its last line."""
    from pipelines.st_baseline import main as st_main

    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(70)))
    assert st_main(["--model", tiny_bert, "--texts", str(tmp_path / "texts.jsonl"), "--backends", "torch", "--workdir", str(tmp_path / "st")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["backends"]["torch"]["rows"] == 70 and out["backends"]["torch"]["rows_per_s"] > 0
