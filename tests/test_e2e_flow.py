"""jobspecs/flow.yaml end to end on the real stack, with tiny step counts: flow matching trained,
sampled, distilled and evaluated through the same driver, tracked in MLflow, stored in S3."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from support import ROOT, example_spec, genforge, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900),
              pytest.mark.skipif(not (ROOT.parent / "shared" / "data").exists(),
                                 reason="no ../shared/data")]

EXPERIMENT = "e2e-flow"


def tiny() -> dict:
    """The example spec with its data path made absolute and every step count tiny."""
    spec = example_spec("flow", EXPERIMENT, limit=400)
    for job in spec["jobs"]:
        if job["kind"] in ("train", "distill"):
            job["train"].update(steps=4, batch_size=8, checkpoint_every=None, sample_every=None,
                                log_every=2, sample_images=4, warmup_steps=0)
        if job["kind"] == "sample":
            job["sample"]["num_images"] = 5
        if job["kind"] == "evaluate":
            job["evaluate"].update(num_samples=20, classifier={"steps": 20, "width": 8})
    return spec


def test_flow_trains_samples_distils_and_is_evaluated(tmp_path, local_stack, stack_env,
                                                      s3_client):
    out = genforge(["run", str(write_spec(tmp_path / "flow.yaml", tiny()))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    found = keys(s3_client, local_stack.bucket, f"genforge/{EXPERIMENT}/")
    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = {r.data.tags.get("genforge.job"): r for r in client.search_runs([exp.experiment_id])}
    for name in ("flow", "samples", "student", "student-samples", "score"):
        assert runs[name].info.status == "FINISHED", name
        assert runs[name].data.tags["genforge.family"] == ("-" if name == "score" else "flow")

    def result(name: str) -> dict:
        key = next(k for k in found if k.startswith(f"genforge/{EXPERIMENT}/{name}/")
                   and k.endswith("/result.json"))
        return json.loads(s3_client.get_object(Bucket=local_stack.bucket, Key=key)["Body"].read())

    for name in ("samples", "student-samples"):
        npz = next(k for k in found if k.startswith(f"genforge/{EXPERIMENT}/{name}/")
                   and k.endswith("outputs/images.npz"))
        body = s3_client.get_object(Bucket=local_stack.bucket, Key=npz)["Body"].read()
        images = np.load(io.BytesIO(body))["images"]
        assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8, name
        assert images.std() > 1.0, name  # not a blank image
    assert result("samples")["sampler"] == {"sampler": "heun", "steps": 10, "nfe": 19,
                                            "spacing": "uniform", "label": None,
                                            "guidance": 2.0, "use_ema": True}
    student = result("student-samples")["sampler"]
    assert (student["sampler"], student["steps"], student["distilled_guidance"]) == \
        ("euler", 4, 2.0)
    assert runs["student"].data.metrics["student_sampling_steps"] == 4
    assert runs["student"].data.metrics["teacher_sampling_steps"] == 32
    sources = {s["ref"]: s for s in result("score")["metrics"]["sources"]}
    assert sources["flow"]["sampler"]["nfe"] == 19 and sources["student"]["sampler"]["nfe"] == 4
    assert runs["score"].data.metrics["flow.fd"] > runs["score"].data.metrics["baseline.fd"]
