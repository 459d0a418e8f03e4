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
import logging
import os
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit --working-dir .`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import __version__
from operators.config import ConfigError, PipelineConfig, load_config, resolved_config_text
from operators.embed import ARROW_FLOATS, EmbedSpec
from operators.models import ModelLoadError, ResolvedModel, resolve_model
from operators.postprocess import ArtifactError
from operators.provenance import build_provenance, check_artifact
from operators.storage import InputError, Shard, check_writable, get_fs, list_shards
from operators.writers import (
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


def plan_run(cfg: PipelineConfig) -> Plan:
    """List and fingerprint the input, check the output and the model, and pick the shards that
    need embedding. Raises ConfigError/InputError/ModelLoadError before any work starts."""
    shards = list_shards(cfg.input.uri, cfg.input.format, cfg.input.storage)
    check_writable(cfg.output.uri, cfg.output.storage)
    resolved = resolve_model(cfg.model, cfg.extraction)
    _, _, artifact_sha = check_artifact(cfg, resolved)
    provenance, fp = build_provenance(cfg, resolved, artifact_sha)

    fs, out_dir = get_fs(cfg.output.uri, cfg.output.storage)
    manifest = load_manifest(fs, out_dir)
    present = {posixpath.basename(p) for p in fs.ls(out_dir, detail=False)} if fs.exists(out_dir) else set()
    todo, done = [], {}
    for shard in shards:
        entry = manifest.get(shard.rel)
        if shard.output_name not in present:
            todo.append(shard)
            continue
        if entry is None or entry.get("config_fingerprint") != fp or entry.get("input_fingerprint") != shard.fingerprint:
            # Not (or differently) in the manifest: a run may have committed it and died before
            # updating the manifest. The shard's own footer says what it was built from.
            meta = read_provenance(fs, posixpath.join(out_dir, shard.output_name)) or {}
            if meta.get("config_fingerprint") == fp and meta.get("input", {}).get("fingerprint") == shard.fingerprint:
                entry = dict(_stats_for(shard, fp).to_json(), **meta.get("counts", {}))
            else:
                todo.append(shard)
                continue
        done[shard.rel] = entry
    return Plan(shards, todo, done, resolved, provenance, fp)


def _stats_for(shard: Shard, fp: str) -> ShardStats:
    return ShardStats(input=shard.uri, rel=shard.rel, output=shard.output_name, input_fingerprint=shard.fingerprint, config_fingerprint=fp)


def init_ray(cfg: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a fresh cluster, even if a `ray start` head runs on this machine
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)


def actor_resources(cfg: PipelineConfig, resolved: ResolvedModel) -> tuple[float, int | None]:
    """(GPUs per actor, torch threads per actor or None on GPU). On a GPU cluster a model under
    1B parameters gets half a GPU, so two actors overlap their host work on one device. On CPU the
    threads are the node's CPUs shared among the actors (ray.threads_per_actor overrides): the
    Ray CPU reservation only has to leave room for the light read/tokenize/write tasks."""
    import ray

    gpus = cfg.ray.gpus_per_actor
    if gpus is None:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        gpus = (0.5 if (resolved.parameters or 0) < 1e9 else 1) if has_gpu else 0
    if gpus:
        return gpus, None
    threads = cfg.ray.threads_per_actor
    if threads is None:
        node_cpus = max((n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")), default=1)
        threads = max(1, int(node_cpus) // cfg.ray.max_actors)
    return 0, threads


def read_tasks(cfg: PipelineConfig) -> int:
    import ray

    return cfg.ray.read_tasks or max(2, int(ray.cluster_resources().get("CPU", 1)) // 4)


def map_on_actor_pool(ds, cfg: PipelineConfig, fn, make_spec, resolved: ResolvedModel, tokenize: bool = True, inputs: int | None = None):
    """Tokenize in CPU tasks (`tokenize_batch`, fused into the read tasks), then `ds.map_batches(fn)`
    on the embedding actor pool. `make_spec(num_threads)` builds the EmbedSpec passed to both."""
    from ray.data import ActorPoolStrategy

    from operators.tokenize import tokenize_batch

    gpus, threads = actor_resources(cfg, resolved)
    spec = make_spec(threads)
    if tokenize:
        ds = ds.map_batches(
            tokenize_batch, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None, num_cpus=cfg.ray.io_cpus,
            concurrency=min(read_tasks(cfg), inputs or read_tasks(cfg)),  # the same as the read: they fuse
        )
    return ds.map_batches(
        fn,
        fn_constructor_args=(spec,),
        batch_format="pyarrow",
        batch_size=cfg.ray.batch_size,
        compute=ActorPoolStrategy(min_size=cfg.ray.min_actors, max_size=cfg.ray.max_actors),
        num_cpus=cfg.ray.cpus_per_actor,
        num_gpus=gpus,
    )


def embed(cfg: PipelineConfig, plan: Plan, noop: bool = False) -> dict:
    """Run the Ray Data pipeline over `plan.todo`; return the coordinator's final state.
    noop=True replaces the model by zero vectors (the data path alone, for benchmarks)."""
    import ray

    from operators.embed import Embedder
    from operators.ray_io import CommitCoordinator, ShardDatasource, ShardedParquetSink

    init_ray(cfg)
    fs, out_dir = get_fs(cfg.output.uri, cfg.output.storage)
    staging_root = posixpath.join(out_dir, STAGING_DIR)
    if fs.exists(staging_root):  # parts of an earlier run that died: never committed, redo
        fs.rm(staging_root, recursive=True)
    staging = posixpath.join(staging_root, time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:8])
    plans = {s.uri: _stats_for(s, plan.config_fingerprint) for s in plan.todo}
    coordinator = CommitCoordinator.remote(list(plans))
    sink = ShardedParquetSink(
        coordinator, cfg.output.uri, cfg.output.storage, staging, plans,
        plan.provenance["dimension"], ARROW_FLOATS[cfg.output.dtype], plan.provenance,
    )
    # one block stream per shard, no re-splitting: the tokenize stage then fuses into the read tasks
    ds = ray.data.read_datasource(
        ShardDatasource(plan.todo, cfg.input), num_cpus=cfg.ray.io_cpus, override_num_blocks=len(plan.todo),
        concurrency=min(read_tasks(cfg), len(plan.todo)),
    )
    ds = map_on_actor_pool(
        ds, cfg, Embedder, lambda threads: EmbedSpec.from_config(cfg, plan.resolved, num_threads=threads, noop=noop), plan.resolved,
        inputs=len(plan.todo),
    )
    error = None
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.ray.io_cpus})
    except Exception as e:  # keep what was committed: record it in the manifest, then fail
        error = e
    state = ray.get(coordinator.state.remote())
    state["error"] = error
    if not error and fs.exists(staging_root):
        fs.rm(staging_root, recursive=True)
    return state


def run(cfg: PipelineConfig, noop: bool = False) -> dict:
    """Plan, embed and record. Returns the run summary; raises on failure."""
    started = time.time()
    plan = plan_run(cfg)
    logger.info(
        "model %s (%s, %d dims out, max_length %d), config fingerprint %s",
        cfg.model.name, plan.resolved.model_type, plan.provenance["dimension"], plan.resolved.max_length, plan.config_fingerprint,
    )
    fs, out_dir = get_fs(cfg.output.uri, cfg.output.storage)
    summary = {
        "output": cfg.output.uri,
        "config_fingerprint": plan.config_fingerprint,
        "shards_total": len(plan.shards),
        "shards_skipped": len(plan.done),
        "shards_embedded": 0,
        "rows_in": 0,
        "rows_written": 0,
        "rows_rejected": 0,
        "rows_truncated": 0,
        "tokens": 0,
        "padded_tokens": 0,
        "seconds": 0.0,
    }
    if not plan.todo:
        summary["seconds"] = time.time() - started
        logger.info(
            "nothing to do: all %d shards are up to date for config %s in %s; wrote nothing",
            len(plan.shards), plan.config_fingerprint, cfg.output.uri,
        )
        return summary
    logger.info("embedding %d of %d shards (%d already up to date)", len(plan.todo), len(plan.shards), len(plan.done))

    state = embed(cfg, plan, noop=noop)
    entries = load_manifest(fs, out_dir)
    entries.update(plan.done)
    entries.update({s["rel"]: s for s in state["committed"].values()})
    current = {s.rel for s in plan.shards}
    entries = {k: v for k, v in entries.items() if k in current}
    write_manifest(fs, out_dir, entries, plan.config_fingerprint)

    for stats in state["committed"].values():
        summary["shards_embedded"] += 1
        for key in ("rows_in", "rows_written", "rows_rejected", "rows_truncated", "tokens", "padded_tokens"):
            summary[key] += stats.get(key, 0)
        if stats["read_errors"]:
            logger.warning("%s: the shard could not be read to the end; see %s/_rejected/%s", stats["input"], cfg.output.uri, stats["output"])
    summary["seconds"] = time.time() - started
    commits = sorted((c["committed_at"], c["rows_in"]) for c in state["committed"].values())
    if len(commits) >= 4:  # the rate between the first and last commit: start-up left out
        summary["steady_rows_per_s"] = sum(n for _, n in commits[1:]) / max(commits[-1][0] - commits[0][0], 1e-6)
    if state["error"] is not None or state["failed"] or state["pending"]:
        problems = [f"{s}: {e}" for s, e in state["failed"].items()]
        problems += [f"{s}: {p['rows_staged']} of {p['rows_expected']} records staged, not committed" for s, p in state["pending"].items()]
        detail = "\n  ".join(problems[:20])
        raise IncompleteShardError(
            f"{len(state['committed'])} of {len(plan.todo)} shards committed; re-run to finish the rest"
            + (f"\n  {detail}" if detail else "")
        ) from state["error"]
    return summary


def padding_efficiency(s: dict) -> float:
    """Real tokens / padded tokens fed to the model (1.0: no padding)."""
    return s["tokens"] / s["padded_tokens"] if s.get("padded_tokens") else 1.0


def format_summary(s: dict) -> str:
    secs = max(s["seconds"], 1e-9)
    return (
        f"done: {s['rows_written']} rows written, {s['rows_rejected']} rejected, {s['rows_truncated']} truncated "
        f"from {s['rows_in']} rows in {s['shards_embedded']} shards ({s['shards_skipped']} up to date) "
        f"in {s['seconds']:.1f}s: {s['rows_written'] / secs:.1f} rows/s, {s['tokens'] / secs:.0f} tokens/s, "
        f"padding efficiency {padding_efficiency(s):.2f} -> {s['output']}"
    )


def cli(description: str, argv: list[str] | None, work, summarize) -> int:
    """The shared command line of the pipelines: --config/--set, the resolved config logged,
    exit 2 for problems found before work starts, 1 for a run that failed part-way."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    except (ConfigError, InputError, ModelLoadError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except IncompleteShardError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(summarize(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, argv, run, format_summary)


if __name__ == "__main__":
    sys.exit(main())
