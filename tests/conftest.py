"""Shared fixtures. `local_stack` starts the real services (SeaweedFS, MLflow server, Ray head)
once per test session, on free ports in a temporary stack folder, so it can run beside a
user's own stack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator import stack


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory) -> stack.StackState:
    home = tmp_path_factory.mktemp("stack")
    state = stack.up(home, ports=stack.free_ports(list(stack.DEFAULT_PORTS)), num_cpus=2, num_gpus=2)
    # the tests' own Ray clients (ray.init, the state API) carry the stack's token; a
    # `genforge` subprocess finds it by itself (see `stack_env`)
    with stack.ray_auth(home):
        yield state
    stack.down(home)


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
