"""The local stack: loopback only (Ray's gRPC servers behind a token), credentials on and
private, idempotent, stopped by pid."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from orchestrator import settings, stack


def listening(pid: int) -> set[str]:
    """Local addresses the process tree of `pid` listens on."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    pids = {str(pid)} | set(subprocess.run(["pgrep", "-g", str(os.getpgid(pid))],
                                           capture_output=True, text=True).stdout.split())
    return {line.split()[3] for line in out.splitlines()
            if any(f"pid={p}," in line for p in pids)}


def test_services_listen_on_loopback_only(local_stack):
    pids = stack.StackState.load(Path(local_stack.home)).pids  # a fault test may restart one
    for service in ("seaweedfs", "mlflow"):
        addrs = listening(pids[service])
        assert addrs, service
        assert all(a.startswith("127.0.0.1:") for a in addrs), (service, addrs)
    ray_addrs = listening(pids["ray"])
    assert f"127.0.0.1:{local_stack.ports['ray_dashboard']}" in ray_addrs


def test_credentials_are_private_and_enforced(local_stack):
    home = Path(local_stack.home)
    assert stat.S_IMODE((home / stack.CREDENTIALS_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "s3.json").stat().st_mode) == 0o600
    anonymous = boto3.client("s3", endpoint_url=local_stack.s3_endpoint, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError) as info:
        anonymous.list_objects_v2(Bucket=local_stack.bucket)
    assert info.value.response["Error"]["Code"] == "AccessDenied"
    creds = stack.credentials(home)
    wrong = boto3.client("s3", endpoint_url=local_stack.s3_endpoint, region_name="us-east-1",
                         aws_access_key_id=creds["access_key"], aws_secret_access_key="wrong")
    with pytest.raises(ClientError):
        wrong.list_objects_v2(Bucket=local_stack.bucket)


def http_status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_ray_refuses_requests_without_the_stack_token(local_stack):
    """Ray's gRPC servers listen on every interface (see test_services_listen_on_loopback_only):
    what keeps others out is the token, private to the stack folder."""
    home = Path(local_stack.home)
    token_file = home / stack.RAY_TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text()
    assert len(token) == 64

    jobs = f"{local_stack.dashboard_url}/api/jobs/"
    assert http_status(jobs, {}) == 401
    assert http_status(jobs, {"Authorization": "Bearer " + "0" * 64}) in (401, 403)
    assert http_status(jobs, {"Authorization": f"Bearer {token}"}) == 200

    # a driver: with another token the cluster refuses it; with the stack's it connects
    probe = (f"import ray; ray.init(address='{local_stack.ray_address}', logging_level='ERROR'); "
             "print('nodes', len(ray.nodes()))")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    refused = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=180, env={**base, "RAY_AUTH_MODE": "token",
                                               "RAY_AUTH_TOKEN": "0" * 64})
    assert refused.returncode != 0 and "nodes" not in refused.stdout
    assert "auth" in (refused.stdout + refused.stderr).lower()
    accepted = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=180, env={**base, **stack.ray_auth_env(home)})
    assert accepted.returncode == 0 and "nodes 1" in accepted.stdout, accepted.stderr[-2000:]
    assert token not in accepted.stdout + accepted.stderr


def test_up_is_idempotent(local_stack):
    before = stack.StackState.load(Path(local_stack.home))
    again = stack.up(Path(local_stack.home))
    assert again.pids == before.pids and again.ports == local_stack.ports


def test_commands_find_the_stack_and_env_overrides(local_stack):
    home = Path(local_stack.home)
    found = settings.resolve(environ={}, home=home)
    assert found.ray_address == local_stack.ray_address
    assert found.tracking_uri == local_stack.tracking_uri
    assert found.s3.endpoint_url == local_stack.s3_endpoint
    assert found.s3.secret_access_key == stack.credentials(home)["secret_key"]
    over = settings.resolve(environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}, home=home)
    assert over.tracking_uri == "http://127.0.0.1:1" and over.ray_address == local_stack.ray_address
    # another endpoint never gets the stack's credentials
    other = settings.resolve(environ={"AWS_ENDPOINT_URL": "http://127.0.0.1:2"}, home=home)
    assert other.s3.endpoint_url == "http://127.0.0.1:2" and other.s3.secret_access_key is None
    assert settings.resolve(environ={}, home=home / "nothing-here") is None


def test_env_prints_exports(local_stack):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENFORGE_")}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "env"],
                         env={**env, "GENFORGE_HOME": local_stack.home},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = dict(l.removeprefix("export ").split("=", 1) for l in out.stdout.splitlines()
                 if l.startswith("export "))
    assert lines["RAY_ADDRESS"] == local_stack.ray_address
    assert lines["MLFLOW_TRACKING_URI"] == local_stack.tracking_uri
    assert lines["GENFORGE_STORAGE"] == local_stack.storage
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(lines)
    # Ray's token by its path: the token itself is not printed
    assert lines["RAY_AUTH_MODE"] == "token"
    assert lines["RAY_AUTH_TOKEN_PATH"] == str(Path(local_stack.home) / stack.RAY_TOKEN_FILE)
    assert Path(lines["RAY_AUTH_TOKEN_PATH"]).read_text() not in out.stdout
    assert f"MLflow UI: {local_stack.tracking_uri}" in out.stdout


def test_down_stops_exactly_its_own_pids(tmp_path):
    ours = subprocess.Popen(["sleep", "300"], start_new_session=True)
    theirs = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        state = stack.StackState(home=str(tmp_path), pids={"seaweedfs": ours.pid})
        state.save()
        stack.down(tmp_path)
        assert ours.wait(timeout=10) is not None
        time.sleep(0.2)
        assert theirs.poll() is None
        assert stack.StackState.load(tmp_path).pids == {}
    finally:
        theirs.kill()
        ours.kill()


def test_down_stops_every_service_on_sigterm_while_a_job_runs(tmp_path):
    """Each service exits on SIGTERM within `down`'s grace, a running Ray task included: none
    is left for SIGKILL."""
    state = stack.up(tmp_path, ports=stack.free_ports(list(stack.DEFAULT_PORTS)), num_cpus=2,
                     num_gpus=0)
    driver = subprocess.Popen(
        [sys.executable, "-c", "import ray, time\n"
         f"ray.init(address={state.ray_address!r})\n"
         "ray.remote(lambda: time.sleep(600)).remote()\n"
         "print('running', flush=True)\n"
         "time.sleep(600)\n"],
        env={**os.environ, **stack.ray_auth_env(tmp_path)}, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "running"
        time.sleep(1)  # the task has its lease: the node is busy
        said: list[str] = []
        stack.down(tmp_path, echo=said.append)
    finally:
        driver.kill()
        stack.down(tmp_path)
    assert [line.split(":")[0] for line in said] == list(reversed(stack.SERVICES))
    assert all(": stopped (pid " in line for line in said), said
