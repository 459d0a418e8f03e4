"""The deployment files in infra/: they parse, run the real entrypoint with a real config, carry
the settings a nightly cluster run needs, and hold no secrets.
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from operators.config.loading import load_config
from tests.helpers import REPO

INFRA = REPO / "infra"
KUBERAY = sorted((INFRA / "kuberay").glob("*.yaml"))
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)
SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*\S+|-----BEGIN [A-Z ]*PRIVATE KEY-----", re.I)


def load(path):
    return yaml.safe_load(path.read_text())


def walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def check_entrypoint(entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "pipelines/embed_corpus.py"]
    assert (REPO / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    cfg = load_config(REPO / config)  # a complete, valid config
    assert cfg.output.versioned and cfg.gate.tasks and {s.kind for s in cfg.sinks} == {"lancedb", "qdrant", "milvus"}


def cluster_specs(doc):
    return [n for n in walk(doc) if isinstance(n, dict) and "headGroupSpec" in n]


def test_kuberay_manifests_parse_and_cover_the_kinds():
    kinds = {load(p)["kind"]: p for p in KUBERAY}
    assert {"RayCluster", "RayJob", "RayCronJob"} <= set(kinds)
    for p in KUBERAY:
        assert load(p)["apiVersion"] == "ray.io/v1"


def test_rayjob_and_cronjob_run_the_nightly_entrypoint_and_clean_up():
    job = load(INFRA / "kuberay" / "rayjob.yaml")["spec"]
    cron = load(INFRA / "kuberay" / "raycronjob.yaml")["spec"]
    assert re.fullmatch(r"[\d*/,-]+( [\d*/,-]+){4}", cron["schedule"])
    for spec in (job, cron["jobTemplate"]):
        check_entrypoint(spec["entrypoint"])
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_clusters_have_autoscaled_gpu_workers(path):
    (spec,) = cluster_specs(load(path))
    gpu = [g for g in spec["workerGroupSpecs"] if any("nvidia.com/gpu" in str(c.get("resources")) for c in g["template"]["spec"]["containers"])]
    assert gpu, "no GPU worker group"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("path", [*KUBERAY, INFRA / "cluster-launcher.yaml", INFRA / "Dockerfile", REPO / "configs" / "nightly.yaml"], ids=lambda p: p.name)
def test_no_secrets_inline(path):
    text = path.read_text()
    assert not SECRET_VALUE.search(text)
    if path.suffix == ".yaml":
        for node in walk(yaml.safe_load(text)):
            if isinstance(node, dict) and "name" in node and SECRET_NAME.search(str(node["name"])) and ("value" in node or "valueFrom" in node):
                assert "value" not in node, f"{node['name']} set inline"
                assert "secretKeyRef" in node["valueFrom"], f"{node['name']} must come from a Kubernetes secret"


def test_env_credentials_come_from_a_secret():
    for p in KUBERAY:
        refs = [n for n in walk(load(p)) if isinstance(n, dict) and "secretKeyRef" in n]
        assert refs, f"{p.name}: S3 credentials are expected from secretKeyRef"


def test_cluster_launcher_and_dockerfile():
    launcher = load(INFRA / "cluster-launcher.yaml")
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types and launcher["provider"]["type"] == "aws"
    assert any(t.get("max_workers", 0) > 0 and t["node_config"]["InstanceType"].startswith("g") for t in types.values())
    docker = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:", docker, re.M) and "FROM ${RAY_IMAGE}" in docker
    assert "COPY pipelines" in docker and re.search(r'pip install .*"\.\[', docker)
