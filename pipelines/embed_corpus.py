"""Embed a sharded text corpus into vector shards on Ray Data.

    python pipelines/embed_corpus.py                       # the embedded default (configs/default.yaml)
    python pipelines/embed_corpus.py --config configs/x.yaml --set input.uri=s3://bucket/corpus/
    ray job submit --working-dir . -- python pipelines/embed_corpus.py --config configs/x.yaml

read shards -> embedding actor pool (map_batches) -> stage + commit one vector shard per input
shard. Everything that can be checked (config, input listing, output access, the model) is
checked before Ray starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit --working-dir .`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import __version__
from operators.benchmarks import BenchmarkError
from operators.config import ConfigError, PipelineConfig, load_config, redact, resolved_config_text
from operators.embed import ARROW_FLOATS, EmbedSpec
from operators.incremental import (
    RUNS_DIR,
    append_run_log,
    new_run_id,
    publish,
    read_current,
    read_previous,
    report_markdown,
    version_name,
    write_deletions,
    write_json,
)
from operators.lease import LeaseError, acquire_lease
from operators.models import CACHE_DIR, ModelLoadError, ResolvedModel, resolve_model
from operators.postprocess import ArtifactError
from operators.sinks import SinkError, sync_lancedb
from operators.provenance import build_provenance, check_artifact
from operators.storage import (
    InputError,
    Shard,
    check_writable,
    file_fingerprint,
    get_fs,
    glob_root,
    list_shards,
    protocol_of,
    redact_text,
    write_text_atomic,
)
from operators.writers import (
    COUNT_KEYS,
    STAGING_DIR,
    IncompleteShardError,
    ShardStats,
    load_manifest,
    read_provenance,
    write_manifest,
)

logger = logging.getLogger("corpus_embed")


@dataclass
class Plan:
    shards: list[Shard]
    todo: list[Shard]
    done: dict[str, dict]  # rel -> manifest entry of shards already embedded with this config
    resolved: ResolvedModel
    provenance: dict
    config_fingerprint: str
    out_uri: str = ""  # where the vector shards go: output.uri, or its version folder
    version: str | None = None  # output.versioned: v-<fingerprint>
    changed: set[str] = field(default_factory=set)  # rels re-read with document-level reuse
    deleted: list[str] = field(default_factory=list)  # vector files of shards gone from the input
    # the input root the manifest records, and whether this run may delete what it lacks: only when
    # it lists that same root (or output.prune), so a run over a subset or another root deletes nothing
    input_root: str | None = None
    prunes: bool = True
    damaged: list[str] = field(default_factory=list)  # rels whose committed vector file failed its check


def gate_eval_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config the quality gate scores: eval.tasks replaced by gate.tasks."""
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"tasks": cfg.gate.tasks})})


def output_location(cfg: PipelineConfig, fp: str) -> tuple[str, str | None]:
    if not cfg.output.versioned:
        return cfg.output.uri, None
    version = version_name(fp)
    return posixpath.join(cfg.output.uri.rstrip("/"), version), version


