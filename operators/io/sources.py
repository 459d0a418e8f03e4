"""Where the evaluation data and the fit corpora come from: public sources named and pinned here,
read through fsspec from the source itself, from a mirror laid out like the sources, or from the
local cache they are downloaded into once.

    upstream   hf://datasets/<repo>@<revision>/<file>        (the Hugging Face Hub, HfFileSystem)
               https://raw.githubusercontent.com/<repo>/<commit>/<file>   (a GitHub repository)
    mirror     <mirror>/hf/datasets/<repo>/<file>             (any local path or fsspec URI: s3://...)
               <mirror>/<folder>/<file>                      (GitHub files: the table in MIRROR_LAYOUT)

The mirror is `eval.mirror`, else the environment variable CORPUS_EMBED_MIRROR; with neither, the
upstream. A local mirror is read in place; anything remote is downloaded once into
`<cache>/sources/` (with progress), checked, and read from there. A GitHub file is checked
against the SHA-256 pinned here; a mirror that `pipelines/fill_mirror.py` filled carries
MIRROR.json (each file's source, revision and SHA-256), and its files are checked against it.
A missing file, an unreachable source, a checksum or revision mismatch: SourceError, naming the
task, the source and the setting, before anything is embedded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import fsspec

from operators.config.schema import StorageConfig
from operators.config.secrets import redact_text
from operators.io.storage import protocol_of

log = logging.getLogger("corpus_embed.sources")

MIRROR_ENV = "CORPUS_EMBED_MIRROR"
MIRROR_SETTING = f"eval.mirror (or {MIRROR_ENV})"
MANIFEST = "MIRROR.json"
GITHUB_RAW = "https://raw.githubusercontent.com"
CHUNK = 1 << 20


class SourceError(ValueError):
    """A source that cannot be read or does not check out; the message names task, source and setting."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a public source, pinned to a revision."""

    kind: str  # "hub" (a Hugging Face dataset repo) or "github"
    repo: str  # mteb/sts12-sts, jacoxu/StackOverflow
    revision: str  # a commit SHA
    path: str  # the file's path in the repo
    mirror_path: str = ""  # GitHub files: where a mirror holds it; hub files: hf/datasets/<repo>/<path>
    sha256: str | None = None  # pinned content (GitHub files; a hub commit pins the content itself)

    @property
    def upstream(self) -> str:
        if self.kind == "hub":
            return f"hf://datasets/{self.repo}@{self.revision}/{self.path}"
        return f"{GITHUB_RAW}/{self.repo}/{self.revision}/{self.path}"

    @property
    def in_mirror(self) -> str:
        return self.mirror_path or f"hf/datasets/{self.repo}/{self.path}"

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.revision[:12]}:{self.path}"


def hub_file(repo: str, revision: str, path: str) -> SourceFile:
    return SourceFile("hub", repo, revision, path)


def github_file(repo: str, commit: str, path: str, mirror_path: str, sha256: str) -> SourceFile:
    return SourceFile("github", repo, commit, path, mirror_path, sha256)


