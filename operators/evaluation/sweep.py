"""Sweeps: many ways of reading a sentence embedding out of one model, scored in about the time
of one. No Ray and no torch here: `run_sweep` takes the embedding function.

A sweep file names a base config and what to vary:

    base: ../models/all-minilm-l6-v2.yaml        # a config path (relative to this file), a mapping
                                                  # (with `extends: path` if it builds on one); none: the default
    set:                                          # overrides for every variant
      eval.tasks: [STSBenchmark, SICK-R, SciFact]
      whitening.corpus: wikitext-2               # a named corpus, or a path / glob / URI of raw text
    rank_by: SciFact                              # a task (MTEB's name or ours), sts/avg (the seven STS tasks), or mean (of all)
    axes:                                         # the cross product of these ...
      extraction.layers: [[-1], [1, -1], [0]]
      extraction.pooling: [mean, cls]
      postprocess: [[], [whiten], [{whiten: 128}], [{remove_top_pcs: 1}]]
    variants:                                     # ... and/or a listed set of override mappings
      - {model.init: random, extraction.layers: [0]}

`postprocess` items are the config's steps, and `{whiten: K}` is whitening to K dimensions.

The plan: every variant is a full config, validated before any work. Variants that share a model
and the text it reads (template, instruction, demonstrations: everything but pooling, layers,
exclude_special_tokens and normalize; `forward_key`) form one group, and each group is one pass:
its actors run each batch through the model once and pool it by every head the group's variants
need (`pooling.Head`). The same pass covers the whitening corpus when a variant post-processes:
per head, the mergeable moments of its raw vectors (O(d^2) on the driver, whatever the corpus),
from which every whitening k and every ABTT D is one eigendecomposition away. Post-processing
and scoring run on the driver, per variant, on the cached raw vectors.

Outputs: results.json and results.md (ranked by `rank_by`), results.png, and best/config.yaml,
the winner as a config the corpus pipeline runs as it is (with its whitening artifact in best/).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import posixpath
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from operators.config.loading import _merge, _set_dotted, format_validation_error, load_yaml, read_config_tree
from operators.config.schema import DEFAULT_CONFIG, ConfigError, PipelineConfig, fingerprint
from operators.config.secrets import redact
from operators.evaluation.eval_data import STS_SEVEN, canonical
from operators.evaluation.mteb_tasks import model_meta
from operators.evaluation.scoring import (
    EmbeddingCache,
    PartWriter,
    check_held_out,
    load_tasks,
    rows_for,
    score,
    selected_tasks,
    task_score,
    task_texts,
    text_key,
)
from operators.methods.pooling import POOLING, Head
from operators.methods.postprocess import STEP_TYPES, ArtifactError, Fit, Moments, PostProcessor

HEAD_FIELDS = ("pooling", "layers", "exclude_special_tokens", "normalize")
SWEEP_KEYS = {"base", "set", "rank_by", "axes", "variants", "name", "max_variants"}
MAX_VARIANTS = 10_000  # a sweep's variants, at most, unless its max_variants says otherwise


@dataclass
class Variant:
    label: str  # what it changes from the base, e.g. "layers=[0], whiten k=256"
    overrides: dict  # dotted key -> value, over the base
    cfg: PipelineConfig


@dataclass
class Sweep:
    name: str
    base: PipelineConfig
    variants: list[Variant]
    rank_by: str
    fits_dir: str = ""
    axes: tuple[str, ...] = ()  # the axes' keys, in the file's order (the heatmap's rows and columns)


# -- reading a sweep ------------------------------------------------------------------------------


def fitted(cfg: PipelineConfig) -> bool:
    """Whether the config's post-processing has a fitted step (whiten, remove_top_pcs, zscore)."""
    return any(s.fitted for s in cfg.postprocess_steps())


def _validate(tree: dict, where: str) -> PipelineConfig:
    from pydantic import ValidationError

    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e, PipelineConfig)}") from None


def _apply(tree: dict, overrides: dict) -> dict:
    out = copy.deepcopy(tree)
    for key, value in overrides.items():
        if key == "postprocess":
            value = _postprocess_value(value, out)
            if value is None:
                continue
        _set_dotted(out, key, copy.deepcopy(value))
    return out


def _postprocess_value(chain, tree: dict):
    """A sweep's postprocess item as the config's: `{whiten: K}` sets whitening.k (None: all)."""
    if chain is None:
        return []
    steps = []
    for item in chain:
        if isinstance(item, dict) and len(item) == 1 and "whiten" in item:
            tree.setdefault("whitening", {})["k"] = item["whiten"]
            steps.append("whiten")
        else:
            steps.append(item)
    return steps


