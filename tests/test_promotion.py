"""A pipeline's `register:` and `promote:` (the driver's side, without Ray), on real checkpoints
of tiny models and a sqlite MLflow registry: a finished train job becomes a version once (a
cached rerun moves its alias, registers nothing new); an evaluation moves `champion` to its
best-scoring version only if that beats the holder, and says so on its run; `from:
models:/NAME@ALIAS` plans to the exact checkpoint of the version the alias names then."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.inprocess import run_jobs
from orchestrator.plan import resolve_checkpoint
from orchestrator.spec import SpecError, parse_spec
from support import offline_driver

TINY = {"name": "a", "kind": "train", "family": "ddpm", "data": {"dataset": "digits", "image_size": 8},
        "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
        "train": {"steps": 2, "batch_size": 8, "sample_images": 2}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny DDPMs' results (real file:// checkpoints)."""
    tmp = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        results = run_jobs(tmp, {"experiment": "p", "jobs": [
            TINY, dict(TINY, name="b", train={**TINY["train"], "seed": 1})]})
    return results["a"], results["b"]


def registered(driver, name: str, result: dict) -> None:
    state = driver.jobs[name]
    state.result = result
    driver._cache_hit(state, result)


def test_a_job_registers_once_and_an_evaluation_promotes_the_better(tmp_path, trained, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go to ./mlruns
    jobs = [dict(TINY, register={"name": "digits", "alias": "candidate"}),
            dict(TINY, name="b", train={**TINY["train"], "seed": 1},
                 register={"name": "digits"}),
            {"name": "score", "kind": "evaluate", "from": ["a", "b"],
             "data": {"dataset": "digits", "image_size": 8},
             "promote": {"name": "digits", "alias": "champion"}}]
    driver = offline_driver(tmp_path, jobs)
    client = MlflowClient(driver.settings.tracking_uri)
    registered(driver, "a", trained[0])
    registered(driver, "b", trained[1])
    a = client.get_model_version_by_alias("digits", "candidate")
    assert int(a.version) == 1 and a.tags["genforge.hash"] == driver.jobs["a"].planned.hash
    assert a.tags["genforge.checkpoint"] == trained[0]["checkpoint"]
    registered(driver, "a", trained[0])  # a rerun: cached, nothing new registered
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'digits'")) == [1, 2]
    assert driver.registry_errors == []

    driver.runs.launch(driver.jobs["score"].planned)

    def evaluate(fd_a: float, fd_b: float) -> str:
        state = driver.jobs["score"]
        state.result = {"metrics": {"sources": [{"ref": "a", "metrics": {"fd": fd_a}},
                                                {"ref": "b", "metrics": {"fd": fd_b}}]}}
        driver._publish_model(state)
        for sent in driver.runs._sent:  # the run's tags, sent from the tracking threads
            sent.result()
        return client.get_run(driver.runs["score"].id).data.tags["genforge.promote"]

    assert evaluate(30.0, 20.0) == "digits@champion: version 2 (fd 20) takes it"
    assert int(client.get_model_version_by_alias("digits", "champion").version) == 2
    assert client.get_model_version("digits", "1").tags["genforge.eval.fd"] == "30.0"
    assert evaluate(25.0, 40.0) == ("digits@champion: version 1 (fd 25) takes it; was version 2 "
                                    "(fd 40)")  # scored again here, worse now
    assert evaluate(25.0, 40.0) == "digits@champion: version 1 (fd 25) keeps it"
    # the holder's own score stands against versions it was not scored with
    client.set_model_version_tag("digits", "1", "genforge.eval.fd", "10.0")
    state = driver.jobs["score"]
    state.result = {"metrics": {"sources": [{"ref": "b", "metrics": {"fd": 15.0}}]}}
    driver._publish_model(state)
    assert int(client.get_model_version_by_alias("digits", "champion").version) == 1


def test_a_registered_version_is_read_as_its_exact_checkpoint(tmp_path, trained, monkeypatch):
    from orchestrator import models

    monkeypatch.chdir(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'm.db'}"
    models.register(tracking, trained[0]["checkpoint"], "digits", alias="prod")
    resolved = resolve_checkpoint("models:/digits@prod", None, tracking)
    assert resolved.uri == trained[0]["checkpoint"] and resolved.meta["family"] == "ddpm"
    assert resolved == resolve_checkpoint(trained[0]["checkpoint"])  # same digest, same hash
    with pytest.raises(models.ModelError, match="models:/digits@nope: no such registered model"):
        resolve_checkpoint("models:/digits@nope", None, tracking)
    sample = {"experiment": "p", "jobs": [{"name": "grid", "kind": "sample", "family": "ddpm",
                                           "from": "models:/digits@prod"}]}
    assert parse_spec(sample, "s.yaml").jobs[0].sources == ["models:/digits@prod"]
    sample["jobs"][0]["from"] = "http://x/y"
    with pytest.raises(SpecError):
        from orchestrator.plan import build_plan
        build_plan(parse_spec(sample, "s.yaml"))
