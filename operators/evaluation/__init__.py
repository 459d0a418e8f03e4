"""Evaluation: the benchmark tasks and their sources (eval_data, mteb_tasks), the reference
metrics (metrics), scoring a configuration (scoring), sweeps of many (sweep, sweep_reports) and
throughput measurement (throughput). Embedding is passed in as a function, so nothing here imports
the execution adapter.

May import: config, io, model, methods.
"""
