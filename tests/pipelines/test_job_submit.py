"""`ray job submit --working-dir . -- python pipelines/embed_corpus.py --config ...` against a
head started with `ray start --head`, exactly as the README documents it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import REPO, _free_port
from tests.pipelines.test_embed_corpus import make_corpus


def test_ray_job_submit_against_a_local_head(tmp_path, tiny_bert):
    bin_dir = str(Path(sys.executable).parent)
    # `python` in the entrypoint is this venv's. Ray >= 2.52 turns on token authentication for
    # new local clusters (token in ~/.ray/auth_token); the job CLI needs RAY_AUTH_MODE=token to use it.
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = _free_port(), _free_port()
    head = subprocess.Popen(
        [
            os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={gcs_port}",
            "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}", "--disable-usage-stats",
            # own ports for the agents too: the session's local Ray already holds the defaults
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        address = f"http://127.0.0.1:{dash_port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (401 without a token): it is up
                break
            except OSError:
                assert head.poll() is None, head.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "the Ray head did not come up"
                time.sleep(1)

        corpus = make_corpus(tmp_path / "in", shards=2, rows=20)
        cfg = tmp_path / "job.yaml"
        cfg.write_text(yaml.safe_dump({
            "input": {"uri": str(corpus)},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"name": tiny_bert},
        }))
        for attempt in range(30):
            job = subprocess.run(
                [
                    os.path.join(bin_dir, "ray"), "job", "submit", f"--address={address}", "--working-dir", ".",
                    "--", "python", "pipelines/embed_corpus.py", "--config", str(cfg),
                ],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
            )
            log = job.stdout + job.stderr
            if "No available agent" not in log:  # the head's job agent is still starting
                break
            time.sleep(2)
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log
        assert "done: 40 rows written, 0 rejected" in log
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert sum(e["rows_written"] for e in manifest["shards"]) == 40
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
