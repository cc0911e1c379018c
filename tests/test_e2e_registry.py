"""From run to served model on the real stack: a spec's `register:` makes a registered version
when its job finishes (and none again when the job is cached); `mlflow models serve` of
`models:/NAME@ALIAS`, on a free loopback port, answers a POST with images, the same seed the
same images; `genforge sample models:/...` draws a grid without a server; and a spec samples
`from: models:/NAME@ALIAS`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from support import genforge, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TRAIN = {"name": "ddpm", "kind": "train", "family": "ddpm",
         "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
         "data": {"dataset": "digits", "image_size": 8},
         "train": {"steps": 3, "batch_size": 8, "log_every": 1, "sample_images": 2},
         "register": {"name": "e2e-digits", "alias": "champion"}, "resources": {"cpus": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, rows: list[dict]) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", json.dumps({"dataframe_records": rows}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())["predictions"]


def test_a_registered_model_is_served_sampled_and_read_by_a_spec(tmp_path, stack_env,
                                                                 local_stack):
    spec = write_spec(tmp_path / "reg.yaml", {"experiment": "e2e-registry", "jobs": [TRAIN]})
    out = genforge(["run", str(spec)], stack_env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registered e2e-digits version 1 (@champion)" in out.stderr
    again = genforge(["run", str(spec)], stack_env)
    assert again.returncode == 0 and "already registered as e2e-digits version 1" in again.stderr
    client = MlflowClient(local_stack.tracking_uri)
    version = client.get_model_version_by_alias("e2e-digits", "champion")
    assert int(version.version) == 1 and version.tags["genforge.family"] == "ddpm"
    assert version.tags["genforge.checkpoint"].startswith(f"s3://{local_stack.bucket}/")

    port = free_port()
    env = {**stack_env, "MLFLOW_TRACKING_URI": local_stack.tracking_uri}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
         "models:/e2e-digits@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p",
         str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-2000:]
                assert time.monotonic() < deadline, "the model server did not come up"
                time.sleep(1)
        first = post(port, [{"num_images": 3, "seed": 7, "steps": 4}])
        same = post(port, [{"num_images": 3, "seed": 7, "steps": 4}])
        other = post(port, [{"num_images": 3, "seed": 8, "steps": 4}])
    finally:
        server.terminate()
        server.wait(30)
    images = np.array([row["image"] for row in first], dtype=np.uint8)
    assert images.shape == (3, 8, 8, 1) and images.std() > 0
    assert np.array_equal(images, np.array([row["image"] for row in same], dtype=np.uint8))
    assert not np.array_equal(images, np.array([row["image"] for row in other], dtype=np.uint8))

    grid = tmp_path / "grid.png"
    drawn = genforge(["sample", "models:/e2e-digits@champion", "--n", "4", "--out", str(grid)],
                     stack_env)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert Image.open(grid).size[0] > 8

    reader = write_spec(tmp_path / "read.yaml", {"experiment": "e2e-registry", "jobs": [
        {"name": "grid", "kind": "sample", "family": "ddpm", "from": "models:/e2e-digits@champion",
         "sample": {"num_images": 2, "steps": 4}, "resources": {"cpus": 1}}]})
    read = genforge(["run", str(reader)], stack_env)
    assert read.returncode == 0, read.stderr[-2000:]
    assert "job 'grid': started" in read.stderr
