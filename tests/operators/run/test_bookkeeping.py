"""The run record without Ray: counts summed from the commits, the manifest merge, the report
(the same keys and numbers as the counts), the summary line, the local fallback, what an
incomplete run says."""

from __future__ import annotations

import json

import fsspec
import pytest

from operators.config.loading import load_config
from operators.io import cache
from operators.io.manifest import load_manifest, read_provenance
from operators.io.writers import IncompleteShardError, RunStopped, WriteOutcome
from operators.model.prepare import prepare
from operators.run.bookkeeping import RunRecord, incomplete_message, record_outputs, write_run_report
from operators.run.planning import plan_run
from tests.helpers import commit_in_process, make_corpus, write_jsonl


@pytest.fixture
def run_of(tmp_path):
    folder = make_corpus(tmp_path / "in", shards=2, rows=12)
    write_jsonl(folder / "part-bad.jsonl", [{"id": "x", "text": "fine"}, {"id": "y", "text": None}, "not json"])
    cfg = load_config(None, [f"input.uri={folder}", f"output.uri={tmp_path / 'out'}"])
    prepared = prepare(cfg)
    plan = plan_run(cfg, prepared)
    return cfg, prepared, plan, commit_in_process(cfg, prepared, plan)


def test_counts_report_and_summary_line_agree_with_the_commits(run_of, tmp_path):
    cfg, prepared, plan, outcome = run_of
    record = RunRecord.begin(cfg)
    record.planned(plan, prepared)
    entries = record_outputs(cfg, plan, outcome, record)
    c = record.counts
    assert (c.shards_total, c.shards_new, c.shards_embedded) == (3, 3, 3)
    assert (c.rows_in, c.rows_written, c.rows_rejected) == (27, 25, 2) and c.rows_in == c.rows_written + c.rows_rejected
    assert c.tokens == sum(s["tokens"] for s in outcome.committed.values()) and 0 < c.padding_efficiency <= 1
    manifest = load_manifest(fsspec.filesystem("file"), str(tmp_path / "out"))
    assert manifest.entries == entries and set(entries) == {s.rel for s in plan.shards}
    record.seconds = 2.0
    report = record.to_report()
    assert report["counts"]["rows_embedded"] == 25 and report["counts"]["shards_unchanged"] == 0
    assert list(report["counts"]) == ["shards_total", "shards_new", "shards_changed", "shards_unchanged", "shards_deleted",
                                      "rows_in", "rows_embedded", "rows_reused", "rows_rejected", "rows_truncated",
                                      "rows_deleted", "rows_duplicate", "tokens", "rejected_by_reason"]
    # rejections counted by reason, per shard (manifest entry, footer), in the manifest and in the report
    by_reason = {"malformed JSON": 1, "null text": 1}
    assert report["counts"]["rejected_by_reason"] == by_reason
    assert entries["part-bad.jsonl"]["rejected_reasons"] == by_reason
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["rejected_by_reason"] == by_reason
    assert read_provenance(fsspec.filesystem("file"), str(tmp_path / "out" / entries["part-bad.jsonl"]["output"]))["counts"]["rejected_reasons"] == by_reason
    assert report["throughput"]["rows_per_s"] == pytest.approx(12.5)
    assert record.summary_line().startswith("done: 25 rows written, 2 rejected, 0 truncated from 27 rows in 3 shards (0 up to date) in 2.0s: 12.5 rows/s")
    again = RunRecord.begin(cfg)
    again.planned(plan_run(cfg, prepared), prepared)
    again.seconds = 1.0
    assert again.summary_line() == f"nothing to do: all 3 shards are up to date in 1.0s -> {tmp_path / 'out'}"


def test_an_incomplete_write_records_what_was_committed_then_raises(run_of, tmp_path):
    cfg, prepared, plan, outcome = run_of
    lost = sorted(outcome.committed)[0]
    outcome.committed.pop(lost)
    outcome.pending[lost] = {"rows_staged": 4, "rows_expected": 12}
    outcome.error = RunStopped("ActorDiedError: the actor died")
    record = RunRecord.begin(cfg)
    with pytest.raises(IncompleteShardError, match="2 of 3 shards committed") as err:
        record_outputs(cfg, plan, outcome, record)
    assert "4 of 12 records staged" in str(err.value) and "the run stopped early: ActorDiedError" in str(err.value)
    assert len(load_manifest(fsspec.filesystem("file"), str(tmp_path / "out")).entries) == 2  # what was committed stands
    assert record.counts.shards_embedded == 2


def test_a_report_the_output_refuses_is_kept_locally(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CACHE_DIR", tmp_path / "cache")
    cfg = load_config(None, [f"output.uri={tmp_path / 'out'}"])
    record = RunRecord.begin(cfg)
    (tmp_path / "ro").write_text("a file where the output's folder would go")
    write_run_report(record, fsspec.filesystem("file"), str(tmp_path / "ro"))
    assert json.loads((tmp_path / "cache" / "runs" / f"{record.run_id}.json").read_text())["run_id"] == record.run_id
    assert record.report_path and record.report["status"] == "running"


def test_the_incomplete_message_lists_at_most_twenty_shards():
    outcome = WriteOutcome(failed={f"s3://b/{i:03d}": "commit failed" for i in range(25)})
    text = incomplete_message(outcome, 25)
    assert text.startswith("0 of 25 shards committed") and "... and 5 more" in text and text.count("commit failed") == 20


def test_a_full_disk_keeps_the_commits_in_the_record_and_leaves_no_scratch(tmp_path):
    """The output on a real filesystem that fills up (a 1 MiB tmpfs): the shards committed, then no
    space for the manifest. The error names the commits and the cause, the record holds the
    committed shards, no empty '.manifest.json.*.tmp' is left, and a run with space finishes."""
    import shutil
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (CI and the development machines run as root)")
    try:
        folder = make_corpus(tmp_path / "in", shards=4, rows=12)
        cfg = load_config(None, [f"input.uri={folder}", f"output.uri={out}"])
        prepared = prepare(cfg)
        plan = plan_run(cfg, prepared)
        outcome = commit_in_process(cfg, prepared, plan)
        try:  # the rest of the disk taken
            with open(out / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError:
            pass
        record = RunRecord.begin(cfg)
        with pytest.raises(IncompleteShardError, match=r"(?s)4 of 4 shards committed .*manifest and deletions could not be written "
                                                       r"\(OSError: \[Errno 28\] No space left on device\)"):
            record_outputs(cfg, plan, outcome, record)
        assert len(record.committed_shards) == 4 and record.counts.shards_embedded == 4
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        (out / "filler").unlink()
        entries = record_outputs(cfg, plan_run(cfg, prepared), commit_in_process(cfg, prepared, plan_run(cfg, prepared)), RunRecord.begin(cfg))
        assert len(entries) == 4
    finally:
        subprocess.run(["umount", str(out)], check=False)
        shutil.rmtree(out, ignore_errors=True)