def plan_run(cfg: PipelineConfig) -> Plan:
    """List and fingerprint the input, check the output and the model, and pick the shards that
    need embedding: new shards whole, changed shards with reuse of unchanged documents (when the
    previous vector file was made by this config), and shards gone from the input as deletions.
    Raises ConfigError/InputError/ModelLoadError before any work starts."""
    shards = list_shards(cfg.input.uri, cfg.input.format, cfg.input.storage)
    resolved = resolve_model(cfg.model, cfg.extraction)
    _, _, artifact_sha = check_artifact(cfg, resolved)
    provenance, fp = build_provenance(cfg, resolved, artifact_sha)
    if cfg.gate.tasks:  # the gate's tasks and data must be there before hours of embedding
        from pipelines.evaluate import load_tasks, selected_tasks

        gate_cfg = gate_eval_config(cfg)
        load_tasks(gate_cfg, selected_tasks(gate_cfg))
    if cfg.sinks.lancedb.uri:
        try:
            import lancedb  # noqa: F401
        except ImportError as e:
            raise ConfigError("sinks.lancedb.uri is set but lancedb is not installed: pip install 'corpus-embed[lancedb]'") from e
    out_uri, version = output_location(cfg, fp)
    check_output_outside_input(cfg, out_uri)
    check_writable(out_uri, cfg.output.storage)

    fs, out_dir = get_fs(out_uri, cfg.output.storage)
    recorded = load_manifest(fs, out_dir)
    if recorded.damaged:
        logger.warning("%s: rebuilding the entries from the vector files' footers", redact_text(recorded.damaged))
    manifest = recorded.entries
    fs.invalidate_cache(out_dir)
    present = {posixpath.basename(i["name"]): i for i in fs.ls(out_dir, detail=True)} if fs.exists(out_dir) else {}
    todo, done, changed, damaged = [], {}, set(), []
    for shard in shards:
        entry = manifest.get(shard.rel)
        if shard.output_name not in present:
            todo.append(shard)
            continue
        if entry is not None and not output_intact(entry, present[shard.output_name]):
            damaged.append(shard.rel)  # cut short or replaced since its commit: embed it again
            todo.append(shard)
            continue
        if entry is None or entry.get("config_fingerprint") != fp or entry.get("input_fingerprint") != shard.fingerprint:
            # Not (or differently) in the manifest: a run may have committed it and died before
            # updating the manifest. The shard's own footer says what it was built from.
            meta = read_provenance(fs, posixpath.join(out_dir, shard.output_name)) or {}
            if meta.get("config_fingerprint") == fp and meta.get("input", {}).get("fingerprint") == shard.fingerprint:
                entry = dict(_stats_for(shard, fp).to_json(), **meta.get("counts", {}))
                entry["output_fingerprint"] = file_fingerprint(present[shard.output_name])
            else:
                todo.append(shard)
                if meta.get("config_fingerprint") == fp:  # same config, new content: reuse what did not change
                    changed.add(shard.rel)
                continue
        done[shard.rel] = entry
    if damaged:
        logger.warning("%d committed vector files differ from what their commit recorded (size, etag/mtime); "
                       "embedding them again: %s", len(damaged), ", ".join(damaged[:10]))
    root = redact_text(cfg.input.uri.rstrip("/"))
    input_root = recorded.input_uri
    prunes = cfg.output.prune or (input_root == root)
    if input_root is None and (manifest or recorded.damaged or present):
        prunes = cfg.output.prune  # which root the output came from is unknown: delete nothing unasked
    wanted = {s.output_name for s in shards}
    deleted = sorted(n for n in present if n.endswith(".parquet") and n not in wanted) if prunes else []
    if not prunes:
        others = sum(1 for n in present if n.endswith(".parquet") and n not in wanted)
        if others:
            logger.warning(
                "input.uri %s is not the input root this output records (%s): the %d vector shards of other inputs "
                "are kept. To delete them on purpose, run with --set output.prune=true", root, input_root or "unknown", others,
            )
    if prunes or input_root is None:
        input_root = root
    return Plan(shards, todo, done, resolved, provenance, fp, out_uri, version, changed, deleted, input_root, prunes, damaged)


def output_intact(entry: dict, info: dict) -> bool:
    """Whether a committed vector file still is what its commit recorded (size, and etag or mtime):
    a listing's details, no extra request. Entries from before this record pass."""
    want = entry.get("output_fingerprint")
    if not want:
        return True
    have = file_fingerprint(info)
    return all(have.get(k) == v for k, v in want.items() if k in have)


def check_output_outside_input(cfg: PipelineConfig, out_uri: str) -> None:
    """Refuse an output folder inside the input folder: the next run would read its own vectors as input."""
    if protocol_of(cfg.input.uri) != protocol_of(out_uri):
        return
    in_fs, in_path = get_fs(cfg.input.uri, cfg.input.storage)
    _, out_path = get_fs(out_uri, cfg.output.storage)
    root = glob_root(in_path)
    if root is None:
        if not in_fs.isdir(in_path):
            return  # one file: a sibling output folder is never listed
        root = in_path
    norm = (lambda p: os.path.realpath(p)) if protocol_of(out_uri) == "file" else (lambda p: p.rstrip("/"))
    root, out = norm(root), norm(out_path)
    if out == root or out.startswith(root.rstrip("/") + "/"):
        raise ConfigError(
            f"output.uri {redact_text(out_uri)} lies inside input.uri {redact_text(cfg.input.uri)}: later runs would read "
            "the vector shards as input. Pick an output folder outside the input"
        )


