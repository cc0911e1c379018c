"""The command line and the driver's failure paths that need no services: `--force` in any
order, storage or Ray that cannot be reached (exit 2, one line), a worker that Ray cannot
reach (killed before the job is launched again)."""

from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorUnavailableError

from orchestrator import cli
from support import ROOT, offline_driver, write_spec

QUICKSTART = str(ROOT / "jobspecs" / "quickstart.yaml")


@pytest.mark.parametrize("argv, spec, force", [
    (["run", QUICKSTART], QUICKSTART, None),
    (["run", QUICKSTART, "--force"], QUICKSTART, [[]]),
    (["run", "--force", QUICKSTART], QUICKSTART, [[]]),
    (["run", "--force", "ddpm", QUICKSTART], QUICKSTART, [["ddpm"]]),
    (["run", "--force", "ddpm", "--force", "grid", QUICKSTART], QUICKSTART, [["ddpm"], ["grid"]]),
    (["run", QUICKSTART, "--force", "ddpm", "--force"], QUICKSTART, [["ddpm"], []]),
])
def test_force_composes_with_the_spec_in_any_order(argv, spec, force):
    args = cli.parse(argv)
    assert (args.spec, args.force) == (spec, force)


def test_run_without_a_spec_says_so(capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse(["run", "--force", "ddpm"])
    assert info.value.code == 2 and "required: spec" in capsys.readouterr().err


def services(monkeypatch, tmp_path, ray: str = "127.0.0.1:1") -> None:
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_", "RAY_", "GENFORGE_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GENFORGE_HOME", str(tmp_path / "no-stack"))
    monkeypatch.setenv("RAY_ADDRESS", ray)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("GENFORGE_STORAGE", f"file://{tmp_path / 'store'}")


def tiny_spec(tmp_path):
    return write_spec(tmp_path / "s.yaml", {"experiment": "t", "jobs": [
        {"name": "a", "kind": "train", "family": "ddpm", "train": {"steps": 1},
         "data": {"dataset": "digits", "image_size": 8}}]})


def test_force_of_a_job_the_spec_lacks_is_exit_2_before_any_service_is_reached(monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(cli, "_services", lambda *a, **k: pytest.fail("a service was reached"))
    assert cli.main(["run", QUICKSTART, "--force", "ddpm", "--force", "zzz"]) == 2
    assert capsys.readouterr().err.strip() == f"genforge: {QUICKSTART}: --force: no job named zzz"


def test_storage_failing_while_data_is_staged_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from orchestrator import datasets
    from orchestrator.storage import StorageError

    services(monkeypatch, tmp_path)

    def refuse(*args, **kwargs):
        raise StorageError("access denied by the endpoint while trying to write datasets/x")

    monkeypatch.setattr(datasets, "stage", refuse)
    spec = tiny_spec(tmp_path)
    assert cli.main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1:]  # after the sqlite store's own log
    assert err == [f"genforge: {spec}: storage file://{tmp_path / 'store'}: access denied by "
                   "the endpoint while trying to write datasets/x"]


def test_a_ray_address_nothing_listens_at_is_exit_2_at_once(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    services(monkeypatch, tmp_path, ray=f"127.0.0.1:{port}")
    spec = tiny_spec(tmp_path)
    assert cli.main(["run", str(spec)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"genforge: {spec}: cannot connect to Ray at 127.0.0.1:{port}: ")


def test_a_worker_ray_cannot_reach_is_killed_before_its_job_is_launched_again(tmp_path,
                                                                            monkeypatch):
    """ActorUnavailableError may be temporary: the old actor could come back and write beside
    the new one, so it is killed first."""
    from orchestrator import driver as driver_module

    driver = offline_driver(tmp_path, [{"name": "a", "kind": "train", "family": "ddpm",
                                        "data": {"dataset": "digits", "image_size": 8}}])
    state = driver.jobs["a"]
    old = SimpleNamespace(name="old actor")
    state.actor, state.ref, state.status = old, "ref", "running"
    events = []

    def unavailable(ref, timeout=None):
        raise ActorUnavailableError("the actor is unreachable for now", b"\x00" * 16)

    monkeypatch.setattr(driver_module.ray, "get", unavailable)
    monkeypatch.setattr(driver_module.ray, "kill", lambda actor, no_restart: events.append(
        ("kill", actor.name)))
    monkeypatch.setattr(driver, "_launch", lambda s, actor=None: events.append(
        ("launch", s.actor)))
    driver._collect(state)
    assert events == [("kill", "old actor"), ("launch", None)]
    driver.leases.close()


def test_a_job_that_lost_its_storage_restarts_after_a_wait(tmp_path, monkeypatch):
    """Storage away past botocore's retries: the job restarts on its budget, not at once (a
    restart that finds the storage still away would spend the budget in a second)."""
    from ray.exceptions import RayTaskError

    from orchestrator import driver as driver_module
    from orchestrator.storage import StorageError

    driver = offline_driver(tmp_path, [{"name": "a", "kind": "train", "family": "ddpm",
                                        "data": {"dataset": "digits", "image_size": 8}}])
    state = driver.jobs["a"]
    state.actor, state.status = SimpleNamespace(name="actor"), "running"
    launched = []
    monkeypatch.setattr(driver, "_launch", lambda s, actor=None: launched.append(actor.name))
    cause = StorageError("cannot reach S3 endpoint http://s3:1 to read data.npz")
    error = RayTaskError("run", "traceback", cause)
    driver._job_error(state, error)
    assert state.status == "restarting" and launched == [] and state.restarts == 1
    assert state.not_before - time.monotonic() == pytest.approx(driver_module.RESTART_BACKOFF_S,
                                                                abs=0.5)
    driver._restart_due()
    assert launched == []
    state.not_before = time.monotonic()
    driver._restart_due()
    assert launched == ["actor"]
    driver.leases.close()
