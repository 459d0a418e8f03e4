"""The execution adapter: the one place an operator becomes a Ray Data stage with its resources.

Every pipeline, the benchmark and the tests run on Ray through these calls:

    init_ray(cfg)                                   a local cluster, or the one RAY_ADDRESS names
    read_shards(cfg, plan) / read_tables(blocks)    read tasks over groups of shards / in-memory rows
    tokenize(ds, cfg, prepared, inputs=...)         a small CPU pool holding the tokenizer
    embed(ds, cfg, prepared, operator, blocks=...)  the model actor pool (GPU when present)
    write_shards(ds, cfg, plan, prepared)           stage and commit one vector shard per input shard

The operators themselves (`embed.Embedder`, `vectors.NoopEmbedder`, `embed.EmbeddingMoments`,
`tokenize.TextEncoder`) know nothing of Ray. The model operators are named here by module and
class and imported on the actors, so the driver never imports torch.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import posixpath
import signal
import threading
import time
import uuid
from dataclasses import dataclass, replace

from operators.config.schema import PipelineConfig
from operators.io.storage import Shard, get_fs
from operators.model.resolution import ResolvedModel

logger = logging.getLogger("corpus_embed")


def init_ray(cfg: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    with sigterm_kept():
        _init_ray(cfg)


@contextlib.contextmanager
def sigterm_kept():
    """Keep the caller's SIGTERM handler (the command line stops a run cleanly on it: commits
    recorded, report written, lease given back) over the one ray.init installs, which ends the
    process at once."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(handler):
            signal.signal(signal.SIGTERM, handler)


def _init_ray(cfg: PipelineConfig) -> None:
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a fresh cluster, even if a `ray start` head runs on this machine.
        # Idle worker processes are kept (Ray's default keeps one per CPU and kills the rest after
        # 1 s idle): a run's actors take workers from the pool, and the read/write tasks after them
        # would otherwise start fresh Python processes mid-run, each paying its start-up in CPU.
        cpus = cfg.ray.num_cpus or os.cpu_count() or 1
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                 _system_config={"num_workers_soft_limit": 2 * cpus + 4})


# -- sizing -------------------------------------------------------------------------------------


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
    actor grow): single-threaded actors lose only their own slice when another process takes a
    core, where a multi-threaded forward stalls at every barrier (BENCHMARKS.md has the figures).
    Ray reserves half a CPU per thread, so reads, tokenization and writes still get scheduled, and
    the actors start with the run instead of joining it mid-way."""
    import ray

    r = cfg.ray
    gpus = r.gpus_per_actor
    if gpus is None:
        # the onnx and openvino engines run on CPU: their actors take no GPU share
        has_gpu = cfg.model.engine == "torch" and ray.cluster_resources().get("GPU", 0) > 0
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


def write_tasks() -> int:
    """Write tasks at once: one per CPU. Each reserves only io_cpus, so Ray Data would otherwise
    run 1/io_cpus per CPU, and the extra worker processes it starts mid-run cost more than they write."""
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 1)))


# -- the model operators, imported on the actors -------------------------------------------------


class ModelActor:
    """A model operator built on the actor from its module and class name: the driver pickles
    this stub, never the module, so it imports neither torch nor the model code."""

    target: tuple[str, str] = ("", "")

    def __init__(self, spec):
        module, name = self.target
        self.operator = getattr(importlib.import_module(module), name)(spec)

    def __call__(self, batch):
        return self.operator(batch)


class Embed(ModelActor):
    """embed.Embedder: the model, extraction and post-processing."""

    target = ("operators.model.embed", "Embedder")


class NoopEmbed(ModelActor):
    """vectors.NoopEmbedder: zero vectors, the data path's ceiling."""

    target = ("operators.model.vectors", "NoopEmbedder")


class EmbedMoments(ModelActor):
    """embed.EmbeddingMoments: one row of whitening moments per batch."""

    target = ("operators.model.embed", "EmbeddingMoments")


OPERATORS = {"embed": Embed, "noop": NoopEmbed, "moments": EmbedMoments}


# -- the stages ---------------------------------------------------------------------------------