def _stats_for(shard: Shard, fp: str, incremental: bool = False) -> ShardStats:
    return ShardStats(
        input=shard.public_uri, rel=shard.rel, output=shard.output_name, input_fingerprint=shard.fingerprint,
        config_fingerprint=fp, incremental=incremental,
    )


def init_ray(cfg: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a fresh cluster, even if a `ray start` head runs on this machine.
        # Idle worker processes are kept (Ray's default keeps one per CPU and kills the rest after
        # 1 s idle): a run's actors take workers from the pool, and the read/write tasks after them
        # would otherwise start fresh Python processes mid-run, ~1 s of CPU each.
        cpus = cfg.ray.num_cpus or os.cpu_count() or 1
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                 _system_config={"num_workers_soft_limit": 2 * cpus + 4})


@dataclass(frozen=True)
class ActorPlan:
    """The embedding actor pool: its bounds and each actor's resources."""

    min_size: int
    max_size: int
    num_cpus: float  # Ray's reservation per actor
    num_gpus: float
    threads: int | None  # torch threads per CPU actor; None on GPU
    # calls queued per actor. On CPU a call takes seconds: a second one queued behind it would wait
    # while another actor idles. None on GPU: Ray's default keeps the device fed.
    tasks_in_flight: int | None = None


def actor_plan(cfg: PipelineConfig, resolved: ResolvedModel) -> ActorPlan:
    """Size the embedding actor pool for the cluster (every `ray.*` setting left at None is chosen here).

    GPU cluster: a model under 1B parameters gets half a GPU, so two actors overlap their host work
    on one device; the pool grows from 1 to GPUs / gpus_per_actor as the autoscaler adds GPUs.
    CPU: a fixed pool of single-threaded actors, one per core (at most 8 per node, then threads per
    actor grow). Measured on 2 cores (BENCHMARKS.md), two 1-thread actors beat one 2-thread actor by
    ~1.2x end to end: a 2-thread forward stalls whenever another process (a read, a write, Ray)
    takes one of its cores, since the other thread waits at every barrier; single-threaded actors
    just lose that slice. Ray reserves half a CPU per thread, so reads, tokenization and writes
    still get scheduled, and the actors start with the run instead of joining it mid-way."""
    import ray

    r = cfg.ray
    gpus = r.gpus_per_actor
    if gpus is None:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        gpus = (0.5 if (resolved.parameters or 0) < 1e9 else 1) if has_gpu else 0
    if gpus:
        size = r.max_actors or max(1, int(ray.cluster_resources().get("GPU", 0) / gpus))
        return ActorPlan(min(r.min_actors or 1, size), size, r.cpus_per_actor or 1.0, gpus, None)
    nodes = [int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")] or [1]
    threads = r.threads_per_actor or (max(1, max(nodes) // r.max_actors) if r.max_actors else max(1, max(nodes) // 8))
    size = r.max_actors or sum(max(1, c // threads) for c in nodes)
    return ActorPlan(min(r.min_actors or size, size), size, r.cpus_per_actor or threads / 2, 0, threads, tasks_in_flight=1)


def estimated_blocks(shard: Shard, rows_per_block: int) -> int:
    """An upper bound on the read blocks of a shard, from its size: rows of at least 32 bytes
    uncompressed, or 4 compressed."""
    per_row = 4 if shard.compression else 32
    return max(1, -(-int(shard.fingerprint.get("size") or 0) // (rows_per_block * per_row)))


def read_tasks(cfg: PipelineConfig) -> int:
    import ray

    return cfg.ray.read_tasks or max(2, int(ray.cluster_resources().get("CPU", 1)) // 4)


def map_on_actor_pool(
    ds, cfg: PipelineConfig, fn, make_spec, resolved: ResolvedModel, tokenize: bool = True, inputs: int | None = None,
    blocks: int | None = None,
):
    """Tokenize on CPU apart from the model (a small pool of CPU actors holding the tokenizer, or
    tasks fused into the reads: ray.tokenize_on), then `ds.map_batches(fn)` on the embedding actor
    pool. `make_spec(num_threads)` builds the EmbedSpec passed to both. `inputs`: the input tasks
    (shards); `blocks`: at most how many blocks reach the model, so a small job starts no actor
    that would get no work."""
    from ray.data import ActorPoolStrategy

    from operators.tokenize import PortableTokenizer, TextEncoder, load_tokenizer, tokenize_batch

    actors = actor_plan(cfg, resolved)
    if blocks:
        actors = replace(actors, min_size=min(actors.min_size, blocks), max_size=min(actors.max_size, blocks))
    spec = make_spec(actors.threads)
    n = min(read_tasks(cfg), inputs or read_tasks(cfg))
    # the tokenize workers get the driver's tokenizer and need neither transformers nor torch
    portable = PortableTokenizer.from_transformers(load_tokenizer(spec)) if tokenize else None
    if tokenize and cfg.ray.tokenize_on == "actors":
        tokenizers = cfg.ray.tokenize_actors or (n if actors.num_gpus else 1)
        ds = ds.map_batches(
            TextEncoder, fn_constructor_args=(spec, None, portable), batch_format="pyarrow", batch_size=None,
            compute=ActorPoolStrategy(min_size=1, max_size=min(tokenizers, inputs or tokenizers)), num_cpus=cfg.ray.io_cpus,
        )
    elif tokenize:
        ds = ds.map_batches(
            tokenize_batch, fn_kwargs={"spec": spec, "portable": portable}, batch_format="pyarrow", batch_size=None, num_cpus=cfg.ray.io_cpus,
            concurrency=n,  # the same as the read's: they fuse
        )
    return ds.map_batches(
        fn,
        fn_constructor_args=(spec,),
        batch_format="pyarrow",
        batch_size=cfg.ray.batch_size,
        compute=ActorPoolStrategy(min_size=actors.min_size, max_size=actors.max_size, max_tasks_in_flight_per_actor=actors.tasks_in_flight),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
    )


def embed(cfg: PipelineConfig, plan: Plan, noop: bool = False) -> dict:
    """Run the Ray Data pipeline over `plan.todo`; return the coordinator's final state.
    noop=True replaces the model by zero vectors (the data path alone, for benchmarks)."""
    import ray

    from operators.embed import Embedder
    from operators.ray_io import ShardDatasource, ShardedParquetSink, start_coordinator
    from operators.vectors import NoopEmbedder

    init_ray(cfg)
    fs, out_dir = get_fs(plan.out_uri, cfg.output.storage)
    staging_root = posixpath.join(out_dir, STAGING_DIR)
    if fs.exists(staging_root):  # the caller holds the output's lease: these parts are a dead run's, never committed
        fs.rm(staging_root, recursive=True)
    staging = posixpath.join(staging_root, time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:8])
    plans = {s.public_uri: _stats_for(s, plan.config_fingerprint, s.rel in plan.changed) for s in plan.todo}
    previous = {s.uri: posixpath.join(plan.out_uri, s.output_name) for s in plan.todo if s.rel in plan.changed}
    coordinator = start_coordinator(list(plans))
    sink = ShardedParquetSink(
        coordinator, plan.out_uri, cfg.output.storage, staging, plans,
        plan.provenance["dimension"], ARROW_FLOATS[cfg.output.dtype], plan.provenance, cfg.input.duplicate_ids,
    )
    # one block stream per shard, no re-splitting (with ray.tokenize_on=tasks the tokenize stage fuses into the reads)
    ds = ray.data.read_datasource(
        ShardDatasource(plan.todo, cfg.input, previous, cfg.output.storage), num_cpus=cfg.ray.io_cpus, override_num_blocks=len(plan.todo),
        concurrency=min(read_tasks(cfg), len(plan.todo)),
    )
    ds = map_on_actor_pool(
        ds, cfg, NoopEmbedder if noop else Embedder, lambda threads: EmbedSpec.from_config(cfg, plan.resolved, num_threads=threads), plan.resolved,
        inputs=len(plan.todo), blocks=sum(estimated_blocks(s, cfg.input.rows_per_block) for s in plan.todo),
    )
    error = None
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.ray.io_cpus})
    except Exception as e:  # keep what was committed: record it in the manifest, then fail
        error = RunStopped.from_error(e)
    if error is not None:
        # the failed dataset's frames and exceptions form reference cycles that keep its actor
        # pools alive, CPUs reserved, until the cyclic collector runs: a run after this one in the
        # same process (a retry loop, a service) would wait for them forever
        gc.collect()
    try:
        state = ray.get(coordinator.state.remote())
    except Exception as e:  # the coordinator died with its node: the footers say what was committed
        logger.warning("the commit coordinator was lost (%s); reading what was committed from the vector files", type(e).__name__)
        state = committed_from_footers(fs, out_dir, plan)
        error = error or RunStopped.from_error(e)
    state["error"] = error
    try:
        ray.kill(coordinator)  # a named actor outlives its handle: end it with the run
    except Exception:
        pass
    if not error and not state["failed"] and fs.exists(staging_root):
        fs.rm(staging_root, recursive=True)
    return state


class RunStopped(RuntimeError):
    """Why the dataset stopped, as text. The original exception is logged and dropped: its
    traceback holds the dataset's executor and with it the actor pools, whose CPUs would then
    stay reserved for as long as anything (a caller catching the run's error) holds it."""

    @classmethod
    def from_error(cls, e: BaseException) -> "RunStopped":
        logger.debug("the dataset stopped", exc_info=e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return cls(redact_text(f"{type(e).__name__}: {first}"))


def committed_from_footers(fs, out_dir: str, plan: Plan) -> dict:
    """The coordinator's state rebuilt from the output: each shard of the plan whose vector file's
    footer carries this config and this input fingerprint was committed by this run."""
    committed, failed = {}, {}
    for shard in plan.todo:
        path = posixpath.join(out_dir, shard.output_name)
        meta = read_provenance(fs, path) or {}
        if meta.get("config_fingerprint") == plan.config_fingerprint and meta.get("input", {}).get("fingerprint") == shard.fingerprint:
            stats = _stats_for(shard, plan.config_fingerprint, shard.rel in plan.changed)
            for k, v in meta.get("counts", {}).items():
                setattr(stats, k, v)
            stats.output_fingerprint = file_fingerprint(fs.info(path))
            committed[shard.public_uri] = stats.to_json()
        else:
            failed[shard.public_uri] = "not committed: the run lost its commit coordinator; re-run to finish it"
    return {"committed": committed, "failed": failed, "pending": {}}


class GateError(RuntimeError):
    """The quality gate scored the configuration below a floor; nothing was published."""


def remove_deleted_shards(fs, out_dir: str, names: list[str]) -> list[dict]:
    """Delete the vector (and rejected) files of shards gone from the input; return their ids as
    deletion records."""
    rows = []
    for name in names:
        path = posixpath.join(out_dir, name)
        prev = read_previous(fs, path, columns=("id",))
        rows += [{"id": i, "shard": name, "reason": "shard deleted"} for i in (prev.column("id").to_pylist() if prev else [])]
        fs.rm(path)
        rejected = posixpath.join(out_dir, "_rejected", name)
        if fs.exists(rejected):
            fs.rm(rejected)
    return rows


def run_gate(cfg: PipelineConfig) -> dict:
    """Score the config on gate.tasks with the evaluation stage; embeddings cached locally per
    config fingerprint, so a nightly run on an unchanged config scores from the cache."""
    from pipelines.evaluate import evaluate_cfg, task_score

    result = evaluate_cfg(gate_eval_config(cfg), os.path.expanduser("~/.cache/corpus-embed/gate"))
    scores = {t: task_score(result, t) for t in cfg.gate.tasks}
    failed = {t: s for t, s in scores.items() if t in cfg.gate.min_scores and s < cfg.gate.min_scores[t]}
    return {"scores": scores, "floors": dict(cfg.gate.min_scores), "passed": not failed, "failed": sorted(failed)}


def run(cfg: PipelineConfig, noop: bool = False) -> dict:
    """Plan, embed, record, gate, publish, feed the sinks. Returns the run summary (also written
    as the run report); raises on failure, after logging the run."""
    started = time.time()
    run_id = new_run_id()
    root_fs, root = get_fs(cfg.output.uri, cfg.output.storage)
    durations: dict[str, float] = {}
    summary: dict = {
        "run_id": run_id, "output": cfg.output.uri, "status": "running", "version": None, "published": False,
        "shards_total": 0, "shards_skipped": 0, "shards_embedded": 0, "shards_new": 0, "shards_changed": 0,
        "shards_deleted": 0, **{k: 0 for k in COUNT_KEYS}, "rows_deleted": 0, "seconds": 0.0,
    }
    plan = plan_run(cfg)  # bad config or input raises here: nothing ran, nothing to log
    durations["plan_s"] = time.time() - started
    summary.update(
        config_fingerprint=plan.config_fingerprint, version=plan.version, out_uri=plan.out_uri, model=cfg.model.name,
        shards_total=len(plan.shards), shards_skipped=len(plan.done), shards_changed=len(plan.changed),
        shards_new=len(plan.todo) - len(plan.changed), shards_deleted=len(plan.deleted),
    )
    logger.info(
        "model %s (%s, %d dims out, max_length %d), config fingerprint %s%s",
        cfg.model.name, plan.resolved.model_type, plan.provenance["dimension"], plan.resolved.max_length, plan.config_fingerprint,
        f", version {plan.version}" if plan.version else "",
    )
    fs, out_dir = get_fs(plan.out_uri, cfg.output.storage)
    error: BaseException | None = None
    lease = acquire_lease(root_fs, root, run_id, cfg.output.lease_seconds)  # a live holder: LeaseError, before any write
    try:
        if plan.todo:
            logger.info(
                "embedding %d of %d shards (%d new, %d changed: unchanged documents reused; %d already up to date; %d deleted)",
                len(plan.todo), len(plan.shards), summary["shards_new"], len(plan.changed), len(plan.done), len(plan.deleted),
            )
            t = time.time()
            state = embed(cfg, plan, noop=noop)
            durations["embed_s"] = time.time() - t
        else:
            state = {"committed": {}, "failed": {}, "pending": {}, "error": None}
            logger.info("no shard to embed: %d up to date, %d deleted", len(plan.shards), len(plan.deleted))
        deletions = remove_deleted_shards(fs, out_dir, plan.deleted)
        for stats in state["committed"].values():
            deletions += [{"id": i, "shard": stats["output"], "reason": "document removed"} for i in stats.get("deleted_ids", [])]
        recorded = load_manifest(fs, out_dir)
        entries = dict(recorded.entries)
        for rel in plan.damaged:
            entries.pop(rel, None)  # unless re-committed below
        entries.update(plan.done)
        entries.update({s["rel"]: {k: v for k, v in s.items() if k != "deleted_ids"} for s in state["committed"].values()})
        if plan.prunes:
            current = {s.rel for s in plan.shards}
            entries = {k: v for k, v in entries.items() if k in current}
        if entries != recorded.entries or recorded.input_uri != plan.input_root:  # a run with nothing to do rewrites nothing
            write_manifest(fs, out_dir, entries, plan.config_fingerprint, plan.input_root)
        summary["deletions_file"] = write_deletions(fs, out_dir, run_id, deletions)
        summary["committed_shards"] = sorted(s["output"] for s in state["committed"].values())
        summary["deleted_shards"] = plan.deleted
        summary["rows_deleted"] = len(deletions)
        for stats in state["committed"].values():
            summary["shards_embedded"] += 1
            for key in COUNT_KEYS:
                summary[key] += stats.get(key, 0)
            if stats["read_errors"]:
                logger.warning("%s: the shard could not be read to the end; see %s/_rejected/%s", stats["input"], plan.out_uri, stats["output"])
            if stats.get("rows_duplicate"):
                logger.warning("%s: %d rows repeat an earlier id of the shard (input.duplicate_ids=%s)",
                               stats["input"], stats["rows_duplicate"], cfg.input.duplicate_ids)
        commits = sorted((c["committed_at"], c["rows_in"]) for c in state["committed"].values())
        if len(commits) >= 4:  # the rate between the first and last commit: start-up left out
            summary["steady_rows_per_s"] = sum(n for _, n in commits[1:]) / max(commits[-1][0] - commits[0][0], 1e-6)
        if state["error"] is not None or state["failed"] or state["pending"]:
            raise IncompleteShardError(incomplete_message(state, len(plan.todo))) from state["error"]

        if cfg.gate.tasks:
            t = time.time()
            summary["gate"] = run_gate(cfg)
            durations["gate_s"] = time.time() - t
            if not summary["gate"]["passed"]:
                g = summary["gate"]
                raise GateError(
                    "quality gate failed, nothing published: "
                    + ", ".join(f"{task} {g['scores'][task]:.2f} < {g['floors'][task]:.2f}" for task in g["failed"])
                )
        previous = read_current(root_fs, root) if plan.version else None
        if plan.version:
            publish(root_fs, root, plan.version, run_id, plan.config_fingerprint)
            summary["published"] = True
            summary["previous_version"] = previous and previous.get("version")
        if cfg.sinks.lancedb.uri:
            t = time.time()
            names = sorted(e["output"] for e in entries.values())
            rebuild = bool(plan.version) and (previous or {}).get("version") != plan.version
            summary["sinks"] = {"lancedb": sync_lancedb(
                cfg.sinks.lancedb, fs, out_dir, names, [s["output"] for s in state["committed"].values()],
                plan.deleted, plan.provenance["dimension"], rebuild,
            )}
            durations["sinks_s"] = time.time() - t
        summary["status"] = "ok"
    except BaseException as e:
        error = e
        summary["status"] = "gate_failed" if isinstance(e, GateError) else "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
    finally:
        summary["seconds"] = time.time() - started
        durations["total_s"] = summary["seconds"]
        summary["durations"] = durations
        _record_run(cfg, root_fs, root, summary)
        lease.release()
    if error is not None:
        raise error
    return summary


def incomplete_message(state: dict, planned: int) -> str:
    """What a run that did not commit every shard says: each shard, why, and what a re-run does."""
    problems = [f"{s}: {e}" for s, e in sorted(state["failed"].items())]
    problems += [
        f"{s}: {p['rows_staged']} of {p['rows_expected'] or '?'} records staged when the run stopped; not committed, re-run to retry it"
        for s, p in sorted(state["pending"].items())
    ]
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    err = state.get("error")
    cause = f"\n  the run stopped early: {err}" if err is not None else ""
    return redact_text(
        f"{len(state['committed'])} of {planned} shards committed (kept: a re-run skips them); "
        f"{len(state['failed']) + len(state['pending'])} not committed" + cause + "".join(f"\n  {p}" for p in shown)
    )


def _record_run(cfg: PipelineConfig, fs, root: str, s: dict) -> None:
    """Append the run to `_runs/runs.jsonl` and write `_runs/<run_id>.json` and `.md`."""
    secs = max(s["seconds"], 1e-9)
    report = {
        "run_id": s["run_id"], "status": s["status"], "output": s["output"], "version": s.get("version"),
        "published": s.get("published", False), "config_fingerprint": s.get("config_fingerprint"), "model": cfg.model.name,
        "counts": {
            "shards_total": s["shards_total"], "shards_new": s["shards_new"], "shards_changed": s["shards_changed"],
            "shards_unchanged": s["shards_skipped"], "shards_deleted": s["shards_deleted"],
            "rows_in": s["rows_in"], "rows_embedded": s["rows_written"] - s["rows_reused"], "rows_reused": s["rows_reused"],
            "rows_rejected": s["rows_rejected"], "rows_truncated": s["rows_truncated"], "rows_deleted": s["rows_deleted"],
            "rows_duplicate": s.get("rows_duplicate", 0),
            "tokens": s["tokens"],
        },
        "throughput": {
            "rows_per_s": (s["rows_written"] - s["rows_reused"]) / secs, "tokens_per_s": s["tokens"] / secs,
            "padding_efficiency": padding_efficiency(s),
        },
        "durations": s["durations"], "gate": s.get("gate"), "sinks": s.get("sinks"),
        "out_uri": s.get("out_uri"), "committed_shards": s.get("committed_shards", []), "deleted_shards": s.get("deleted_shards", []),
        "deletions_file": s.get("deletions_file"), "error": s.get("error"), "package_version": __version__,
    }
    report = redact(report)
    s["report"] = report
    try:
        write_json(fs, posixpath.join(root, RUNS_DIR, f"{s['run_id']}.json"), report)
        write_text_atomic(fs, posixpath.join(root, RUNS_DIR, f"{s['run_id']}.md"), report_markdown(report))
        append_run_log(fs, root, {k: report[k] for k in ("run_id", "status", "version", "published", "config_fingerprint", "counts", "durations")})
    except Exception as e:  # never hide the run's own outcome behind a logging failure: keep the report locally
        local = CACHE_DIR / "runs" / f"{s['run_id']}.json"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(report, indent=1, default=str) + "\n")
        s["report_path"] = str(local)
        logger.warning("could not write the run report under %s/%s (%s: %s); it is at %s",
                       redact_text(root), RUNS_DIR, type(e).__name__, redact_text(str(e)), local)


def padding_efficiency(s: dict) -> float:
    """Real tokens / padded tokens fed to the model (1.0: no padding)."""
    return s["tokens"] / s["padded_tokens"] if s.get("padded_tokens") else 1.0


def format_summary(s: dict) -> str:
    secs = max(s["seconds"], 1e-9)
    embedded = s["rows_written"] - s.get("rows_reused", 0)
    extra = ""
    if s.get("rows_reused") or s.get("rows_deleted"):
        extra = f" ({embedded} embedded, {s['rows_reused']} reused), {s['rows_deleted']} deleted"
    where = s.get("out_uri") or s["output"]
    if s.get("published"):
        where += " (published)"
    return (
        f"done: {s['rows_written']} rows written{extra}, {s['rows_rejected']} rejected, {s['rows_truncated']} truncated "
        f"from {s['rows_in']} rows in {s['shards_embedded']} shards ({s['shards_skipped']} up to date) "
        f"in {s['seconds']:.1f}s: {embedded / secs:.1f} rows/s, {s['tokens'] / secs:.0f} tokens/s, "
        f"padding efficiency {padding_efficiency(s):.2f} -> {where}"
    )


def cli(description: str, argv: list[str] | None, work, summarize) -> int:
    """The shared command line of the pipelines: --config/--set, the resolved config logged,
    exit 2 for problems found before work starts, 1 for a run that failed part-way."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set input.uri=s3://bucket/corpus/ (repeatable)",
    )
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        logger.info("corpus-embed %s, resolved config:\n%s", __version__, resolved_config_text(cfg))
        result = work(cfg)
    except (ConfigError, InputError, ModelLoadError, ArtifactError, BenchmarkError, LeaseError) as e:
        return _fail(e, 2)
    except GateError as e:
        return _fail(e, 3)
    except (IncompleteShardError, SinkError) as e:
        return _fail(e, 1)
    except Exception as e:  # anything else (an output that turned unwritable, a lost cluster): one line, no traceback
        logger.debug("unexpected error", exc_info=True)
        return _fail(e, 1, f"{type(e).__name__}: ")
    print(summarize(result), flush=True)
    return 0


def _fail(e: BaseException, code: int, prefix: str = "") -> int:
    print(f"error: {redact_text(prefix + str(e))}", file=sys.stderr, flush=True)
    return code


class RedactingFilter(logging.Filter):
    """Credentials never reach a log line, whichever operator formatted it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, argv, run, format_summary)


if __name__ == "__main__":
    sys.exit(main())
