"""jobspecs/evaluate.yaml end to end on the real stack, with tiny step counts: two models
trained, evaluated against the held-out split, and `genforge compare` printing both rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from support import ROOT, example_spec, genforge, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900),
              pytest.mark.skipif(not (ROOT.parent / "shared" / "data").exists(),
                                 reason="no ../shared/data")]


def test_evaluate_and_compare(tmp_path, local_stack, stack_env, s3_client):
    spec = example_spec("evaluate", "e2e-evaluate", limit=600)
    for job in spec["jobs"]:
        if job["kind"] == "train":
            job["train"].update(steps=6, batch_size=16, checkpoint_every=None, log_every=2,
                                sample_images=4, warmup_steps=0)
        else:
            job["evaluate"].update(num_samples=40, classifier={"steps": 40, "width": 8})
    spec["jobs"][-1]["evaluate"]["sample"]["steps"] = 3
    spec["jobs"][-2]["evaluate"]["per_source"]["ddpm"]["steps"] = 5
    out = genforge(["run", str(write_spec(tmp_path / "evaluate.yaml", spec))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]

    found = keys(s3_client, local_stack.bucket, "genforge/e2e-evaluate/")
    metrics_key = next(k for k in found if k.startswith("genforge/e2e-evaluate/score/")
                       and k.endswith("outputs/metrics.json"))
    results = json.loads(s3_client.get_object(Bucket=local_stack.bucket, Key=metrics_key)["Body"].read())
    assert [s["ref"] for s in results["sources"]] == ["dcgan", "ddpm"]
    assert results["sources"][1]["sampler"]["steps"] == 5
    assert results["baseline"]["fd"] < min(s["metrics"]["fd"] for s in results["sources"])
    assert any("/classifier/" in k for k in keys(s3_client, local_stack.bucket, "genforge/datasets/"))

    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name("e2e-evaluate")
    runs = {r.data.tags.get("genforge.job"): r for r in client.search_runs([exp.experiment_id])}
    assert runs["score"].info.status == "FINISHED" and runs["score"].data.tags["genforge.kind"] == "evaluate"
    assert {"baseline.fd", "dcgan.fd", "ddpm.kid", "ddpm.s_per_image",
            "classifier_test_accuracy"} <= set(runs["score"].data.metrics)

    # both registered, and the one with the lower FD is the champion
    scores = {s["ref"]: s["metrics"]["fd"] for s in results["sources"]}
    best = min(scores, key=scores.get)
    champion = client.get_model_version_by_alias("fashion-generator", "champion")
    assert champion.tags["genforge.job"] == best
    assert runs["score"].data.tags["genforge.promote"].startswith(
        f"fashion-generator@champion: version {champion.version} (fd ")
    assert {runs[j].data.tags["genforge.registered"] for j in ("dcgan", "ddpm")} == {
        "fashion-generator/1", "fashion-generator/2"}

    table = genforge(["compare", "e2e-evaluate", "--plot", str(tmp_path / "q.png"),
                      "--grids", str(tmp_path / "grids.png")], stack_env)
    assert table.returncode == 0, table.stderr[-3000:]
    lines = table.stdout.strip().splitlines()
    rows = [l.split() for l in lines[2:]]
    assert [(r[0], r[1]) for r in rows if r[1] in ("dcgan", "ddpm")] == [
        ("score", "dcgan"), ("score", "ddpm"), ("score-ddim-10", "ddpm")]
    assert sum(l.split()[1] == "real" for l in lines[2:]) == 2  # one baseline per evaluation
    assert "ddim 5 steps" in table.stdout and "ddim 3 steps" in table.stdout
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    parent = runs["score"].data.tags["mlflow.parentRunId"]  # the table, beside its pipeline
    # ...with the models' samples side by side, and the pipeline's picture
    assert {"comparison.md", "comparison.json", "comparison.png", "pipeline.png"} <= {
        a.path for a in client.list_artifacts(parent)}
    grids = np.asarray(Image.open(tmp_path / "grids.png"))
    assert grids.shape[0] > 400 and grids.shape[1] > 3 * 250  # two evaluations, up to 3 panels

    missing = genforge(["compare", "no-such-experiment"], stack_env)
    assert missing.returncode == 1 and "no experiment named 'no-such-experiment'" in missing.stderr