# Ray Data merges a task's outputs into blocks of up to DataContext.target_max_block_size (128 MiB
# by default): for one giant shard, read and tokenized in one task, that is blocks of ~400,000
# rows and GBs in flight. 16 MiB is ~10,000 embedded rows a block.
MAX_BLOCK_BYTES = 16 << 20
OBJECT_STORE_PER_CPU = 256 << 20
MIN_OBJECT_STORE = 1 << 30


def object_store_budget(cfg: PipelineConfig, cpus: float) -> int:
    """The bytes of blocks in flight a run may hold (ray.object_store_mb), which set its memory
    whatever the size of the corpus or of one shard; Ray Data keeps it under its own limit."""
    if cfg.ray.object_store_mb:
        return cfg.ray.object_store_mb << 20
    return max(MIN_OBJECT_STORE, int(cpus) * OBJECT_STORE_PER_CPU)


def bound_memory(cfg: PipelineConfig) -> None:
    """Blocks of at most MAX_BLOCK_BYTES (Ray Data merges a task's outputs into 128 MiB blocks,
    which for a giant shard meant ~400,000-row blocks), and the execution's object-store budget
    (object_store_budget): without one, Ray Data lets a fast read run ahead of the writes until
    half the object store is full, so a giant shard's memory grew with its rows."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.target_max_block_size = MAX_BLOCK_BYTES
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=object_store_budget(cfg, ray.cluster_resources().get("CPU", 1)))


def read_shards(cfg: PipelineConfig, plan):
    """The shards of `plan.todo` in read tasks of several small shards or one large one
    (Plan.read_groups), each task carrying its own shards only; changed shards carry their
    previous vector file, whose ids and content hashes mark the rows to reuse."""
    import ray

    from operators.execution.ray_io import ShardDatasource

    bound_memory(cfg)
    tasks = read_tasks(cfg)
    groups = plan.read_groups(min_groups=2 * tasks)
    return ray.data.read_datasource(
        ShardDatasource(groups, cfg.input, cfg.output.storage), num_cpus=cfg.ray.io_cpus,
        override_num_blocks=len(groups), concurrency=min(tasks, len(groups)),
    )


def read_tables(blocks: list):
    """In-memory Arrow tables as a Dataset, one block each (evaluation and fit rows)."""
    import ray

    return ray.data.from_arrow(blocks)


def read_items(items: list[dict], blocks: int):
    import ray

    return ray.data.from_items(items, override_num_blocks=blocks)


def tokenize(ds, cfg: PipelineConfig, prepared, inputs: int | None = None):
    """Tokenize on CPU apart from the model: a small pool of CPU actors holding the tokenizer
    (ray.tokenize_on: actors), or tasks fused into the reads (tasks). The workers run the driver's
    tokenizer on the `tokenizers` library alone. `inputs`: the input tasks (shards)."""
    from ray.data import ActorPoolStrategy

    from operators.model.tokenize import TextEncoder, tokenize_batch

    spec = prepared.spec()
    n = min(read_tasks(cfg), inputs or read_tasks(cfg))
    if cfg.ray.tokenize_on == "actors":
        tokenizers = cfg.ray.tokenize_actors or (n if actor_plan(cfg, prepared.resolved).num_gpus else 1)
        return ds.map_batches(
            TextEncoder, fn_constructor_args=(spec, None, prepared.tokenizer), batch_format="pyarrow", batch_size=cfg.input.rows_per_block,
            compute=ActorPoolStrategy(min_size=1, max_size=min(tokenizers, inputs or tokenizers)), num_cpus=cfg.ray.io_cpus,
        )
    return ds.map_batches(
        tokenize_batch, fn_kwargs={"spec": spec, "portable": prepared.tokenizer}, batch_format="pyarrow", batch_size=cfg.input.rows_per_block,
        num_cpus=cfg.ray.io_cpus, concurrency=n,  # the same as the read's: they fuse
    )


def embed(ds, cfg: PipelineConfig, prepared, operator: str = "embed", blocks: int | None = None):
    """`ds.map_batches` on the embedding actor pool with one of OPERATORS. `blocks`: at most how
    many blocks reach the model, so a small job starts no actor that would get no work."""
    from ray.data import ActorPoolStrategy

    actors = actor_plan(cfg, prepared.resolved)
    if blocks:
        actors = replace(actors, min_size=min(actors.min_size, blocks), max_size=min(actors.max_size, blocks))
    return ds.map_batches(
        OPERATORS[operator],
        fn_constructor_args=(prepared.spec(actors.threads),),
        batch_format="pyarrow",
        batch_size=cfg.ray.rows_per_call,
        compute=ActorPoolStrategy(min_size=actors.min_size, max_size=actors.max_size, max_tasks_in_flight_per_actor=actors.tasks_in_flight),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
    )


def write_shards(ds, cfg: PipelineConfig, plan, prepared):
    """Commit each shard's vector file as soon as all its rows have arrived, from memory when a
    write task holds it whole, else through parts staged under `_staging/<run>/`
    (ray_io.ShardedParquetSink). Returns the WriteOutcome: what was committed, failed and left
    pending, and why the dataset stopped, if it did. Raises nothing for a failed dataset: the
    committed shards stand and the caller records them."""
    from operators.execution.ray_io import ShardedParquetSink, committed_from_footers, start_coordinator
    from operators.io.writers import STAGING_DIR
    from operators.model.vectors import ARROW_FLOATS

    fs, out_dir = get_fs(plan.out_uri, cfg.output.storage)
    staging = posixpath.join(out_dir, STAGING_DIR, time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:8])
    sink = ShardedParquetSink(
        start_coordinator(), plan.out_uri, cfg.output.storage, staging,
        prepared.dimension, ARROW_FLOATS[cfg.output.dtype], prepared.provenance, cfg.input.duplicate_ids,
    )
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.ray.io_cpus}, concurrency=min(write_tasks(), plan.blocks))
    except Exception as e:  # the sink's on_write_failed has recorded it, unless it failed before the write began
        if sink.outcome is None and sink.stopped is None:
            sink.on_write_failed(e)
    outcome = sink.outcome
    if outcome is None:  # the coordinator was lost: what was committed is in the vector files' footers
        outcome = committed_from_footers(fs, out_dir, (plan.stats_for(s) for s in plan.todo))
        outcome.error = sink.stopped
    for shard in plan.todo:  # shards none of whose rows reached the writer
        key = shard.public_uri
        if key not in outcome.committed and key not in outcome.failed and key not in outcome.pending:
            outcome.pending[key] = {"rows_staged": 0, "rows_expected": None}
    if outcome.error is not None:
        # the failed dataset's frames and exceptions form reference cycles that keep its actor
        # pools alive, CPUs reserved, until the cyclic collector runs: a run after this one in the
        # same process (a retry loop, a service) would wait for them forever
        gc.collect()
    return outcome


def iter_tables(ds):
    """The dataset's output as Arrow tables, one per block, as they arrive."""
    return ds.iter_batches(batch_format="pyarrow", batch_size=None)


def vectors_of(table):
    """A table's `embedding` column as a float32 matrix."""
    import numpy as np

    col = table.column("embedding").combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), col.type.list_size)


def ray_embed_fn(cfg: PipelineConfig, prepared):
    """An evaluation embedding function (evaluation.EmbedFn) on Ray: the texts in one dataset,
    read -> tokenize -> embed on the same actor pools as the corpus pipeline, yielding each
    block's (keys, vectors) as it arrives. With `prepared.heads` (a sweep) the model actors
    tokenize themselves: the heads need each token's special flag, which the tokenize stage does
    not ship."""
    from operators.io.readers import text_rows

    def embed_fn(keys: list[str], texts: list[str]):
        init_ray(cfg)
        rows = text_rows(keys, texts, shard="eval")
        step = cfg.rows_per_call  # one block per actor call, no shuffle stage
        blocks = [rows.slice(i, step) for i in range(0, len(texts), step)]
        ds = read_tables(blocks)
        if not prepared.heads:
            ds = tokenize(ds, cfg, prepared, inputs=len(blocks))
        ds = embed(ds, cfg, prepared, blocks=len(blocks))
        for table in iter_tables(ds):
            yield table.column("id").to_pylist(), vectors_of(table)

    return embed_fn