def _fits_artifact(tree: dict, fits_dir: str) -> dict:
    """A variant with a fitted step gets the artifact its sweep writes (unless it names its own)."""
    names = [i if isinstance(i, str) else next(iter(i)) for i in tree.get("postprocess") or []]
    if any(n in STEP_TYPES and STEP_TYPES[n].fitted for n in names) and not (tree.get("whitening") or {}).get("artifact"):
        probe = _validate(_merge(tree, {"whitening": {"artifact": "x"}}), "sweep")
        tree = _merge(tree, {"whitening": {"artifact": posixpath.join(fits_dir, f"{fit_key(probe)}.safetensors")}})
    return tree


def load_sweep(path: str | Path, sets: list[str] = (), output: str = "out/sweep") -> Sweep:
    """Read and validate a sweep file: every variant is a checked config before any work."""
    from operators.config.loading import parse_override

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    spec = load_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep is a mapping with base, axes and/or variants")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}; a sweep has {', '.join(sorted(SWEEP_KEYS))}")
    base = spec.get("base")
    if base is None:  # the embedded default
        tree = read_config_tree(DEFAULT_CONFIG)
    elif isinstance(base, str):
        tree = read_config_tree(path.parent / base)
    elif isinstance(base, dict):
        tree = copy.deepcopy(base)
        if "extends" in tree:  # a mapping over a config file, as a config file extends another
            tree = _merge(read_config_tree(path.parent / tree.pop("extends")), tree)
    else:
        raise ConfigError(f"{path}: base must be a config path (relative to the sweep file) or a mapping")
    common = dict(spec.get("set") or {})
    for item in sets:  # --set on the command line, after the file's own
        key, value = parse_override(item)
        common[key] = value
    tree = _apply(tree, common)
    base_cfg = _validate(tree, f"{path}: base")
    axes = spec.get("axes") or {}
    listed = spec.get("variants") or []
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise ConfigError(f"{path}: axes maps each dotted key to a non-empty list of values")
    if not isinstance(listed, list) or not all(isinstance(v, dict) for v in listed):
        raise ConfigError(f"{path}: variants is a list of mappings of dotted keys to values")
    cap = spec.get("max_variants", MAX_VARIANTS)
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise ConfigError(f"{path}: max_variants must be a positive integer")
    count = math.prod(len(v) for v in axes.values()) * bool(axes) + len(listed)
    if count > cap:
        raise ConfigError(f"{path}: {count} variants ({' x '.join(str(len(v)) for v in axes.values()) or '0'} axes, "
                          f"{len(listed)} listed), over max_variants = {cap}; set max_variants in the sweep file to run more")
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else []
    overrides_list = combos + [dict(v) for v in listed]
    if not overrides_list:
        overrides_list = [{}]
    fits_dir = str(Path(output).resolve() / "fits")
    variants, seen = [], {}
    for i, overrides in enumerate(overrides_list):
        vtree = _fits_artifact(_apply(tree, overrides), fits_dir)
        cfg = _validate(vtree, f"{path}: variant {i + 1} {overrides}")
        same = fingerprint(cfg.model_dump(mode="json"))
        if same in seen:  # the same config twice (an axis value equal to the base's): scored once
            continue
        seen[same] = i
        label = describe(cfg, base_cfg)
        labels = [v.label for v in variants]
        if label in labels:  # differs only where labels look away (eval, ray, ...): numbered
            label = f"{label} #{labels.count(label) + sum(lb.startswith(label + ' #') for lb in labels) + 1}"
        variants.append(Variant(label, overrides, cfg))
    base_tasks = selected_tasks(base_cfg)
    rank_by = spec.get("rank_by") or ("sts/avg" if set(STS_SEVEN) <= set(base_tasks) else base_tasks[0])
    rank_by = rank_by if rank_by in ("sts/avg", "mean") else canonical(rank_by)
    sweep = Sweep(spec.get("name") or path.stem, base_cfg, variants, rank_by, fits_dir, tuple(axes))
    check_sweep(sweep)
    return sweep


