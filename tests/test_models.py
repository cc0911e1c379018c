"""Finished generators in the MLflow Model Registry, in-process on tiny models and a local sqlite
store: a registered version loads by alias as a pyfunc model whose images are a sample job's
(same settings, same seed, same pixels), tagged with where it came from; a checkpoint URI
registers into a run of its own; the one-line errors of the module and the CLI."""

from __future__ import annotations

import io
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator import cli, models
from orchestrator.checkpoints import save_checkpoint
from orchestrator.inprocess import run_jobs
from orchestrator.storage import S3Credentials, open_storage

SECRET = "genforge-test-secret-never-logged"
REQUEST = {"num_images": 5, "seed": 3, "steps": 4}  # ...and the sample job's settings
TRAIN = {"steps": 3, "batch_size": 8, "sample_images": 2}
SPEC = {"experiment": "reg", "defaults": {"data": {"dataset": "digits", "image_size": 8}}, "jobs": [
    {"name": "ddpm", "kind": "train", "family": "ddpm", "train": TRAIN,
     "model": {"channels": 8, "channel_mult": [1], "timesteps": 40, "class_conditional": True}},
    {"name": "grid", "kind": "sample", "family": "ddpm", "from": "ddpm", "sample": REQUEST},
    {"name": "gan", "kind": "train", "family": "gan", "train": TRAIN,
     "model": {"g_width": 8, "d_width": 8}},
]}


