"""The output lease: one live run per output, takeover of a dead holder's lease, on local disk and S3."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import fsspec
import pytest

from operators.run.lease import LEASE, LeaseError, acquire_lease, read_lease


def test_second_run_is_refused_while_the_first_lives(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    first = acquire_lease(fs, root, "run-1", ttl=30, settle=0)
    with pytest.raises(LeaseError, match="held by run run-1"):
        acquire_lease(fs, root, "run-2", ttl=30, settle=0)
    first.release()
    assert read_lease(fs, root) is None  # given back
    acquire_lease(fs, root, "run-2", ttl=30, settle=0).release()


def test_an_expired_lease_is_taken_over_and_a_live_one_renewed(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    stale = {"run_id": "dead", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1}
    (tmp_path / "out" / LEASE).write_text(json.dumps(stale))
    lease = acquire_lease(fs, root, "run-3", ttl=0.6, settle=0)
    first = read_lease(fs, root)["expires_at"]
    time.sleep(0.5)
    assert read_lease(fs, root)["expires_at"] > first  # renewed while held
    with pytest.raises(LeaseError):
        acquire_lease(fs, root, "run-4", ttl=0.6, settle=0)
    lease.release()


def test_the_lease_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    code = (
        "import fsspec, os; from operators.run.lease import acquire_lease; "
        f"acquire_lease(fsspec.filesystem('file'), {root!r}, 'killed', ttl=3600, settle=0); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # dies holding a lease good for an hour
    assert read_lease(fs, root)["run_id"] == "killed"
    acquire_lease(fs, root, "next", ttl=30, settle=0).release()


def test_lease_on_s3(s3_bucket):
    fs = fsspec.filesystem("s3")
    root = f"{s3_bucket}/out"
    lease = acquire_lease(fs, root, "s3-run", ttl=30)
    with pytest.raises(LeaseError):
        acquire_lease(fs, root, "other", ttl=30)
    lease.release()
    assert read_lease(fs, root) is None


def test_a_lease_this_process_no_longer_holds_is_taken_over(tmp_path):
    """A run in this process that died without giving its lease back (its rm failed) does not
    block the next run of the same process."""
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    first = acquire_lease(fs, root, "crashed", ttl=3600, settle=0)
    first._stop.set()
    from operators.run import lease as lease_module

    lease_module._HELD.discard("crashed")  # what release() does before its rm, which here "failed"
    assert read_lease(fs, root)["run_id"] == "crashed"
    acquire_lease(fs, root, "next", ttl=30, settle=0).release()


@pytest.mark.parametrize("fields", [
    {"expires_at": float("nan")}, {"expires_at": "tomorrow"}, {"expires_at": None}, {"expires_at": [1]},
    {"expires_at": 1e308 * 10}, {"pid": 10 ** 30, "host": "HOST", "expires_at": 0}, {"pid": "12", "expires_at": 0},
    {"pid": True, "expires_at": 0},
])
def test_a_lease_with_bad_fields_holds_nothing_and_raises_nothing_raw(tmp_path, fields):
    """NaN, strings, infinities, a pid no machine has: such a lease has expired; a run takes the output."""
    import socket

    (tmp_path / "out").mkdir()
    doc = {"run_id": "odd", "host": "elsewhere", "pid": 1, **fields}
    if doc["host"] == "HOST":
        doc["host"] = socket.gethostname()
    (tmp_path / "out" / LEASE).write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them
    acquire_lease(fsspec.filesystem("file"), str(tmp_path / "out"), "run-5", ttl=30, settle=0).release()


def test_a_folder_at_the_lease_path_is_refused_with_a_clear_message(tmp_path):
    (tmp_path / "out" / LEASE).mkdir(parents=True)
    with pytest.raises(LeaseError, match=r"_lease.json is a folder, not this product's lease: move it away"):
        acquire_lease(fsspec.filesystem("file"), str(tmp_path / "out"), "run-6", ttl=30, settle=0)


def test_a_run_taken_over_while_stalled_stops_before_committing(tmp_path):
    """A holder frozen past its TTL and taken over: check() (called before every commit on the
    driver) raises at once, without waiting for the renewal thread to notice."""
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    lease = acquire_lease(fs, root, "frozen", ttl=30, settle=0)
    lease.check()  # holds it
    stale = json.loads((tmp_path / "out" / LEASE).read_text())
    (tmp_path / "out" / LEASE).write_text(json.dumps(dict(stale, run_id="taker")))  # what a takeover writes
    with pytest.raises(LeaseError, match=r"no longer holds the output \(run taker took the lease over"):
        lease.check()
    lease.release()
    assert read_lease(fs, root)["run_id"] == "taker"  # the taker's lease is left alone
