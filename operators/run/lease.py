"""One run per output at a time: a lease file with an expiry, renewed while the run works.

`<output.uri>/_lease.json` names the run that holds the output, its host and pid, and when the
lease expires. A run takes the lease before it writes anything (staging, shards, manifest, report)
and gives it back at the end. A second run finds a live lease and stops before any work (exit 2).
A lease whose holder died is taken over: once it has expired (the holder renews it every
`ttl / 3` seconds while it lives), or at once when the holder ran on this host and its process is
gone. Object stores have no compare-and-swap that fsspec exposes everywhere, so the taker writes
its lease, waits a moment and reads it back: of two runs racing for a free output, the one whose
write landed last holds it and the other stops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import socket
import threading
import time
from dataclasses import dataclass, field

from operators.io.storage import write_text_atomic

LEASE = "_lease.json"
logger = logging.getLogger("corpus_embed")
_HELD: set[str] = set()  # run ids whose leases this process holds now


class LeaseError(RuntimeError):
    """Another live run holds the output."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # gone, or no pid this machine can have
        return False
    except PermissionError:
        return True
    return True


def read_lease(fs, root: str) -> dict | None:
    """The lease, or None when there is none or it holds nothing (cut short, not a JSON object)."""
    path = posixpath.join(root, LEASE)
    try:
        with fs.open(path, "rb") as f:
            lease = json.loads(f.read())
        return lease if isinstance(lease, dict) and "run_id" in lease else None
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise LeaseError(f"{path} is a folder, not this product's lease: move it away (nothing was started)") from None
    except (ValueError, UnicodeDecodeError):
        return None  # a lease cut short by a dying writer holds nothing


def expires_at(lease: dict) -> float:
    """When the lease expires; a value that is not a finite number (NaN, a string) has expired."""
    value = lease.get("expires_at")
    try:
        t = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError, OverflowError):
        return float("-inf")
    return t if math.isfinite(t) else float("-inf")


def holder_alive(lease: dict, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if expires_at(lease) <= now:
        return False
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int) and not isinstance(lease.get("pid"), bool):
        if lease["pid"] == os.getpid():  # this process: live only while one of its runs holds it
            return lease.get("run_id") in _HELD
        return _pid_alive(lease["pid"])
    return True


@dataclass
class Lease:
    fs: object
    root: str
    run_id: str
    ttl: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    lost: str | None = None  # set when another run took the lease over while this one held it

    @property
    def path(self) -> str:
        return posixpath.join(self.root, LEASE)

    def _doc(self) -> dict:
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "acquired_at": time.time(), "expires_at": time.time() + self.ttl}

    def _write(self) -> None:
        write_text_atomic(self.fs, self.path, json.dumps(self._doc()))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            current = read_lease(self.fs, self.root)
            if current is not None and current.get("run_id") != self.run_id:
                self.lost = f"run {current['run_id']} took the lease over"
                return
            try:
                self._write()
            except Exception:  # a missed renewal is retried; the lease lasts ttl
                pass

    def check(self) -> None:
        """Raise LeaseError when this run no longer holds the output: read the lease now (a run that
        stalled past its TTL may not have seen the takeover yet). Called before every commit."""
        if self.lost is None:
            current = read_lease(self.fs, self.root)
            if current is None or current.get("run_id") != self.run_id:
                self.lost = f"run {current['run_id']} took the lease over" if current else "the lease file is gone"
        if self.lost:
            raise LeaseError(f"{self.path}: this run no longer holds the output ({self.lost}, after it stalled past "
                             "output.lease_seconds); it stops before committing anything more")

    def release(self, attempts: int = 3) -> None:
        self._stop.set()
        _HELD.discard(self.run_id)
        if self._thread is not None:
            self._thread.join(timeout=5)
        for attempt in range(attempts):
            try:
                current = read_lease(self.fs, self.root)
                if current is not None and current.get("run_id") == self.run_id:
                    self.fs.rm(self.path)
                return
            except FileNotFoundError:
                return
            except Exception as e:  # never hide the run's outcome: the lease then expires by itself
                if attempt == attempts - 1:
                    logger.warning("could not give back the lease %s (%s: %s); it expires in %.0f s",
                                   self.path, type(e).__name__, e, self.ttl)
                else:
                    time.sleep(0.2 * (attempt + 1))

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_lease(fs, root: str, run_id: str, ttl: float, settle: float = 0.2) -> Lease:
    """Take the output's lease for `run_id` or raise LeaseError naming the live holder."""
    held = read_lease(fs, root)
    if held is not None and held.get("run_id") != run_id and holder_alive(held):
        raise LeaseError(_busy(root, held))
    lease = Lease(fs, root, run_id, ttl)
    _HELD.add(run_id)
    try:
        fs.makedirs(root, exist_ok=True)
        lease._write()
        time.sleep(settle)
        now = read_lease(fs, root)
    except BaseException:
        lease.release()  # a lease half taken is given back
        raise
    if now is None or now.get("run_id") != run_id:
        _HELD.discard(run_id)
        raise LeaseError(_busy(root, now or {"run_id": "?"}))
    lease._thread = threading.Thread(target=lease._renew, name="corpus-embed-lease", daemon=True)
    lease._thread.start()
    return lease


def _busy(root: str, held: dict) -> str:
    left = max(0.0, expires_at(held) - time.time())
    return (
        f"output {root} is held by run {held.get('run_id')} (host {held.get('host')}, pid {held.get('pid')}) "
        f"for {left:.0f} s more: wait for it to finish. If that run is dead on another host, its lease expires "
        f"by itself; to take over now, delete {posixpath.join(root, LEASE)}"
    )
