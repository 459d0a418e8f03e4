"""The output lease: one live run per output, takeover of a dead holder's lease, on local disk and S3."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import fsspec
import pytest

from operators.lease import LEASE, LeaseError, acquire_lease, read_lease


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
        "import fsspec, os; from operators.lease import acquire_lease; "
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
    from operators import lease as lease_module

    lease_module._HELD.discard("crashed")  # what release() does before its rm, which here "failed"
    assert read_lease(fs, root)["run_id"] == "crashed"
    acquire_lease(fs, root, "next", ttl=30, settle=0).release()