def check_sweep(sweep: Sweep) -> None:
    """What the variants must share, and what the ranking needs, before any work."""
    if len({json.dumps(v.cfg.eval.model_dump(mode="json"), sort_keys=True) for v in sweep.variants}) > 1:
        raise ConfigError("sweep: every variant must use the same eval settings (set them in base or set, not in axes)")
    task_list = selected_tasks(sweep.variants[0].cfg)
    if sweep.rank_by not in ("sts/avg", "mean") and sweep.rank_by not in task_list:
        raise ConfigError(f"sweep: rank_by {sweep.rank_by} is not among eval.tasks ({', '.join(task_list)})")
    if sweep.rank_by == "sts/avg" and not set(STS_SEVEN) <= set(task_list):
        raise ConfigError("sweep: rank_by sts/avg needs the seven STS tasks in eval.tasks")
    if sweep.variants[0].cfg.eval.query_instruction is not None:
        raise ConfigError("sweep: eval.query_instruction is not supported in sweeps (one pass embeds queries and documents alike)")
    for v in sweep.variants:
        check_held_out(v.cfg)
        if fitted(v.cfg) and not v.cfg.whitening.corpus:
            raise ConfigError(f"sweep: variant '{v.label}' post-processes with a fitted step: set whitening.corpus (e.g. Wikitext) to fit on")


# -- labels -----------------------------------------------------------------------------------------


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _chain(cfg: PipelineConfig) -> str:
    parts = []
    for s in cfg.postprocess_steps():
        if s.op == "whiten":
            parts.append("whiten" + (f" k={s.k}" if s.k else "") + (" zca" if s.method == "zca" else ""))
        elif s.op == "remove_top_pcs":
            parts.append(f"abtt D={s.d}")
        elif s.op == "normalize":
            parts.append("l2")
        else:
            parts.append(s.op)
    return " + ".join(parts) or "none"


SHORT = {
    "extraction.layers": "layers", "extraction.pooling": "pooling", "extraction.template": "template",
    "extraction.instruction": "instruction", "model.init": "init", "model.name": "model",
}
HIDDEN = ("whitening.artifact", "whitening.k", "whitening.method", "postprocess", "eval.", "gate.", "output.", "input.", "ray.")


def describe(cfg: PipelineConfig, base: PipelineConfig) -> str:
    """What `cfg` changes from `base`, short: 'layers=[0], pooling=cls, whiten k=256'; 'base'
    when nothing."""
    a, b = _flat(cfg.model_dump(mode="json")), _flat(base.model_dump(mode="json"))
    parts = []
    no_prompt = a.get("extraction.template") is None and b.get("extraction.template") is not None
    for key in a:
        if a[key] == b.get(key) or key.startswith(HIDDEN):
            continue
        if no_prompt and key == "extraction.preprocess":  # part of dropping the prompt
            continue
        value = a[key]
        name = SHORT.get(key, key.rsplit(".", 1)[-1])
        if key == "extraction.template" and value is None:
            parts.append("no prompt")
        elif key == "extraction.demonstrations":
            parts.append(f"demos={len(value)}")
        elif key == "extraction.exclude_special_tokens":
            parts.append("no special tokens" if value else "with special tokens")
        elif key == "extraction.normalize":
            parts.append("normalize" if value else "no normalize")
        elif key == "model.name":  # a path or URI: its last part
            parts.append(f"model={str(value).rstrip('/').rsplit('/', 1)[-1]}")
        elif isinstance(value, str) and len(value) > 24:
            parts.append(f"{name}='{value[:21]}...'")
        else:
            parts.append(f"{name}={json.dumps(value) if isinstance(value, list) else value}")
    if _chain(cfg) != _chain(base):
        parts.append(_chain(cfg))
    return ", ".join(parts) or "base"


# -- groups: one forward pass each ------------------------------------------------------------------


def forward_key(cfg: PipelineConfig) -> str:
    """What a forward pass depends on: the model and everything of the extraction but the heads'
    fields (an engine's graph has the layers averaged inside: for engines they count too)."""
    ex = cfg.extraction.model_dump(mode="json")
    keep_layers = cfg.model.engine != "torch"
    for f in HEAD_FIELDS:
        if f != "layers" or not keep_layers:
            ex.pop(f)
    ex["states"] = POOLING[cfg.extraction.pooling].states
    return fingerprint({"model": cfg.model.model_dump(mode="json"), "extraction": ex})


def fit_key(cfg: PipelineConfig) -> str:
    """A fit's identity: the model, the extraction and the fit corpus (not the post-processing
    chain: every k and D of a head comes from the same fit)."""
    w = cfg.whitening
    return fingerprint({
        "model": cfg.model.model_dump(mode="json"), "extraction": cfg.extraction.model_dump(mode="json"),
        "corpus": [w.corpus, w.split, w.max_sentences, w.eps],
    })


