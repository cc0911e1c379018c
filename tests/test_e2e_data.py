"""Streaming data end to end on the real stack: a folder of JPEGs under an s3:// prefix on the
S3 server, staged in parallel into many small shards (GENFORGE_SHARD_MB), trains a DDPM with
random flips through `genforge run`, streaming a few shards at a time; `genforge data ls`
shows the staged set with its reader."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from support import genforge, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_a_jpeg_folder_on_s3_streams_from_shards(tmp_path, local_stack, stack_env, s3_client):
    rng = np.random.default_rng(0)
    for i in range(1200):  # 10 classes of 16x16 RGB JPEGs
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
        s3_client.put_object(Bucket=local_stack.bucket, Key=f"jpegs/c{i % 10}/{i:05d}.jpg",
                             Body=buf.getvalue())
    spec = {"experiment": "e2e-stream", "jobs": [{
        "name": "ddpm", "kind": "train", "family": "ddpm",
        "model": {"channels": 8, "channel_mult": [1, 2], "timesteps": 100},
        "data": {"dataset": "folder", "path": f"s3://{local_stack.bucket}/jpegs", "image_size": 16,
                 "channels": 3, "augment": {"hflip": True}},
        "train": {"steps": 24, "batch_size": 64, "checkpoint_every": 12, "log_every": 6,
                  "sample_images": 4},
        "resources": {"cpus": 1}}]}
    env = {**stack_env, "GENFORGE_SHARD_MB": str(768 * 40 / 2**20)}  # 40 images a shard
    out = genforge(["run", str(write_spec(tmp_path / "s.yaml", spec))], env)
    assert out.returncode == 0, out.stderr[-3000:]

    staged = keys(s3_client, local_stack.bucket, "genforge/datasets/")
    (reader,) = [k for k in staged if "/readers/e2e-stream--ddpm--" in k]  # of other tests' too
    folder = reader.split("/readers/")[0]
    staged = [k for k in staged if k.startswith(folder + "/")]
    index_key = f"{folder}/index.json"
    index = json.loads(s3_client.get_object(Bucket=local_stack.bucket, Key=index_key)["Body"].read())
    assert index["count"] == 1080 and index["shape"] == [16, 16, 3] and index["labelled"]
    assert len(index["shards"]) == 27 and sum(k.count("/shards/train-") for k in staged) == 27

    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name("e2e-stream")
    (run,) = client.search_runs([exp.experiment_id], "tags.`genforge.job` = 'ddpm'")
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [6, 12, 18, 24] and all(np.isfinite(m.value) for m in losses)

    listing = genforge(["data", "ls"], stack_env)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.split()[1:2] == ["1080"])
    assert row.split()[2:4] == ["16x16x3", "27"] and row.endswith("e2e-stream/ddpm")
