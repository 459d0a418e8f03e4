"""Storage helpers against hostile names and URIs: confined paths, bounded output names, symlinked
inputs, shards whose names redaction must not merge, rows that name a shard without its credentials."""

from __future__ import annotations

import os
import time

import pytest

from operators.config.schema import InputConfig, StorageConfig
from operators.config.secrets import redact_text
from operators.io.storage import InputError, Shard, UnsafePathError, confined_path, list_shards
from tests.helpers import write_jsonl


@pytest.mark.parametrize(
    "rel",
    ["../x.pth", "a/../../x", "/etc/passwd", "a/./../../b", "..", "", "a\\..\\..\\b", "c:/x", "a\x00b"],
)
def test_confined_path_refuses_names_that_leave_the_folder(tmp_path, rel):
    with pytest.raises(UnsafePathError):
        confined_path(tmp_path / "dest", rel)


def test_confined_path_refuses_a_symlink_out_of_the_folder(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="outside"):
        confined_path(dest, "link/escape.txt")
    assert confined_path(dest, "sub/model.safetensors") == dest / "sub" / "model.safetensors"
    assert confined_path(dest, "a..b/c...txt") == dest / "a..b" / "c...txt"  # dots inside names are fine


def test_output_names_stay_under_the_filesystem_limit(tmp_path):
    long = "é" * 200 + ".jsonl"  # 406 bytes of UTF-8
    a = Shard(uri="x", rel=long, format="jsonl", compression=None, fingerprint={})
    b = Shard(uri="x", rel="é" * 200 + "x.jsonl", format="jsonl", compression=None, fingerprint={})
    assert len(a.output_name.encode()) <= 200 and a.output_name != b.output_name
    (tmp_path / a.output_name).write_text("")  # a real filesystem takes it
    short = Shard(uri="x", rel="dir/part-0.jsonl", format="jsonl", compression=None, fingerprint={})
    assert short.output_name.startswith("dir__part-0.jsonl-")  # short names are as before


def test_symlinked_folders_and_files_are_listed_and_fingerprinted_by_target(tmp_path):
    real = tmp_path / "real"
    write_jsonl(real / "a.jsonl", [{"text": "x"}])
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "own.jsonl", [{"text": "y"}])
    (corpus / "linked").symlink_to(real, target_is_directory=True)
    (corpus / "b.jsonl").symlink_to(real / "a.jsonl")
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)  # a loop ends
    storage = StorageConfig()
    shards = {s.rel: s for s in list_shards(str(corpus), "auto", storage)}
    assert set(shards) == {"b.jsonl", "linked/a.jsonl", "own.jsonl"}
    before = shards["b.jsonl"].fingerprint
    time.sleep(0.01)
    write_jsonl(real / "a.jsonl", [{"text": "edited through the link"}])
    after = {s.rel: s for s in list_shards(str(corpus), "auto", storage)}["b.jsonl"].fingerprint
    assert after != before and after["size"] == os.path.getsize(real / "a.jsonl")


def test_redaction_leaves_path_segments_and_shards_never_show_as_one(tmp_path):
    """'token=alpha' as a folder is a Hive-style partition, not a credential; a query's token is."""
    assert redact_text("s3://b/corpus/token=alpha/part-0.jsonl") == "s3://b/corpus/token=alpha/part-0.jsonl"
    assert redact_text("https://h/x.jsonl?token=abc123&sig=zz") == "https://h/x.jsonl?token=***&sig=***"
    for part in ("alpha", "beta"):
        write_jsonl(tmp_path / "in" / f"token={part}" / "part-0.jsonl", [{"text": "x"}])
    shards = list_shards(str(tmp_path / "in"), "auto", StorageConfig())
    assert len({s.public_uri for s in shards}) == 2
    from operators.config.secrets import register_secrets

    register_secrets("s3://someone:token=alpha/longsecretpiece@bucket/")  # registered for messages, never for identity
    assert {s.public_uri for s in shards} == {s.public_uri for s in list_shards(str(tmp_path / "in"), "auto", StorageConfig())}
    assert all("***" not in s.public_uri for s in shards) and "***" in redact_text("echo token=alpha/longsecretpiece")
    write_jsonl(tmp_path / "in2" / "part-0.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "in2" / "part-0.jsonl?sig=abc", [{"text": "x"}])  # a name that redacts
    write_jsonl(tmp_path / "in2" / "part-0.jsonl?sig=xyz", [{"text": "x"}])  # ... to the same as this one
    with pytest.raises(InputError, match=r"both show as .*part-0.jsonl\?sig=\*\*\* once credentials are redacted"):
        list_shards(str(tmp_path / "in2" / "*"), "jsonl", StorageConfig())


def test_reader_rows_name_the_shard_without_its_credentials(tmp_path):
    from operators.io.readers import read_shard

    path = write_jsonl(tmp_path / "x.jsonl", [{"text": None}])
    (shard,) = list_shards(str(path), "auto", StorageConfig())
    hostile = Shard(uri="file://user:hunter2pass@" + str(path), rel=shard.rel, format="jsonl", compression=None, fingerprint={})
    assert "hunter2pass" not in hostile.public_uri
    rows = [r for b in read_shard(hostile, InputConfig(uri=str(path))) for r in b.to_pylist()]
    assert rows and not any("hunter2pass" in str(v) for r in rows for v in r.values())


def test_reading_parquet_leaves_no_thread_that_aborts_the_process_at_exit(tmp_path):
    """Arrow's threaded decode over a Python file object aborted about one interpreter exit in
    four (exit 134, "terminate called without an active exception"), after work that had
    succeeded, through pq.read_table, ParquetFile.read and read_row_group alike: a driver that
    read vector files (the LanceDB sink, the benchmark's checks) failed its job. The same reads
    through storage.read_parquet, in sixteen fresh interpreters, all exit 0 (the old read failed
    16 of 60, so this catches it with probability ~0.99)."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(5):
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(20_000 if i == 4 else 1)]}), tmp_path / f"part-{i}.parquet")
    code = (
        "import fsspec, sys; from operators.io.storage import read_parquet; fs = fsspec.filesystem('file'); "
        "[read_parquet(fs, p, columns=['id']).column('id').to_pylist() for p in sorted(fs.glob(sys.argv[1] + '/*.parquet'))]"
    )
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stderr=subprocess.PIPE) for _ in range(16)]
    results = [(p.wait(), p.stderr.read().decode()) for p in runs]
    assert all(rc == 0 for rc, _ in results), results
