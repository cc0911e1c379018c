"""jobspecs/gan.yaml end to end, with tiny step counts: a DCGAN trained and sampled through
the same driver, tracked in MLflow and stored in S3."""

from __future__ import annotations

import io

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from support import ROOT, genforge, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
SPEC = ROOT / "jobspecs" / "gan.yaml"


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data").exists(), reason="no ../shared/data")
def test_gan_spec(tmp_path, local_stack, stack_env, s3_client):
    spec = yaml.safe_load(SPEC.read_text())
    spec["experiment"] = "e2e-gan"
    data = spec["defaults"]["data"]
    data["path"] = str((SPEC.parent / data["path"]).resolve())  # the copy lives elsewhere
    data["limit"] = 512
    spec["jobs"][0]["train"].update(steps=20, batch_size=16, checkpoint_every=10,
                                    sample_every=10, log_every=5, sample_images=4)
    spec["jobs"][1]["sample"]["num_images"] = 6
    out = genforge(["run", str(write_spec(tmp_path / "gan.yaml", spec))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]

    found = keys(s3_client, local_stack.bucket, "genforge/e2e-gan/")
    assert sum(k.endswith("manifest.json") for k in found) == 2  # steps 10 and 20
    npz = next(k for k in found if k.endswith("outputs/images.npz"))
    images = np.load(io.BytesIO(s3_client.get_object(Bucket=local_stack.bucket, Key=npz)["Body"].read()))["images"]
    assert images.shape == (6, 28, 28, 1) and images.std() > 1.0

    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name("e2e-gan")
    runs = {r.data.tags.get("genforge.job"): r for r in client.search_runs([exp.experiment_id])}
    train = runs["dcgan"]
    assert train.info.status == "FINISHED" and train.data.tags["genforge.family"] == "gan"
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        steps = [m.step for m in client.get_metric_history(train.info.run_id, key)]
        assert steps == [5, 10, 15, 20], key
    assert 0 < train.data.metrics["d_real"] < 1 and 0 < train.data.metrics["d_fake"] < 1
    assert runs["samples"].info.status == "FINISHED"
