"""The execution adapter: the actor pool's sizing, the read-block estimate, the object-store budget."""

from __future__ import annotations

from operators.execution.stages import MIN_OBJECT_STORE, OBJECT_STORE_PER_CPU, ActorPlan, actor_plan, estimated_blocks, object_store_budget


def test_cpu_actor_pool_defaults_to_single_threaded_actors(ray_local):
    from operators.config.loading import load_config
    from operators.model.resolution import resolve_model

    cfg = load_config(None, [])
    resolved = resolve_model(cfg.model, cfg.extraction)
    plan = lambda *sets: actor_plan(load_config(None, list(sets)), resolved)  # noqa: E731
    # 2-CPU local cluster: a fixed pool of two 1-thread actors, half a CPU reserved each
    assert plan() == ActorPlan(min_size=2, max_size=2, num_cpus=0.5, num_gpus=0, threads=1, tasks_in_flight=1)
    assert plan("ray.max_actors=1") == ActorPlan(1, 1, 1.0, 0, 2, 1)  # one actor gets both cores' threads
    assert plan("ray.threads_per_actor=2") == ActorPlan(1, 1, 1.0, 0, 2, 1)
    assert plan("ray.min_actors=1", "ray.cpus_per_actor=0.25") == ActorPlan(1, 2, 0.25, 0, 1, 1)
    assert plan("ray.gpus_per_actor=0.5", "ray.max_actors=4") == ActorPlan(1, 4, 1.0, 0.5, None)


def test_block_estimate_bounds_the_pool_for_small_jobs():
    from operators.io.storage import Shard

    def shard(size, compression=None):
        return Shard(uri="x", rel="x", format="jsonl", compression=compression, fingerprint={"size": size})

    assert estimated_blocks(shard(0), 1024) == 1
    assert estimated_blocks(shard(5_000), 1024) == 1  # a test-sized shard: one actor is enough
    assert estimated_blocks(shard(1024 * 32 * 3), 1024) == 3
    assert estimated_blocks(shard(1024 * 32 * 3 + 1), 1024) == 4
    assert estimated_blocks(shard(1024 * 4 * 3, "gzip"), 1024) == 3  # compressed: many more rows per byte


def test_object_store_budget_follows_the_cluster_not_the_corpus():
    from operators.config.loading import load_config

    cfg = load_config(None, [])
    assert object_store_budget(cfg, 2) == MIN_OBJECT_STORE == 1 << 30  # a small node: the floor
    assert object_store_budget(cfg, 64) == 64 * OBJECT_STORE_PER_CPU == 16 << 30
    assert object_store_budget(load_config(None, ["ray.object_store_mb=300"]), 64) == 300 << 20
