"""corpus-embed operators: readers, writers, extraction and the embedding actor.

Plain functions and callable classes over Arrow batches; only `operators.ray_io` and the
`pipelines/` scripts know about Ray.
"""

__version__ = "0.1.0"
