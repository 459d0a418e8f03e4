"""Sources: a local mirror read in place, a remote one (S3 on moto) downloaded once into the cache
and re-downloaded when the cached copy is damaged, checksums and revisions checked against the pin
and the mirror's manifest, and errors that name the task, the source and the setting."""

from __future__ import annotations

import gzip
import json
import socket

import pytest

from operators.config.schema import StorageConfig
from operators.evaluation.eval_data import SENTEVAL_FILES
from operators.io.sources import MANIFEST, MIRROR_ENV, SourceError, Sources, fill_mirror, github_file, hub_file, mirror_from, sha256_of
from tests.helpers import make_bench

STSB = hub_file("mteb/stsbenchmark-sts", "b0fddb56ed78048fa8b90373c8a3cfc37b684831", "test.jsonl.gz")


def test_upstream_uris_pin_the_revision():
    assert STSB.upstream == "hf://datasets/mteb/stsbenchmark-sts@b0fddb56ed78048fa8b90373c8a3cfc37b684831/test.jsonl.gz"
    assert STSB.in_mirror == "hf/datasets/mteb/stsbenchmark-sts/test.jsonl.gz"
    mr = SENTEVAL_FILES["mr"][0]
    assert mr.upstream == ("https://raw.githubusercontent.com/robertoviegas/SimCSE/a0d98a537ceffe5f728077dd0930c41171db2d16/"
                           "SentEval/data/downstream/MR/rt-polarity.pos")
    assert mr.in_mirror == "senteval/MR/rt-polarity.pos" and len(mr.sha256) == 64


def test_the_setting_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "/env/mirror")
    assert mirror_from("/cfg/mirror") == "/cfg/mirror" and mirror_from(None) == "/env/mirror"
    monkeypatch.delenv(MIRROR_ENV)
    assert mirror_from(None) is None


def test_a_local_mirror_is_read_in_place_and_checked_against_its_manifest(tmp_path):
    bench = make_bench(tmp_path / "m")
    src = Sources(str(bench), str(tmp_path / "cache"))
    assert src.path(STSB, "STSBenchmark") == str(bench / STSB.in_mirror)
    assert not (tmp_path / "cache").exists()  # nothing copied
    (bench / STSB.in_mirror).write_bytes(gzip.compress(b'{"sentence1": "a", "sentence2": "b", "score": 1}\n'))
    with pytest.raises(SourceError, match=r"STSBenchmark: .*test.jsonl.gz .*has SHA-256 .*expected .*damaged or different"):
        Sources(str(bench), str(tmp_path / "cache")).path(STSB, "STSBenchmark")


def test_a_pinned_github_file_is_checked_without_a_manifest(tmp_path):
    mr = SENTEVAL_FILES["mr"][0]
    (tmp_path / mr.in_mirror).parent.mkdir(parents=True)
    (tmp_path / mr.in_mirror).write_text("not the real MR\n")
    with pytest.raises(SourceError, match=rf"classification/mr: .* expected {mr.sha256}"):
        Sources(str(tmp_path), str(tmp_path / "cache")).path(mr, "classification/mr")


def test_a_revision_mismatch_names_both_revisions(tmp_path):
    bench = make_bench(tmp_path / "m")
    manifest = json.loads((bench / MANIFEST).read_text())
    manifest["files"][STSB.in_mirror]["revision"] = "0" * 40
    (bench / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match=r"STSBenchmark: the mirror .* holds mteb/stsbenchmark-sts:test.jsonl.gz at revision 0{40}, this version pins b0fddb56"):
        Sources(str(bench), str(tmp_path / "cache")).path(STSB, "STSBenchmark")


def test_a_missing_file_names_task_file_and_setting(tmp_path):
    with pytest.raises(SourceError, match=r"STSBenchmark: mteb/stsbenchmark-sts@b0fddb56ed78:test.jsonl.gz is not in the mirror .*eval.mirror \(or CORPUS_EMBED_MIRROR\).*fill_mirror"):
        Sources(str(tmp_path), str(tmp_path / "cache")).path(STSB, "STSBenchmark")


def test_an_s3_mirror_is_downloaded_once_and_healed_when_damaged(tmp_path, s3_bucket, caplog):
    bench = make_bench(tmp_path / "m")
    mirror = f"s3://{s3_bucket}/mirror"
    fill_mirror(Sources(str(bench), str(tmp_path / "c0")), mirror, [("STSBenchmark", STSB)])
    cache = tmp_path / "cache"
    caplog.set_level("INFO")
    path = Sources(mirror, str(cache), StorageConfig()).path(STSB, "STSBenchmark")
    assert path.startswith(str(cache)) and sha256_of(path) == sha256_of(str(bench / STSB.in_mirror))
    assert "downloading mteb/stsbenchmark-sts" in caplog.text
    caplog.clear()
    assert Sources(mirror, str(cache)).path(STSB, "STSBenchmark") == path
    assert "downloading" not in caplog.text  # once
    with open(path, "r+b") as f:  # the cached copy damaged (a crash, a disk fault)
        f.write(b"XX")
    assert sha256_of(Sources(mirror, str(cache)).path(STSB, "STSBenchmark")) == sha256_of(str(bench / STSB.in_mirror))
    assert "damaged or outdated; downloading it again" in caplog.text


def test_an_unreachable_source_names_task_source_and_setting(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    gh = github_file("a/b", "c" * 40, "x.txt", "b/x.txt", "0" * 64)
    with pytest.raises(SourceError, match=r"clustering/x: cannot read a/b@cccccccccccc:x.txt from the mirror http://127.0.0.1:\d+ .*set eval.mirror \(or CORPUS_EMBED_MIRROR\)"):
        Sources(f"http://127.0.0.1:{port}", str(tmp_path)).path(gh, "clustering/x")


def test_fill_mirror_copies_checks_and_records(tmp_path):
    bench = make_bench(tmp_path / "m")
    dest = tmp_path / "filled"
    mr = SENTEVAL_FILES["mr"]
    entries = fill_mirror(Sources(str(bench), str(tmp_path / "c")), str(dest), [("STSBenchmark", STSB), ("classification/mr", mr[0])])
    assert (dest / STSB.in_mirror).read_bytes() == (bench / STSB.in_mirror).read_bytes()
    manifest = json.loads((dest / MANIFEST).read_text())["files"]
    assert manifest == entries and manifest[STSB.in_mirror]["revision"] == STSB.revision
    assert manifest[mr[0].in_mirror]["source"] == mr[0].upstream
    assert Sources(str(dest), str(tmp_path / "c")).path(STSB, "STSBenchmark") == str(dest / STSB.in_mirror)


def test_without_a_mirror_and_offline_the_error_says_so(tmp_path, monkeypatch):
    """No mirror set, the Hub not asked (HF_HUB_OFFLINE, as in these tests): the error names the
    upstream, the setting and the offline mode, before anything is embedded."""
    from operators.evaluation.eval_data import first_present

    monkeypatch.delenv(MIRROR_ENV, raising=False)
    src = Sources(mirror_from(None), str(tmp_path))
    with pytest.raises(SourceError, match=r"STSBenchmark: cannot reach the upstream source \(no eval.mirror \(or CORPUS_EMBED_MIRROR\) set\) "
                       r"for mteb/stsbenchmark-sts@b0fddb56ed78:test.jsonl.gz \(HF_HUB_OFFLINE is set: the Hub is not asked\)"):
        first_present(src, STSB.repo, STSB.revision, ["test.jsonl.gz"], "STSBenchmark")
