"""Shared fixtures. `local_stack` starts the real services (SeaweedFS, MLflow server, Ray head)
once per test session, on free ports in a temporary stack folder, so it can run beside a
user's own stack."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from orchestrator import stack


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(names: list[str]) -> dict[str, int]:
    """Ports in 20000-29999 (outside Ray's worker-port range and the kernel's ephemeral range),
    each with port+10000 free too, since SeaweedFS puts its gRPC listener there."""
    chosen: dict[str, int] = {}
    used: set[int] = set()
    rng = random.Random(os.getpid())
    while len(chosen) < len(names):
        port = rng.randrange(20000, 30000)
        if {port, port + 10000} & used or not (_free(port) and _free(port + 10000)):
            continue
        used |= {port, port + 10000}
        chosen[names[len(chosen)]] = port
    return chosen


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory) -> stack.StackState:
    home = tmp_path_factory.mktemp("stack")
    state = stack.up(home, ports=free_ports(list(stack.DEFAULT_PORTS)), num_cpus=2, num_gpus=2)
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
