"""pipelines/fill_mirror.py: a mirror on S3 (moto) filled from another mirror, then the evaluation
run from it on Ray, scoring as the local mirror does; a task whose files are missing fails first."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import evaluate, fill_mirror
from tests.helpers import make_bench

TASKS = "eval.tasks=[STSBenchmark, SciFact, classification/mr]"


def test_fill_an_s3_mirror_and_evaluate_from_it(ray_local, tmp_path, tiny_bert, s3_bucket, capsys):
    bench = make_bench(tmp_path / "bench")
    mirror = f"s3://{s3_bucket}/mirror"
    assert fill_mirror.main(["--set", TASKS, "--mirror", mirror, "--from", str(bench), "--corpus", "wikitext-2"]) == 2
    assert "corpus wikitext-2: Salesforce/wikitext@b08601e04326:wikitext-2-raw-v1/validation" in capsys.readouterr().err
    assert fill_mirror.main(["--set", TASKS, "--mirror", mirror, "--from", str(bench), "--corpus", ""]) == 2  # not a named corpus
    capsys.readouterr()
    (bench / "hf/datasets/Salesforce/wikitext/wikitext-2-raw-v1").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["A line of Wikipedia .\n"] * 5}),
                   str(bench / "hf/datasets/Salesforce/wikitext/wikitext-2-raw-v1/validation-00000-of-00001.parquet"))
    assert fill_mirror.main(["--set", TASKS, "--mirror", mirror, "--from", str(bench)]) == 0
    assert "done: 7 files" in capsys.readouterr().out  # STS-B 1, SciFact 3, MR 2, Wikitext 1
    s3 = fsspec.filesystem("s3")
    manifest = json.loads(s3.cat(f"{s3_bucket}/mirror/MIRROR.json"))["files"]
    assert manifest["hf/datasets/mteb/scifact/qrels/test.tsv"]["revision"] == "d56462d0e63a25450459c4f213e49ffdb866f7f9"
    scores = {}
    for name, where in (("local", str(bench)), ("s3", mirror)):
        out = tmp_path / name
        sets = ["--set", f"model.name={tiny_bert}", "--set", f"eval.mirror={where}", "--set", TASKS, "--set", "eval.folds=3"]
        assert evaluate.main([*sets, "--output", str(out)]) == 0
        scores[name] = {t: r["score"] for t, r in json.loads((out / "results.json").read_text())["tasks"].items()}
    assert scores["s3"] == scores["local"]
