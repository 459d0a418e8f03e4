"""Storage and IO: filesystems, atomic writes and shard listing (storage), the local build-once
cache (cache), pinned public sources and the mirror (sources), input readers (readers), vector
shards and the manifest (writers, manifest), incremental state and deletions (incremental), and
the vector-store sinks (sinks: the contract; stores: LanceDB, Qdrant, Milvus).

May import: config, methods. Never the model, the execution adapter, evaluation or the run.
"""
