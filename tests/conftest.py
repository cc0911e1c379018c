"""Shared fixtures. `local_stack` starts the real services (SeaweedFS, MLflow server, Ray head)
once per test session, on free ports in a temporary stack folder, so it can run beside a
user's own stack."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from orchestrator import stack

# The test stack's folder and Ray token are made before any test module imports Ray, which
# reads its authentication settings once, then: this process's own Ray clients (ray.init, the
# state API, a `ray.cluster_utils` cluster) carry the stack's token. A `genforge` subprocess
# finds it by itself (see `stack_env`).
STACK_HOME = Path(tempfile.mkdtemp(prefix="genforge-test-stack-"))
atexit.register(shutil.rmtree, STACK_HOME, True)
stack.set_ray_auth(STACK_HOME)


@pytest.fixture(scope="session")
def local_stack() -> stack.StackState:
    state = stack.up(STACK_HOME, ports=stack.free_ports(list(stack.DEFAULT_PORTS)), num_cpus=2,
                     num_gpus=2)
    yield state
    stack.down(STACK_HOME)


@pytest.fixture()
def stack_env(local_stack) -> dict[str, str]:
    """Environment for a `genforge` subprocess that finds the test stack by GENFORGE_HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "GENFORGE_"))}
    env["GENFORGE_HOME"] = local_stack.home
    return env


@pytest.fixture()
def s3_client(local_stack):
    import boto3

    creds = stack.credentials(Path(local_stack.home))
    return boto3.client("s3", endpoint_url=local_stack.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=creds["access_key"],
                        aws_secret_access_key=creds["secret_key"])
