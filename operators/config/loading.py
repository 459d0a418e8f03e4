"""Loading a configuration: YAML files (bounded in size and in expanded values before anything
expands), `--set dotted.key=value` overrides, renamed keys, validation errors that name the key,
and the credentials it spells registered with the redactor."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from operators.config.schema import DEFAULT_CONFIG, ConfigError, PipelineConfig
from operators.config.secrets import is_secret_key, register_secrets

# renamed keys: (section, old name) -> new name. The old names keep working in YAML and --set.
RENAMED = {("model", "batch_size"): "forward_batch_size", ("ray", "batch_size"): "rows_per_call", ("eval", "data_dir"): "mirror"}


def _new_names(tree: dict) -> dict:
    for (section, old), new in RENAMED.items():
        node = tree.get(section)
        if isinstance(node, dict) and old in node:
            node[new] = node.pop(old)
    return tree


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if len(keys) == 2 and tuple(keys) in RENAMED:
        keys[1] = RENAMED[tuple(keys)]
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value) with the value parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set input.uri=s3://bucket/corpus/")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key such as model.name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # A URI such as s3://b/k parses as a YAML string already; keep plain strings verbatim.
    if isinstance(value, (dict,)) and ":" in raw and not raw.strip().startswith("{"):
        value = raw
    return key, value


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys at `loc` (the parent of an offending key) in the config tree."""
    cls: Any = model
    for part in loc:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return []
    return sorted(cls.model_fields)


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(root)"
        if err["type"] == "extra_forbidden":
            valid = _section_fields(model, loc[:-1])
            lines.append(f"{key}: unknown key; valid keys here: {', '.join(valid)}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required but not set")
        elif err["type"] == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            lines.append(f"{key}: {err['input']!r} is not valid; choose one of {expected}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = err.get("input")
            if isinstance(shown, (str, int, float, bool, list)) or shown is None:
                lines.append(f"{key}: {msg} (got {shown!r})")
            else:
                lines.append(f"{key}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# A config or sweep file is small: a cap on its bytes, and on the values it expands to, so a YAML
# alias bomb (a few lines whose aliases nest into billions of values) fails at once with its cause.
MAX_YAML_BYTES = 4 << 20
MAX_YAML_VALUES_ENV = "CORPUS_EMBED_MAX_YAML_VALUES"


def load_yaml(path: Path) -> Any:
    """A YAML file's tree, refused when the file is over MAX_YAML_BYTES or expands (aliases
    counted as often as they are used) to more values than CORPUS_EMBED_MAX_YAML_VALUES (200,000)."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size} bytes, over the {MAX_YAML_BYTES} a config or sweep file may have")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    cap = int(os.environ.get(MAX_YAML_VALUES_ENV) or 200_000)
    if expanded_values(tree, cap) > cap:
        raise ConfigError(f"{path}: expands to more than {cap} values (YAML aliases used over and over?); "
                          f"the cap is the environment variable {MAX_YAML_VALUES_ENV}")
    return tree


def expanded_values(tree: Any, cap: int) -> int:
    """How many values `tree` holds with every shared (aliased) node counted each time it is used,
    counted without expanding anything and stopping past `cap`; a node that contains itself counts
    as over the cap."""
    memo: dict[int, int] = {}

    def count(node, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in memo:
            return memo[key]
        if depth > 500:
            return cap + 1
        memo[key] = cap + 1  # seen again while counting itself: recursive
        total = 1
        for child in (node.values() if isinstance(node, dict) else node):
            total += count(child, depth + 1)
            if total > cap:
                break
        memo[key] = min(total, cap + 1)
        return memo[key]

    return count(tree, 0)


def read_config_tree(path: Path, _seen: tuple = ()) -> dict:
    """A YAML config as a dict. `extends: other.yaml` (relative to this file) names a base whose
    keys this file overrides: presets extend the default so each is a complete config."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' loops back on itself")
    tree = load_yaml(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (input, output, model, ...)")
    _new_names(tree)
    base = tree.pop("extends", None)
    if base is not None:
        tree = _merge(read_config_tree((path.parent / base), _seen + (path.resolve(),)), tree)
    return tree


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load YAML (the embedded default when `path` is None), apply `--set` overrides, validate."""
    tree = read_config_tree(Path(path) if path is not None else DEFAULT_CONFIG)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    remember_secrets(tree)  # before validation: its error messages quote values too
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, PipelineConfig)) from None


def remember_secrets(tree: Any, key: str = "") -> None:
    """Register with the redactor every credential the config spells (URI userinfo, the values of
    secret-named keys), so an echo of it anywhere (a library's error quoting a bucket name cut at a
    '/') is redacted too."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            remember_secrets(v, str(k))
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            remember_secrets(v, key)
    elif isinstance(tree, str):
        register_secrets(tree, whole=is_secret_key(key))
