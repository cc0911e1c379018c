"""jobspecs/vqgan-ar.yaml and jobspecs/ldm.yaml end to end on the real stack, with tiny step
counts: two-stage families chained through the same driver, tracked in MLflow, stored in S3."""

from __future__ import annotations

import io

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from support import ROOT, example_spec, genforge, keys, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900),
              pytest.mark.skipif(not (ROOT.parent / "shared" / "data").exists(),
                                 reason="no ../shared/data")]


def tiny(name: str, experiment: str, first: str, second: str) -> dict:
    """The example spec with its data path made absolute and every step count tiny."""
    spec = example_spec(name, experiment, limit=400)
    jobs = {j["name"]: j for j in spec["jobs"]}
    jobs[first]["model"]["disc_start"] = 4  # the discriminator takes part
    jobs[first]["train"].update(steps=8, batch_size=8, checkpoint_every=4, sample_every=None,
                                log_every=2, sample_images=4)
    jobs[second]["train"].update(steps=6, batch_size=8, checkpoint_every=None, log_every=2,
                                 sample_images=4, warmup_steps=0)
    for job in spec["jobs"]:
        if job["kind"] == "sample":
            job["sample"]["num_images"] = 5
        if job["kind"] == "evaluate":
            job["evaluate"].update(num_samples=20, classifier={"steps": 20, "width": 8})
    return spec


def images_at(s3, bucket: str, key: str) -> np.ndarray:
    return np.load(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))["images"]


def check_pipeline(local_stack, s3_client, experiment: str, jobs: dict[str, str]) -> dict:
    """Every job FINISHED with its family tag; every sample job's images in the bucket."""
    found = keys(s3_client, local_stack.bucket, f"genforge/{experiment}/")
    client = MlflowClient(local_stack.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = {r.data.tags.get("genforge.job"): r for r in client.search_runs([exp.experiment_id])}
    for name, family in jobs.items():
        assert runs[name].info.status == "FINISHED", name
        assert runs[name].data.tags["genforge.family"] == family
        if runs[name].data.tags["genforge.kind"] == "sample":
            npz = next(k for k in found if k.startswith(f"genforge/{experiment}/{name}/")
                       and k.endswith("outputs/images.npz"))
            images = images_at(s3_client, local_stack.bucket, npz)
            assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8, name
            assert images.std() > 1.0, name  # not a blank image
    return {"keys": found, "runs": runs, "client": client}


def test_vqgan_then_transformer(tmp_path, local_stack, stack_env, s3_client):
    spec = tiny("vqgan-ar", "e2e-vqgan-ar", "vqgan", "transformer")
    out = genforge(["run", str(write_spec(tmp_path / "vqgan-ar.yaml", spec))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = check_pipeline(local_stack, s3_client, "e2e-vqgan-ar", {
        "vqgan": "vqgan", "reconstructions": "vqgan", "transformer": "autoregressive",
        "samples": "autoregressive", "score": "-"})
    found, runs, client = seen["keys"], seen["runs"], seen["client"]
    vq_manifests = [k for k in found if "/vqgan/" in k and k.endswith("manifest.json")]
    assert len(vq_manifests) == 2  # steps 4 and 8
    assert any("/encoded/" in k and k.endswith("-codes.npy") for k in
               keys(s3_client, local_stack.bucket, "genforge/datasets/"))
    vq = runs["vqgan"].data.metrics
    assert 0 < vq["holdout_codebook_usage"] <= 1 and vq["holdout_psnr"] > 5
    assert "d_loss" in vq and "perplexity" in vq
    ar = runs["transformer"].data
    assert ar.tags["genforge.encoded_cache"] == "miss"
    assert [m.step for m in client.get_metric_history(runs["transformer"].info.run_id, "loss")] == [2, 4, 6]
    assert ar.metrics["tokens_per_s"] > 0 and ar.metrics["perplexity"] > 1
    assert runs["samples"].data.metrics["tokens_per_s"] > 0
    assert runs["score"].data.metrics["transformer.fd"] > runs["score"].data.metrics["baseline.fd"]


def test_autoencoder_then_latent_diffusion(tmp_path, local_stack, stack_env, s3_client):
    spec = tiny("ldm", "e2e-ldm", "autoencoder", "diffusion")
    next(j for j in spec["jobs"] if j["name"] == "samples")["sample"]["steps"] = 5
    next(j for j in spec["jobs"] if j["name"] == "score")["evaluate"]["sample"]["steps"] = 5
    out = genforge(["run", str(write_spec(tmp_path / "ldm.yaml", spec))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = check_pipeline(local_stack, s3_client, "e2e-ldm", {
        "autoencoder": "ldm", "reconstructions": "ldm", "diffusion": "ldm", "samples": "ldm",
        "score": "-"})
    runs = seen["runs"]
    assert runs["autoencoder"].data.metrics["holdout_psnr"] > 5
    assert float(runs["diffusion"].data.tags["genforge.latent_scale"]) > 0
    assert runs["score"].data.metrics["diffusion.fd"] > runs["score"].data.metrics["baseline.fd"]
    assert any(k.startswith("genforge/e2e-ldm/diffusion/") and k.endswith("manifest.json")
               for k in seen["keys"])
