"""The corpus pipeline end to end on a real local Ray: local files and S3 (moto on 127.0.0.1),
bad rows reconciled, re-runs idempotent, kill-then-resume equal to a clean run, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from operators.config import load_config
from operators.storage import list_shards
from pipelines.embed_corpus import main, run
from tests.conftest import REPO, sample_sentences, write_jsonl
from tests.operators.test_readers import BAD_JSONL, EXPECTED_REASONS


def config(tmp_path, input_uri, output_uri, model, *extra):
    tree = {
        "input": {"uri": str(input_uri), "rows_per_block": 64},
        "output": {"uri": str(output_uri)},
        "model": {"name": model, "batch_size": 32},
        "extraction": {"pooling": "mean", "normalize": True},
        "ray": {"batch_size": 64},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path, list(extra)), path


def read_vectors(fs, out_dir) -> dict[str, np.ndarray]:
    vectors = {}
    for p in sorted(fs.glob(f"{out_dir.rstrip('/')}/*.parquet")):
        with fs.open(p, "rb") as f:
            t = pq.read_table(f)
        for i, v in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()):
            assert i not in vectors, f"duplicate id {i}"
            vectors[i] = np.asarray(v, dtype=np.float32)
    return vectors


def make_corpus(root: Path, shards: int, rows: int, bad: bool = False) -> Path:
    texts = sample_sentences(shards * rows)
    for k in range(shards):
        recs = [{"id": f"s{k}-{i}", "text": texts[k * rows + i]} for i in range(rows)]
        write_jsonl(root / f"part-{k:02d}.jsonl", recs + (BAD_JSONL if bad and k == 0 else []))
    return root


def test_local_end_to_end_with_bad_rows(ray_local, tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    corpus = make_corpus(tmp_path / "in", shards=3, rows=40, bad=True)
    cfg, _ = config(tmp_path, corpus, tmp_path / "out", minilm_path)
    summary = run(cfg)

    n_bad = len(EXPECTED_REASONS)
    n_good_bad_file = len(BAD_JSONL) - n_bad
    assert summary["rows_in"] == 3 * 40 + len(BAD_JSONL)
    assert summary["rows_rejected"] == n_bad
    assert summary["rows_written"] == 3 * 40 + n_good_bad_file
    assert summary["rows_in"] == summary["rows_written"] + summary["rows_rejected"]
    assert 0 < summary["tokens"] <= summary["padded_tokens"]  # padding counted, never below the real tokens

    fs = fsspec.filesystem("file")
    out = str(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3
    for entry in manifest["shards"]:
        assert entry["rows_in"] == entry["rows_written"] + entry["rows_rejected"]
        assert set(entry["input_fingerprint"]) == {"size", "mtime"}
    first = manifest["shards"][0]
    assert (first["rows_in"], first["rows_rejected"]) == (40 + len(BAD_JSONL), n_bad)

    rejected = pq.read_table(tmp_path / "out" / "_rejected" / first["output"]).to_pylist()
    assert sorted((r["line"] - 40, r["reason"].split(":")[0]) for r in rejected) == sorted(
        (line, reason.split(":")[0]) for line, reason in EXPECTED_REASONS.items()
    )
    assert all(r["shard"].endswith("part-00.jsonl") for r in rejected)

    # vectors: the same as sentence-transformers' encode of the same texts
    vectors = read_vectors(fs, out)
    texts = {f"s{k}-{i}": t for k in range(3) for i, t in enumerate(sample_sentences(120)[k * 40 : (k + 1) * 40])}
    ids = sorted(texts)
    st = SentenceTransformer(minilm_path, device="cpu").encode([texts[i] for i in ids], convert_to_numpy=True)
    np.testing.assert_allclose(np.stack([vectors[i] for i in ids]), st, atol=1e-5)

    # provenance in the Parquet footer
    meta = json.loads(pq.ParquetFile(tmp_path / "out" / first["output"]).metadata.metadata[b"corpus_embed"])
    assert meta["dimension"] == 384 and meta["normalized"] is True
    assert meta["extraction"]["pooling"] == "mean" and meta["model"]["weights_sha256"]
    assert meta["config_fingerprint"] == manifest["config_fingerprint"] == summary["config_fingerprint"]
    assert meta["package_version"]
    assert not (tmp_path / "out" / "_staging").exists()

    # Re-run: nothing to do, nothing written but the run's own log entry and report.
    def outputs():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if "_runs" not in p.parts}

    before = outputs()
    again = run(cfg)
    assert again["shards_embedded"] == 0 and again["shards_skipped"] == 3
    assert outputs() == before
    assert len((tmp_path / "out" / "_runs" / "runs.jsonl").read_text().splitlines()) == 2

    # A changed shard is re-embedded, and only that one.
    write_jsonl(corpus / "part-02.jsonl", [{"id": "new", "text": "A brand new document."}])
    changed = run(cfg)
    assert (changed["shards_embedded"], changed["shards_skipped"], changed["rows_in"]) == (1, 2, 1)
    vectors = read_vectors(fs, out)
    assert "new" in vectors and "s2-0" not in vectors and "s1-0" in vectors


def test_s3_input_and_output(ray_local, tmp_path, s3_bucket, tiny_bert):
    """Real S3 traffic to moto through s3fs, credentials and endpoint from the AWS environment."""
    fs = fsspec.filesystem("s3")
    local = make_corpus(tmp_path / "in", shards=2, rows=30)
    for p in local.iterdir():
        fs.put_file(str(p), f"{s3_bucket}/corpus/{p.name}")
    cfg, _ = config(tmp_path, f"s3://{s3_bucket}/corpus/", f"s3://{s3_bucket}/vectors/", tiny_bert)
    summary = run(cfg)
    assert (summary["rows_written"], summary["shards_embedded"]) == (60, 2)
    shards = list_shards(f"s3://{s3_bucket}/corpus/", "auto", cfg.input.storage)
    listing = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/vectors/"))
    assert listing == sorted(["manifest.json", "_runs", *(s.output_name for s in shards)])
    assert json.loads(fs.cat(f"{s3_bucket}/vectors/_runs/{summary['run_id']}.json"))["status"] == "ok"
    manifest = json.loads(fs.cat(f"{s3_bucket}/vectors/manifest.json"))
    assert all("etag" in e["input_fingerprint"] for e in manifest["shards"])
    vectors = read_vectors(fs, f"{s3_bucket}/vectors")
    assert len(vectors) == 60 and all(v.shape == (32,) for v in vectors.values())

    # the same run against local copies gives the same vectors
    cfg_local, _ = config(tmp_path, local, tmp_path / "out", tiny_bert)
    run(cfg_local)
    local_vectors = read_vectors(fsspec.filesystem("file"), str(tmp_path / "out"))
    for k, v in vectors.items():
        np.testing.assert_allclose(v, local_vectors[k], atol=1e-5)
    assert run(cfg)["shards_embedded"] == 0  # etags unchanged: nothing to do


def test_missing_bucket_fails_fast(s3_endpoint, tmp_path, capsys):
    _, path = config(tmp_path, "s3://no-such-bucket-here/corpus/", tmp_path / "out", "unused")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no-such-bucket-here" in err and "AWS_ENDPOINT_URL" in err


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["input.uri={tmp}/nowhere"], "does not exist"),
        (["input.uri={tmp}/empty"], "no input shards found"),
        (["model.name={tmp}/no-model"], "model.name: cannot load"),
        (["model.name=package://not_a_real_model_pkg"], "pip install not-a-real-model-pkg"),
        (["extraction.layers=[7]"], "extraction.layers: 7 is out of range"),
        (["extraction.pooling=avg"], "choose one of 'cls', 'cls_pooler', 'mean', 'max', 'last_token'"),
        (["model.nme=x"], "model.nme: unknown key"),
        (["output.uri=/proc/forbidden/out"], "output.uri: cannot write"),
    ],
)
def test_bad_config_and_input_fail_before_work(tmp_path, capsys, minilm_path, overrides, needle):
    (tmp_path / "empty").mkdir()
    corpus = make_corpus(tmp_path / "in", shards=1, rows=2)
    _, path = config(tmp_path, corpus, tmp_path / "out", minilm_path)
    args = ["--config", str(path)]
    for o in overrides:
        args += ["--set", o.format(tmp=tmp_path)]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "embed_corpus.py"), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw,
    )


def test_kill_then_resume_equals_a_clean_run(ray_local, tmp_path, minilm_path):
    """SIGKILL the whole job (driver and its local Ray) once some shards are committed, re-run,
    and compare row for row with an uninterrupted run."""
    shards, rows = 6, 24
    corpus = make_corpus(tmp_path / "in", shards=shards, rows=rows)
    cfg, path = config(tmp_path, corpus, tmp_path / "out", minilm_path)
    sets = ["--set", "ray.batch_size=8", "--set", "input.rows_per_block=8", "--set", "ray.num_cpus=2"]
    proc = run_cli(["--config", str(path), *sets])
    out = tmp_path / "out"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("*.parquet"))) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(out.glob("*.parquet")))
    assert 1 <= committed < shards

    resumed = run_cli(["--config", str(path), *sets])
    log = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, log[-3000:]
    assert f"embedding {shards - committed} of {shards} shards ({shards - committed} new" in log
    assert f"{committed} already up to date" in log

    clean_cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"uri": str(tmp_path / "clean")})})
    run(clean_cfg)  # uninterrupted, in this process's Ray

    fs = fsspec.filesystem("file")
    got, want = read_vectors(fs, str(out)), read_vectors(fs, str(tmp_path / "clean"))
    assert sorted(got) == sorted(want) and len(got) == shards * rows
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5)
    for name in (p.name for p in (tmp_path / "clean").glob("*.parquet")):
        assert pq.read_table(out / name).column("id").to_pylist() == pq.read_table(tmp_path / "clean" / name).column("id").to_pylist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(e["rows_written"] for e in manifest["shards"]) == shards * rows
    assert not (out / "_staging").exists()