def mirror_from(setting: str | None) -> str | None:
    """The mirror in force: the config's setting, else the environment variable, else none."""
    return setting or os.environ.get(MIRROR_ENV) or None


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return str(Path(uri.removeprefix("file://")).expanduser())


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class Sources:
    """Local paths of source files: the mirror's (local), or the cache's (downloaded once)."""

    def __init__(self, mirror: str | None, cache_dir: str, storage: StorageConfig | None = None):
        self.mirror = mirror.rstrip("/") if mirror else None
        self.cache_dir = cache_dir
        self.storage = storage or StorageConfig()
        self._manifest: dict | None = None
        self._checked: dict[str, str] = {}

    @property
    def where(self) -> str:
        return f"the mirror {redact_text(self.mirror)} ({MIRROR_SETTING})" if self.mirror else f"the upstream source (no {MIRROR_SETTING} set)"

    def location(self, f: SourceFile) -> str:
        return posixpath.join(self.mirror, f.in_mirror) if self.mirror else f.upstream

    def manifest(self) -> dict:
        """The mirror's MIRROR.json (empty when it has none, as a hand-laid mirror)."""
        if self._manifest is None:
            self._manifest = {}
            if self.mirror:
                uri = posixpath.join(self.mirror, MANIFEST)
                try:
                    with fsspec.open(uri, "rt", **self._options(uri)) as fh:
                        self._manifest = json.load(fh).get("files", {})
                except FileNotFoundError:
                    pass
                except (ValueError, AttributeError) as e:
                    raise SourceError(f"{redact_text(uri)}: not a mirror manifest ({e}); refill it with pipelines/fill_mirror.py") from e
                except OSError as e:
                    raise SourceError(f"{self.where} is unreachable: {redact_text(str(e))}") from e
        return self._manifest

    def expected(self, f: SourceFile, task: str) -> str | None:
        """The SHA-256 the file must have: the mirror manifest's entry, else the pin."""
        entry = self.manifest().get(f.in_mirror) if self.mirror else None
        if entry:
            if entry.get("revision") not in (None, f.revision):
                raise SourceError(
                    f"{task}: {self.where} holds {f.repo}:{f.path} at revision {entry['revision']}, this version "
                    f"pins {f.revision}; refill the mirror (python pipelines/fill_mirror.py --mirror {redact_text(self.mirror)})")
            return entry.get("sha256")
        return f.sha256

    def path(self, f: SourceFile, task: str) -> str:
        """A local path holding the checked content of `f`."""
        key = f"{task}|{f.label}"
        if key in self._checked:
            return self._checked[key]
        want = self.expected(f, task)
        uri = self.location(f)
        if is_local(uri):
            path = local_path(uri)
            if not os.path.isfile(path):
                raise SourceError(f"{task}: {f.label} is not in {self.where}: no file {path}. "
                                  f"Fill it with: python pipelines/fill_mirror.py --mirror {redact_text(self.mirror)}")
            digest = sha256_of(path) if want else None
            if want and digest != want:
                raise SourceError(f"{task}: {path} ({f.label}, from {self.where}) has SHA-256 {digest}, "
                                  f"expected {want}: a damaged or different file; refill the mirror")
        else:
            path = self._download(f, uri, want, task)  # checked as it is downloaded, or its cached copy checked
        self._checked[key] = path
        return path

    def _options(self, uri: str) -> dict:
        return self.storage.fsspec_options(protocol_of(uri))

    def _download(self, f: SourceFile, uri: str, want: str | None, task: str) -> str:
        """Download `uri` once into the cache (kept with its SHA-256 beside it) and return the path."""
        dest = Path(self.cache_dir) / "sources" / f.kind / f.repo / f.revision / f.path
        mark = dest.with_name(dest.name + ".sha256")
        if dest.is_file() and mark.is_file():
            recorded = mark.read_text().strip()
            if recorded == sha256_of(str(dest)) and (want is None or recorded == want):
                return str(dest)
            log.warning("%s: the cached copy of %s is damaged or outdated; downloading it again", task, f.label)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            fs, path = fsspec.core.url_to_fs(uri, **self._options(uri))
            size = fs.size(path) or 0
            log.info("%s: downloading %s (%.1f MB) from %s into %s", task, f.label, size / 1e6, redact_text(uri), dest.parent)
            done, shown = 0, 0
            with fs.open(path, "rb") as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(CHUNK), b""):
                    out.write(block)
                    done += len(block)
                    if size and done - shown >= max(size // 10, 4 * CHUNK):
                        shown = done
                        log.info("%s: %s %d%%", task, f.path, 100 * done // size)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            why = network_error(e)
            if why is None:
                raise SourceError(f"{task}: {f.label} not found at {redact_text(uri)} ({self.where})") from e
            raise self._unreachable(task, f"cannot read {f.label} from {self.where} at {redact_text(uri)}", why) from e
        digest = sha256_of(str(tmp))
        if want and digest != want:
            tmp.unlink(missing_ok=True)
            raise SourceError(f"{task}: {f.label} from {self.where} has SHA-256 {digest}, expected {want}")
        os.replace(tmp, dest)
        mark.write_text(digest + "\n")
        return str(dest)

    def exists(self, f: SourceFile, task: str) -> bool:
        """Whether the source (or the mirror) has the file, without reading it; SourceError when
        the source cannot be reached."""
        uri = self.location(f)
        if is_local(uri):
            return os.path.isfile(local_path(uri))
        try:
            fs, path = fsspec.core.url_to_fs(uri, **self._options(uri))
            return fs.info(path).get("type") != "directory"
        except Exception as e:
            why = network_error(e)
            if why is None:
                return False
            offline = " (HF_HUB_OFFLINE is set: the Hub is not asked)" if uri.startswith("hf://") and os.environ.get("HF_HUB_OFFLINE") else ""
            raise self._unreachable(task, f"cannot reach {self.where} for {f.label}{offline}", why) from e

    @staticmethod
    def _unreachable(task: str, what: str, why: BaseException) -> SourceError:
        return SourceError(f"{task}: {what}: {type(why).__name__}: {redact_text(str(why))[:300]}. Without network access, "
                           f"set {MIRROR_SETTING} to a mirror (python pipelines/fill_mirror.py fills one)")


def network_error(e: BaseException) -> BaseException | None:
    """What kept a source from answering (network, credentials, an unknown protocol), or None when
    `e` says the file is simply not there. fsspec's HTTP filesystem reports a refused connection as
    FileNotFoundError, its cause an OSError."""
    if isinstance(e, FileNotFoundError):
        cause = e.__cause__ or e.__context__
        return cause if isinstance(cause, OSError) else None
    return e


def fill_mirror(sources: Sources, dest: str, files: list[tuple[str, SourceFile]], storage: StorageConfig | None = None, log_fn=log.info) -> dict:
    """Copy each (task, file) from `sources` (the upstream, or another mirror) to the mirror
    `dest` (local path or fsspec URI) at its mirror path, checked as it is read, and merge their
    source, revision and SHA-256 into dest's MIRROR.json. Returns the manifest's files."""
    storage = storage or StorageConfig()
    fs, root = fsspec.core.url_to_fs(dest, **storage.fsspec_options(protocol_of(dest)))
    manifest_path = posixpath.join(root, MANIFEST)
    entries: dict = {}
    if fs.exists(manifest_path):
        with fs.open(manifest_path, "rt") as fh:
            entries = json.load(fh).get("files", {})
    for task, f in files:
        local = sources.path(f, task)
        target = posixpath.join(root, f.in_mirror)
        digest = sha256_of(local)
        if entries.get(f.in_mirror, {}).get("sha256") == digest and fs.exists(target):
            continue
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.put_file(local, target)
        entries[f.in_mirror] = {"source": f.upstream, "repo": f.repo, "revision": f.revision, "path": f.path,
                                "sha256": digest, "bytes": os.path.getsize(local)}
        log_fn("%s: %s -> %s", task, f.label, redact_text(posixpath.join(dest, f.in_mirror)))
    tmp = manifest_path + ".tmp"
    with fs.open(tmp, "wt") as fh:
        json.dump({"files": dict(sorted(entries.items()))}, fh, indent=1)
    fs.mv(tmp, manifest_path)
    return entries


# -- named fit corpora (whitening.corpus, model.calibration_corpus) -------------------------------

# Wikitext, the held-out text whitening is fitted on: Salesforce/wikitext at a commit
WIKITEXT = ("Salesforce/wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3")
WIKITEXT_FILES = {
    "wikitext-2-raw-v1": {"train": 1, "validation": 1, "test": 1},
    "wikitext-103-raw-v1": {"train": 2, "validation": 1, "test": 1},
}
CORPUS_ALIASES = {"wikitext-2": "wikitext-2-raw-v1/validation", "wikitext-103": "wikitext-103-raw-v1/validation"}


def corpus_files(name: str) -> list[SourceFile] | None:
    """The source files of a named fit corpus ('wikitext-2-raw-v1/validation', 'wikitext-2'), or None."""
    name = CORPUS_ALIASES.get(name, name)
    config, _, split = name.partition("/")
    shards = WIKITEXT_FILES.get(config, {}).get(split or "validation")
    if not shards:
        return None
    return [hub_file(*WIKITEXT, f"{config}/{split or 'validation'}-{i:05d}-of-{shards:05d}.parquet") for i in range(shards)]


CORPUS_NAMES = (*CORPUS_ALIASES, *[f"{c}/{s}" for c, splits in WIKITEXT_FILES.items() for s in splits])
