"""The local cache (CORPUS_EMBED_CACHE, default ~/.cache/corpus-embed): models copied from object
storage, exported engines, downloaded sources, gate vectors. Entries are built once per node under a
file lock and checked on every use against the checksums recorded when they were built.

Read `cache.CACHE_DIR` at call time (tests and tools point it elsewhere)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

CACHE_DIR = Path(os.environ.get("CORPUS_EMBED_CACHE", Path.home() / ".cache" / "corpus-embed"))


def build_once(dest: Path, build) -> Path:
    """`dest`, built by `build(folder)` into a scratch folder and moved into place by the first
    process on this node that asks; the others wait on a file lock and reuse it. The `.complete`
    mark records every file's size, mtime and SHA-256; an entry is checked when used (a file whose
    size or mtime moved is hashed) and rebuilt when damaged, incomplete (a builder that died: no
    mark) or of an older layout. A dead builder's scratch folder is cleared."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        damage = cache_damage(dest)
        if damage:
            if dest.exists():
                logging.getLogger("corpus_embed.cache").warning("%s: %s; rebuilding it", dest, damage)
                shutil.rmtree(dest)
            tmp = Path(str(dest) + ".partial")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            build(tmp)
            (tmp / ".complete").write_text(json.dumps({"files": _cache_manifest(tmp)}))
            os.replace(tmp, dest)
    return dest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_manifest(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ".complete":
            st = p.stat()
            out[str(p.relative_to(folder))] = [st.st_size, st.st_mtime_ns, _file_sha256(p)]
    return out


def cache_damage(dest: Path) -> str | None:
    """Why a cache entry cannot be used as it is, or None when it is intact."""
    mark = dest / ".complete"
    if not mark.is_file():
        return "no .complete mark (a build that did not finish)" if dest.exists() else "not built"
    try:
        files = json.loads(mark.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "an older cache layout without checksums"
    for rel, (size, mtime, sha) in files.items():
        p = dest / rel
        if not p.is_file():
            return f"{rel} is missing"
        st = p.stat()
        if (st.st_size, st.st_mtime_ns) != (size, mtime) and (st.st_size != size or _file_sha256(p) != sha):
            return f"{rel} is damaged ({st.st_size} bytes, built with {size})"
    return None
