"""Where the benchmark's scale points run: the local machine, or a Ray cluster of several nodes on
this machine (ray.cluster_utils.Cluster), with the corpus and outputs on S3 served by moto on
127.0.0.1, and worker nodes killed and replaced while a point runs (chaos)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading

logger = logging.getLogger("corpus_embed.benchmark")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScaleCluster:
    """Where the scale points run: the local machine, or (--nodes N) a Ray cluster of N nodes on
    this machine (ray.cluster_utils.Cluster: a head and N-1 workers, the CPUs split between them),
    with (--s3) the corpus and outputs on S3 served by moto on 127.0.0.1, and (--kill-every S) a
    worker node removed and a fresh one added every S seconds while a point runs, as Ray Data's
    chaos release tests do. A point that fails under chaos is re-run until it finishes (at most 3
    more times). `run_point(point, extra_args)` runs one point (in a process of its own) and raises
    RuntimeError when it fails; `args` holds the --nodes, --s3, --kill-every and --workdir settings."""

    def __init__(self, args):
        self.args = args
        self.cluster = self.moto = None
        self.workdir = args.workdir or ""
        self.address: str | None = None

    def __enter__(self) -> "ScaleCluster":
        a = self.args
        if a.s3:
            import boto3
            from moto.server import ThreadedMotoServer

            port = free_port()
            os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
            self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
            self.moto.start()
            boto3.client("s3").create_bucket(Bucket="scale")
            self.workdir = "s3://scale/bench"
        elif not self.workdir:
            self.workdir = self._tmp = tempfile.mkdtemp(prefix="corpus-embed-scale-")
        if a.nodes > 1:
            from ray.cluster_utils import Cluster

            cpus = max(1, (os.cpu_count() or 2) // a.nodes)
            self.cpus = cpus
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus})
            for _ in range(a.nodes - 1):
                self.cluster.add_node(num_cpus=cpus)
            self.cluster.wait_for_nodes()
            self.address = self.cluster.address
        return self

    def __exit__(self, *exc) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
        if self.moto is not None:
            self.moto.stop()
        if getattr(self, "_tmp", None):
            shutil.rmtree(self._tmp, ignore_errors=True)

    def run(self, run_point, point: dict) -> dict:
        """`run_point` on this cluster (its address as an extra --set), under chaos when asked."""
        extra = ["--set", f"ray.address={self.address}"] if self.address else []
        if not (self.args.kill_every and self.cluster is not None):
            return run_point(point, extra)
        # the point runs in a thread; this (main) thread kills nodes: Ray adds nodes from the main thread only
        box: dict = {}
        runner = threading.Thread(target=lambda: box.update(self._until_finished(run_point, point, extra)), daemon=True)
        runner.start()
        killed = 0
        while runner.is_alive():
            runner.join(self.args.kill_every)
            if runner.is_alive():
                killed += self._kill_a_worker()
        if "error" in box:
            raise box["error"]
        return dict(box["result"], attempts=box["attempts"], attempt_errors=box["errors"], nodes_killed=killed)

    @staticmethod
    def _until_finished(run_point, point: dict, extra: list[str]) -> dict:
        errors = []
        for attempt in range(1, 5):
            try:
                return {"result": run_point(dict(point, again=attempt > 1), extra), "attempts": attempt, "errors": errors}
            except RuntimeError as e:
                errors.append(str(e).splitlines()[0])
        return {"error": RuntimeError(f"scale point {point} did not finish in 4 attempts: {errors}")}

    def _kill_a_worker(self) -> int:
        import random

        if not self.cluster.worker_nodes:
            return 0
        self.cluster.remove_node(random.choice(list(self.cluster.worker_nodes)), allow_graceful=False)
        self.cluster.add_node(num_cpus=self.cpus)
        logger.info("chaos: killed a worker node and added a fresh one")
        return 1