def registry_env(patch: pytest.MonkeyPatch, tmp: Path, tracking: str) -> None:
    """The CLI's environment: the tracking server alone, no stack and no other service."""
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_", "RAY_", "GENFORGE_"))]:
        patch.delenv(key)
    patch.setenv("GENFORGE_HOME", str(tmp / "no-stack"))
    patch.setenv("MLFLOW_TRACKING_URI", tracking)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The spec's jobs run; the DDPM registered from its run as `digits@prod` (with metrics and
    S3 credentials that must not be logged), the GAN by the CLI from its job prefix."""
    tmp = tmp_path_factory.mktemp("registry")
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)  # MLflow's artifacts go to ./mlruns
        results = run_jobs(tmp, SPEC)
        runs = results["_runs"]
        ddpm = models.register(tracking, results["ddpm"]["checkpoint"], "digits", alias="prod",
                               run_id=runs["ddpm"], metrics={"fd": 12.5, "kid": 0.25},
                               s3=S3Credentials(access_key_id="AKIATEST",
                                                secret_access_key=SECRET))
        registry_env(patch, tmp, tracking)
        prefix = results["gan"]["checkpoint"].rsplit("/checkpoints/", 1)[0]
        assert cli.main(["register", prefix, "digits-gan"]) == 0
    return {"tmp": tmp, "tracking": tracking, "results": results, "ddpm": ddpm}


@pytest.fixture(scope="module")
def ddpm(made):
    return models.load("models:/digits@prod", made["tracking"])[0]


def images(answer: list[dict]) -> np.ndarray:
    return np.stack([a["image"] for a in answer])


def test_a_version_loads_by_alias_and_makes_a_sample_jobs_images(made, ddpm):
    answer = ddpm.predict(dict(REQUEST))
    assert len(answer) == 5
    got = images(answer)
    assert got.shape == (5, 8, 8, 1) and got.dtype == np.uint8
    assert [a["request"] for a in answer] == [0] * 5 and [a["seed"] for a in answer] == [3] * 5
    assert [a["label"] for a in answer] == [0, 1, 2, 3, 4]  # the classes in turn, as a job's
    assert answer[0]["sampler"] == made["results"]["grid"]["sampler"]
    assert answer[0]["sampler"]["steps"] == 4 and answer[0]["sampler"]["guidance"] == 1.5
    job = np.load(Path(made["results"]["grid"]["outputs"][0].removeprefix("file://")))["images"]
    np.testing.assert_array_equal(got, job)
    assert got.std() > 0


def test_the_same_seed_makes_the_same_images_and_another_seed_others(ddpm):
    first, again = images(ddpm.predict(dict(REQUEST))), images(ddpm.predict(dict(REQUEST)))
    other = images(ddpm.predict({**REQUEST, "seed": 4}))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_rows_are_requests_and_a_label_is_every_images_class(ddpm):
    import pandas as pd

    answer = ddpm.predict(pd.DataFrame([{"num_images": 2, "seed": 1, "steps": 2, "label": 7},
                                        {"num_images": 3, "seed": 1, "steps": 2}]))
    assert [(a["request"], a["label"]) for a in answer] == [(0, 7), (0, 7), (1, 0), (1, 1), (1, 2)]
    alone = images(ddpm.predict({"num_images": 3, "seed": 1, "steps": 2}))
    np.testing.assert_array_equal(images(answer[2:]), alone)  # a row is answered as if alone


def test_png_format_is_the_same_pixels_as_png_bytes(ddpm):
    arrays = images(ddpm.predict(dict(REQUEST)))
    pngs = [a["image"] for a in ddpm.predict({**REQUEST, "format": "png"})]
    assert all(isinstance(p, bytes) and p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(p)))[..., None] for p in pngs])
    np.testing.assert_array_equal(decoded, arrays)


@pytest.mark.parametrize("request_, message", [
    ({"sampler": "euler"}, "sampler: must be one of 'ddim', 'ancestral' for family 'ddpm' "
                           "(got 'euler')"),
    ({"label": 10}, "label: 10 but job 'ddpm' has 10 classes"),
    ({"num_images": 0}, "num_images: Input should be greater than or equal to 1 (got 0)"),
    ({"num_images": 5000}, "num_images: at most 1024 a request (got 5000)"),
    ({"format": "jpeg"}, "format: must be one of array, png (got 'jpeg')"),
])
def test_a_bad_request_is_one_line(ddpm, request_, message):
    with pytest.raises(MlflowException) as err:
        ddpm.predict(request_)
    assert err.value.message.startswith(message)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"  # the scoring server's 400


def test_the_version_is_tagged_with_its_checkpoint_and_run(made):
    client, results = MlflowClient(made["tracking"]), made["results"]
    version = client.get_model_version_by_alias("digits", "prod")
    assert str(version.version) == str(made["ddpm"].version) == "1"
    assert version.aliases == ["prod"]
    assert version.tags == {
        "genforge.checkpoint": results["ddpm"]["checkpoint"], "genforge.hash": results["ddpm"]["hash"],
        "genforge.family": "ddpm", "genforge.job": "ddpm", "genforge.step": "3",
        "genforge.fd": "12.5", "genforge.kid": "0.25"}
    run = client.get_run(results["_runs"]["ddpm"])
    assert version.run_id == run.info.run_id and run.info.status == "FINISHED"
    assert models.resolve_model_uri("models:/digits@prod", made["tracking"]) == (
        results["ddpm"]["checkpoint"], 1)
    assert models.resolve_model_uri("models:/digits/1", made["tracking"])[1] == 1


def test_a_checkpoint_uri_registers_its_newest_checkpoint_in_a_run_of_its_own(made):
    client, results = MlflowClient(made["tracking"]), made["results"]
    version = client.get_model_version("digits-gan", "1")
    assert version.tags["genforge.checkpoint"] == results["gan"]["checkpoint"]  # step-000003
    assert version.tags["genforge.family"] == "gan" and not version.aliases
    run = client.get_run(version.run_id)
    assert client.get_experiment(run.info.experiment_id).name == models.EXPERIMENT
    assert run.info.status == "FINISHED" and version.run_id not in results["_runs"].values()
    gan, _ = models.load("models:/digits-gan/1", made["tracking"])
    a, b = (images(gan.predict({"num_images": 3, "seed": s})) for s in (5, 5))
    assert a.shape == (3, 8, 8, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, images(gan.predict({"num_images": 3, "seed": 6})))
    assert [x["label"] for x in gan.predict({"num_images": 2})] == [None, None]



def model_file(made: dict, name: str, version: str, path: str) -> bytes:
    client = MlflowClient(made["tracking"])
    source = client.get_model_version(name, version).source  # models:/<logged model id>
    model = client.get_logged_model(source.removeprefix("models:/"))
    local = mlflow.artifacts.download_artifacts(f"{model.artifact_location}/{path}",
                                                tracking_uri=made["tracking"])
    return Path(local).read_bytes()


def test_a_versions_picture_is_the_grid_its_job_drew_at_that_step(made):
    prefix = made["results"]["ddpm"]["checkpoint"].removeprefix("file://").rsplit("/checkpoints/", 1)[0]
    drawn = Path(prefix, "samples", "step-000003.png").read_bytes()
    assert model_file(made, "digits", "1", "artifacts/grid.png") == drawn
    version = MlflowClient(made["tracking"]).get_model_version("digits", "1")
    assert version.description.endswith("`artifacts/grid.png` of the model: the job's grid at "
                                        "step-000003.")


def test_a_checkpoint_without_a_grid_is_pictured_by_sampling_it(made, tmp_path):
    """A checkpoint whose job drew no grid at its step: 16 images sampled from it at
    registration, at the model's defaults and seed 0, the same ones `genforge sample` makes."""
    source = made["results"]["gan"]["checkpoint"].removeprefix("file://")
    copy = open_storage(f"file://{tmp_path}/gan")
    for name in ("model.safetensors", "state.pt", "manifest.json"):
        copy.put_file(f"checkpoints/step-000003/{name}", f"{source}/{name}")
    version = models.register(made["tracking"], copy.uri(), "digits-gan")
    png = model_file(made, "digits-gan", version.version, "artifacts/grid.png")
    assert np.asarray(Image.open(io.BytesIO(png))).shape == ((4 * 9 + 1) * 8,) * 2  # 4 x 4, x8
    gan, _ = models.load(f"models:/digits-gan/{version.version}", made["tracking"])
    from workers import images as imageio

    made16 = images(gan.predict({"num_images": 16, "seed": 0}))
    assert png == imageio.png_bytes(imageio.grid(made16, scale=8))
    assert "sampled when it was registered (seed 0)" in version.description