@dataclass
class Group:
    key: str
    variants: list[Variant]
    heads: list[Head] = field(default_factory=list)

    @property
    def cfg(self) -> PipelineConfig:
        """The group's forward config: the first variant's, its head fields at their defaults
        and no post-processing (raw vectors)."""
        first = self.variants[0].cfg
        ex = first.extraction.model_copy(update={"exclude_special_tokens": False, "normalize": False})
        return first.model_copy(update={"extraction": ex, "postprocess": (), "whitening": first.whitening.model_copy(update={"artifact": None})})

    def head_of(self, v: Variant) -> int:
        return self.heads.index(Head.of(v.cfg.extraction))


def plan_groups(sweep: Sweep) -> list[Group]:
    groups: dict[str, Group] = {}
    for v in sweep.variants:
        g = groups.setdefault(forward_key(v.cfg), Group(forward_key(v.cfg), []))
        g.variants.append(v)
        head = Head.of(v.cfg.extraction)
        if head not in g.heads:
            g.heads.append(head)
    for g in groups.values():
        corpora = {(v.cfg.whitening.corpus, v.cfg.whitening.split, v.cfg.whitening.max_sentences)
                   for v in g.variants if fitted(v.cfg)}
        if len(corpora) > 1:
            raise ConfigError(f"sweep: variants sharing a forward pass fit on different corpora {sorted(map(str, corpora))}: use one whitening corpus")
    return list(groups.values())


def check_group(g: Group, resolved) -> None:
    """Each variant's layers and pooling against the resolved model, and its post-processing
    against the dimension, before the pass: the checks resolve_model and check_artifact make for
    one config."""
    from operators.model.provenance import check_steps
    from operators.model.resolution import check_reads

    for v in g.variants:
        try:
            check_reads(v.cfg.extraction, resolved.identity.get("name", resolved.source), resolved.family,
                        resolved.model_type, resolved.num_hidden_states)
            check_steps(v.cfg.postprocess_steps(), resolved.dimension)
        except (ConfigError, ArtifactError) as e:
            raise ConfigError(f"sweep: variant '{v.label}': {e}") from None


# -- running ------------------------------------------------------------------------------------------


def group_pass(g: Group, prepared, embed_fn, texts: list[str], fit_texts: list[str], cache_root: str, chunk: int, log=None):
    """One pass for the group: (raw vectors per head by text key, moments per head over the
    fit corpus or None). Benchmark vectors are cached under cache_root (all heads side by side);
    fit vectors are folded into moments as they arrive and never held."""
    d = prepared.resolved.dimension
    heads_fp = fingerprint([h.__dict__ for h in g.heads])
    cache = EmbeddingCache(posixpath.join(cache_root, f"sweep-{prepared.fingerprint}-{heads_fp}"))
    vectors = cache.load()
    moments_file = Path(cache.folder) / f"fit-{fingerprint([fit_key(g.variants[0].cfg), heads_fp])}.npz"
    moments = None
    if fit_texts and moments_file.exists():
        z = np.load(moments_file)
        moments = [Moments(int(z["n"]), z["sum"][h], z["outer"][h]) for h in range(len(g.heads))]
    todo = [t for t in dict.fromkeys(texts) if text_key(t) not in vectors]
    fit_todo = fit_texts if fit_texts and moments is None else []
    if log:
        log("group %s: %d heads, %d texts (%d cached), %d fit texts%s", g.key, len(g.heads), len(set(texts)),
            len(set(texts)) - len(todo), len(fit_texts), " (moments cached)" if fit_texts and not fit_todo else "")
    if todo or fit_todo:
        keys = [f"b{text_key(t)}" for t in todo] + [f"f{i}" for i in range(len(fit_todo))]
        fresh = [Moments.zeros(d) for _ in g.heads] if fit_todo else None
        parts = PartWriter(cache, vectors, chunk)
        for batch_keys, batch in embed_fn(keys, todo + fit_todo):
            batch = np.asarray(batch, dtype=np.float32)
            is_fit = np.fromiter((k[0] == "f" for k in batch_keys), dtype=bool, count=len(batch_keys))
            if is_fit.any():
                for h in range(len(g.heads)):
                    fresh[h] = fresh[h].merge(Moments.of(batch[is_fit, h * d:(h + 1) * d]))
            bench = np.flatnonzero(~is_fit)
            if len(bench):
                parts.add([batch_keys[i][1:] for i in bench], batch[bench])
        parts.flush()
        if fresh is not None:
            if fresh[0].n != len(fit_todo):
                raise RuntimeError(f"moments cover {fresh[0].n} of {len(fit_todo)} fit texts")
            moments = fresh
            np.savez(moments_file, n=fresh[0].n, sum=np.stack([m.sum for m in fresh]), outer=np.stack([m.outer for m in fresh]))
    return vectors, moments


