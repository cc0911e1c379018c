"""End to end on the real stack: jobspecs/quickstart.yaml through the CLI, with tiny step
counts, checked from the outside (boto3 on the bucket, MlflowClient on the server)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from support import genforge, keys

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def tiny_quickstart(tmp_path: Path, experiment: str) -> Path:
    spec = yaml.safe_load((ROOT / "jobspecs" / "quickstart.yaml").read_text())
    spec["experiment"] = experiment
    train = spec["jobs"][0]
    train["model"].update(channels=16, timesteps=100)
    train["train"].update(steps=30, batch_size=16, checkpoint_every=10, sample_every=20,
                          log_every=5, warmup_steps=5)
    spec["jobs"][1]["sample"].update(num_images=12, steps=10)
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_quickstart_end_to_end(tmp_path, local_stack, stack_env, s3_client):
    spec = tiny_quickstart(tmp_path, "e2e-quickstart")
    out = genforge(["run", str(spec)], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    bucket = local_stack.bucket
    # the links it prints open MLflow's model-training view (the page's workflowType decides)
    exp = MlflowClient(local_stack.tracking_uri).get_experiment_by_name("e2e-quickstart")
    link = next(l for l in out.stderr.splitlines() if l.startswith("pipeline run: "))
    assert link.startswith(f"pipeline run: {local_stack.tracking_uri}/#/experiments/"
                           f"{exp.experiment_id}/runs/") and link.endswith(
        "?workflowType=machine_learning")

    # checkpoints in the bucket, verified against their manifests
    ckpt_keys = keys(s3_client, bucket, "genforge/e2e-quickstart/ddpm/")
    manifests = sorted(k for k in ckpt_keys if k.endswith("manifest.json"))
    assert [m.split("/")[-2] for m in manifests] == ["step-000010", "step-000020", "step-000030"]
    latest_key = next(k for k in ckpt_keys if k.endswith("checkpoints/LATEST"))
    latest = s3_client.get_object(Bucket=bucket, Key=latest_key)["Body"].read().decode().strip()
    assert latest == "step-000030"
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key=manifests[-1])["Body"].read())
    assert manifest["step"] == 30 and manifest["meta"]["family"] == "ddpm"
    import hashlib

    for name, info in manifest["files"].items():
        body = s3_client.get_object(Bucket=bucket, Key=manifests[-1].replace("manifest.json", name))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == info["sha256"]
    from safetensors.torch import load

    weights = load(s3_client.get_object(Bucket=bucket, Key=manifests[-1].replace("manifest.json", "model.safetensors"))["Body"].read())
    assert any(k.startswith("net/") for k in weights) and any(k.startswith("ema.net/") for k in weights)

    # the sample job's outputs: finite images of the right shape and range
    out_keys = keys(s3_client, bucket, "genforge/e2e-quickstart/grid/")
    npz_key = next(k for k in out_keys if k.endswith("outputs/images.npz"))
    assert any(k.endswith("outputs/grid.png") for k in out_keys)
    images = np.load(io.BytesIO(s3_client.get_object(Bucket=bucket, Key=npz_key)["Body"].read()))["images"]
    assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8
    assert images.std() > 1.0  # not a constant image

    # MLflow: parent and child runs FINISHED, with tags, loss history and sample images
    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name("e2e-quickstart")
    runs = client.search_runs([exp.experiment_id])
    by_job = {r.data.tags.get("genforge.job"): r for r in runs}
    parent = by_job.pop(None)
    assert parent.info.status == "FINISHED"
    assert set(by_job) == {"ddpm", "grid"}
    train_run = by_job["ddpm"]
    assert train_run.info.status == "FINISHED" and by_job["grid"].info.status == "FINISHED"
    assert train_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert train_run.data.tags["genforge.family"] == "ddpm"
    assert train_run.data.tags["genforge.kind"] == "train"
    assert train_run.data.tags["genforge.attempt"] == "1"
    assert train_run.data.tags["genforge.checkpoint"].endswith("checkpoints/step-000030")
    assert train_run.data.params["train.steps"] == "30"
    history = client.get_metric_history(train_run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(m.value) for m in history)
    images_dir = [a.path for a in client.list_artifacts(train_run.info.run_id, "images")]
    assert any("samples" in p and "step+20" in p for p in images_dir)
    assert any("step+30" in p for p in images_dir)
    # the sample job's run holds its grid, the very bytes in the bucket
    grid_run = by_job["grid"].info.run_id
    assert [a.path for a in client.list_artifacts(grid_run, "outputs")] == ["outputs/grid.png"]
    logged = Path(client.download_artifacts(grid_run, "outputs/grid.png", str(tmp_path)))
    grid_key = next(k for k in out_keys if k.endswith("outputs/grid.png"))
    assert logged.read_bytes() == s3_client.get_object(Bucket=bucket, Key=grid_key)["Body"].read()
    assert by_job["grid"].data.metrics["sample_s_per_image"] > 0

    # a second run of the same spec is all cache hits and starts no run
    again = genforge(["run", str(spec)], stack_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "job 'ddpm': cached" in again.stderr and "job 'grid': cached" in again.stderr
    child_runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("genforge.job")]
    assert len(child_runs) == 2

    # sampling from a checkpoint URI works; a URI with no checkpoint, or with a checkpoint of
    # another family, is refused before anything runs: exit 2, one line naming job and field
    ckpt_uri = train_run.data.tags["genforge.checkpoint"]
    uri_spec = tmp_path / "from-uri.yaml"
    uri_spec.write_text(yaml.safe_dump({"experiment": "e2e-from-uri", "jobs": [
        {"name": "from-uri", "kind": "sample", "family": "ddpm", "from": ckpt_uri,
         "sample": {"num_images": 4, "sampler": "ancestral", "steps": 100}}]}))
    ok = genforge(["run", str(uri_spec)], stack_env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    exp2 = client.get_experiment_by_name("e2e-from-uri")
    runs2 = {r.data.tags.get("genforge.job"): r for r in client.search_runs([exp2.experiment_id])}
    assert runs2["from-uri"].info.status == "FINISHED"
    assert runs2["from-uri"].data.tags["genforge.source_checkpoint"] == ckpt_uri

    bad_spec = tmp_path / "bad-uri.yaml"
    nowhere = f"s3://{bucket}/genforge/no-such-job/0000"
    bad_spec.write_text(yaml.safe_dump({"experiment": "e2e-bad-uri", "jobs": [
        {"name": "from-nowhere", "kind": "sample", "family": "ddpm", "from": nowhere},
        {"name": "wrong-family", "kind": "sample", "family": "gan", "from": ckpt_uri}]}))
    bad = genforge(["run", str(bad_spec)], stack_env)
    assert bad.returncode == 2, bad.stderr[-3000:]
    lines = bad.stderr.strip().splitlines()
    assert any(l.startswith(f"{bad_spec}: job 'from-nowhere': from: cannot read a checkpoint at {nowhere}")
               for l in lines), lines
    assert f"{bad_spec}: job 'wrong-family': from: {ckpt_uri} is family 'ddpm', this job is 'gan'" in lines
    assert "Traceback" not in bad.stderr
    assert client.get_experiment_by_name("e2e-bad-uri") is None  # nothing ran, no run was opened