def test_no_credential_is_logged(made):
    for path in made["tmp"].rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_the_cli_samples_a_grid(made, tmp_path, monkeypatch, capsys):
    registry_env(monkeypatch, made["tmp"], made["tracking"])
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "models:/digits@prod", "--n", "4", "--seed", "2", "--steps", "2",
                     "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == ((2 * 9 + 1) * 8,) * 2  # 2 x 2 images of 8 px 1 px apart, scaled x8
    assert capsys.readouterr().out.startswith(f"{out}: 4 images of models:/digits@prod (version 1)")


@pytest.mark.parametrize("argv, line", [
    (["sample", "models:/nope@prod"], "genforge: models:/nope@prod: no such registered model version"),
    (["sample", "models:/digits@nope"], "genforge: models:/digits@nope: no such registered model version"),
    (["sample", "models:/digits/7"], "genforge: models:/digits/7: no such registered model version"),
    (["sample", "digits"], "genforge: digits: a registered model is models:/NAME@ALIAS or "
                           "models:/NAME/VERSION"),
    (["sample", "models:/digits@prod", "--label", "12"],
     "genforge: models:/digits@prod: label: 12 but job 'ddpm' has 10 classes"),
    (["register", "0123abcd", "x"], "genforge: run 0123abcd: "),
])
def test_the_cli_says_what_is_wrong_in_one_line(made, monkeypatch, capsys, argv, line):
    registry_env(monkeypatch, made["tmp"], made["tracking"])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_a_sample_jobs_run_is_not_a_model(made, monkeypatch, capsys):
    registry_env(monkeypatch, made["tmp"], made["tracking"])
    run = made["results"]["_runs"]["grid"]
    assert cli.main(["register", run, "x"]) == 2
    assert capsys.readouterr().err == (f"genforge: run {run}: a 'sample' job's run; register a "
                                       "train or distill job's run, or a checkpoint URI\n")


def test_a_first_stage_or_a_corrupt_checkpoint_is_not_registered(tmp_path, made):
    storage = open_storage(f"file://{tmp_path}/vq")
    save_checkpoint(storage, 1, tensors={}, meta={"family": "vqgan", "model": {}})
    with pytest.raises(models.ModelError, match="holds a 'vqgan' first-stage autoencoder, which "
                                                "reconstructs images instead of generating them"):
        models.register(made["tracking"], storage.uri(), "vq")
    source = made["results"]["gan"]["checkpoint"].removeprefix("file://")
    corrupt = open_storage(f"file://{tmp_path}/gan")
    for name in ("model.safetensors", "state.pt", "manifest.json"):
        corrupt.put_file(f"checkpoints/step-000003/{name}", f"{source}/{name}")
    data = bytearray(corrupt.get_bytes("checkpoints/step-000003/model.safetensors"))
    data[-1] ^= 1
    corrupt.put_bytes("checkpoints/step-000003/model.safetensors", bytes(data))
    with pytest.raises(models.ModelError, match="model.safetensors sha256 does not match"):
        models.register(made["tracking"], corrupt.uri(), "corrupt")
    names = {m.name for m in MlflowClient(made["tracking"]).search_registered_models()}
    assert names == {"digits", "digits-gan"}


def test_the_tracking_uri_is_put_back(made):
    before, env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    models.load("models:/digits@prod", made["tracking"])
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == (before, env)