def run_sweep(sweep: Sweep, prepare_fn, embed_fn_for, output: str, log=None) -> dict:
    """Run every group's pass, post-process and score every variant, ranked (sweep_reports.py
    writes the reports).
    `prepare_fn(cfg)` -> Prepared (raw extraction); `embed_fn_for(cfg, prepared)` -> EmbedFn."""
    from operators.io.readers import read_fit_corpus
    from operators.model.whitening import write_fit

    t_start = time.time()
    groups = plan_groups(sweep)
    cfg0 = sweep.variants[0].cfg
    data = load_tasks(cfg0, selected_tasks(cfg0))
    texts = task_texts(data)
    prepared_groups = []
    for g in groups:  # every group resolved and checked before the first pass
        prepared = prepare_fn(g.cfg)
        check_group(g, prepared.resolved)
        prepared_groups.append(replace(prepared, heads=tuple(g.heads)))
    runs, passes = [], []
    Path(sweep.fits_dir).mkdir(parents=True, exist_ok=True)
    for g, prepared in zip(groups, prepared_groups):
        t0 = time.time()
        w = g.variants[0].cfg.whitening
        fitting = [v for v in g.variants if fitted(v.cfg)]
        fit_texts = read_fit_corpus(w.corpus, w.split, w.max_sentences, w.storage, cfg0.eval.mirror) if fitting else []
        if fitting and len(fit_texts) <= prepared.resolved.dimension:
            raise ConfigError(f"whitening.corpus: {len(fit_texts)} texts from {w.corpus}, fewer than the {prepared.resolved.dimension} dimensions")
        vectors, moments = group_pass(g, prepared, embed_fn_for(g.cfg, prepared), texts, fit_texts,
                                      posixpath.join(output, "cache"), cfg0.eval.chunk, log)
        t1 = time.time()
        fits = {}
        d = prepared.resolved.dimension
        for v in fitting:  # one eigendecomposition per head; its artifact, for the configs written out
            h = g.head_of(v)
            if h not in fits:
                fits[h] = Fit.from_moments(moments[h])
            artifact = Path(v.cfg.whitening.artifact)
            if not artifact.exists():
                write_fit(v.cfg, prepared, moments[h], len(fit_texts), t0)
        for v in g.variants:
            h = g.head_of(v)
            post = PostProcessor(v.cfg.postprocess_steps(), fits.get(h), numpy=True) if v.cfg.postprocess_steps() else None

            def vec(batch, side=None, *, h=h, post=post):  # one pass embeds queries and documents alike
                x = np.stack([vectors[text_key(t)][h * d:(h + 1) * d] for t in batch])
                return post(x) if post is not None else x

            results = score(v.cfg, data, vec, posixpath.join(output, "mteb"), model_meta(v.cfg.model.name, fingerprint(v.cfg.model_dump(mode="json")), d))
            runs.append({"name": v.label, "overrides": v.overrides, **results,
                         "dimension": int(vec(texts[:1]).shape[1]), "group": g.key})
        passes.append({"group": g.key, "heads": len(g.heads), "variants": len(g.variants), "texts": len(texts),
                       "fit_texts": len(fit_texts), "pass_s": t1 - t0, "score_s": time.time() - t1})
    for r in runs:
        r["rank_score"] = rank_score(r, sweep.rank_by)
    # a variant whose vectors are all the same (CLS at layer 0) has no correlation: ranked last
    runs.sort(key=lambda r: -r["rank_score"] if np.isfinite(r["rank_score"]) else np.inf)
    result = {
        "sweep": sweep.name, "rank_by": sweep.rank_by, "variants": runs, "passes": passes,
        "base": "base" if any(r["name"] == "base" for r in runs) else None, "seconds": time.time() - t_start,
    }
    return redact(result)  # labels and overrides may spell a URI with credentials: never in a report


def rank_score(run: dict, rank_by: str) -> float:
    """The ranking score: one task's headline score, sts/avg (the seven STS tasks), or mean (of
    every task's headline score, STS years counted once each)."""
    if rank_by == "mean":
        return float(np.mean([v for k, v in rows_for(run).items() if k != "STS avg"]))
    return float(task_score(run, rank_by))
