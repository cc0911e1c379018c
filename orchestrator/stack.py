"""The local stack: a SeaweedFS S3 server, an MLflow tracking server and a Ray head.

`genforge up` starts what is not already running, records the pids and ports in the stack
folder (`./.genforge/` or `GENFORGE_HOME`), and `genforge down` stops exactly those pids.
SeaweedFS, MLflow and Ray's dashboard listen on 127.0.0.1 only; Ray's gRPC servers listen on
every interface (Ray binds them so) and refuse any request without the stack's token. The S3
key pair and the Ray token are generated on the first `up` and kept in 0600 files beside the
state.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.json"
RAY_TOKEN_FILE = "ray_token"
RAY_AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

DEFAULT_PORTS = {
    "s3": 8333,
    "weed_master": 9333,
    "weed_volume": 9340,
    "weed_filer": 8888,
    "weed_admin": 23646,
    "mlflow": 5000,
    "ray": 6379,
    "ray_dashboard": 8265,
    "ray_client": 10001,
    "ray_agent": 52365,
}


class StackError(Exception):
    """A service of the local stack did not come up (the message names it)."""


def stack_home() -> Path:
    return Path(os.environ.get("GENFORGE_HOME") or ".genforge").resolve()


@dataclass
class StackState:
    home: str
    bucket: str = "genforge"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    pids: dict[str, int] = field(default_factory=dict)
    num_cpus: int | None = None
    num_gpus: float | None = None

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def ray_address(self) -> str:
        return f"{HOST}:{self.ports['ray']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ports['ray_dashboard']}"

    @property
    def storage(self) -> str:
        return f"s3://{self.bucket}/genforge"

    def save(self) -> None:
        path = Path(self.home) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, home: Path) -> StackState | None:
        try:
            return cls(**json.loads((home / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def _secret(path: Path, make: Callable[[], str]) -> str:
    """The file's text; written first from `make()`, with mode 0600, when it is not there."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make())
    return path.read_text()


def credentials(home: Path) -> dict[str, str]:
    """The stack's S3 key pair, generated once and stored with mode 0600."""
    return json.loads(_secret(home / CREDENTIALS_FILE, lambda: json.dumps(
        {"access_key": "gf" + secrets.token_hex(9), "secret_key": secrets.token_urlsafe(30)})))


def ray_auth_env(home: Path) -> dict[str, str]:
    """What a process needs to talk to the stack's Ray: token authentication, with the token
    generated once and stored with mode 0600 in the stack folder (the path travels, never the
    token)."""
    path = home / RAY_TOKEN_FILE
    _secret(path, lambda: secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def set_ray_auth(home: Path) -> None:
    """This process's Ray clients use the stack's token, whatever the environment said (tests
    and benchmarks beside a user's own stack). Before Ray is imported: it reads its
    authentication settings then."""
    for key in RAY_AUTH_KEYS:
        os.environ.pop(key, None)
    os.environ.update(ray_auth_env(home))


def use_ray_auth(home: Path) -> None:
    """This process talks to the stack's Ray with the stack's token, unless its environment
    names a token or a mode of its own. Before Ray is imported: it reads its authentication
    settings then."""
    if not any(os.environ.get(k) for k in RAY_AUTH_KEYS):
        os.environ.update(ray_auth_env(home))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(names: list[str] | tuple[str, ...] = tuple(DEFAULT_PORTS)) -> dict[str, int]:
    """Free ports for a second stack beside a user's one (tests, benchmarks): in 20000-29999,
    outside Ray's worker-port range and the kernel's ephemeral range, each with port+10000
    free too, where SeaweedFS puts its gRPC listener."""
    chosen: dict[str, int] = {}
    used: set[int] = set()
    rng = random.Random()
    while len(chosen) < len(names):
        port = rng.randrange(20000, 30000)
        if {port, port + 10000} & used or not (_port_free(port) and _port_free(port + 10000)):
            continue
        used |= {port, port + 10000}
        chosen[names[len(chosen)]] = port
    return chosen


def _http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _executable(name: str) -> str:
    """A console script of this environment (beside the running python), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(f"'{name}' is not installed (pip install genforge brings it)")
    return found


def _spawn(name: str, cmd: list[str], home: Path, env: dict[str, str] | None = None) -> int:
    log = open(home / "logs" / f"{name}.log", "ab")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, cwd=home, start_new_session=True,
    )
    return proc.pid


def _wait(service: str, ready: Callable[[], bool], pid: int, home: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not _alive(pid):
            raise StackError(f"{service} exited while starting; see {home / 'logs'}/{service}.log")
        time.sleep(0.3)
    raise StackError(f"{service} did not come up within {timeout:.0f} s; "
                     f"see {home / 'logs'}/{service}.log")


def _start_seaweedfs(state: StackState, home: Path, creds: dict[str, str]) -> int:
    config = home / "s3.json"
    identity = {"name": "genforge", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}]}
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"identities": [identity]}, fh)
    (home / "s3").mkdir(exist_ok=True)
    p = state.ports
    cmd = [
        _executable("weed"), "mini", f"-dir={home / 's3'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-s3.config={config}", f"-bucket={state.bucket}", f"-s3.port={p['s3']}",
        f"-master.port={p['weed_master']}", f"-volume.port={p['weed_volume']}",
        f"-filer.port={p['weed_filer']}", f"-admin.port={p['weed_admin']}",
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
    ]
    pid = _spawn("seaweedfs", cmd, home)
    # An unauthenticated request is refused (403) once the S3 gateway serves.
    _wait("seaweedfs", lambda: _http_status(state.s3_endpoint) in (403, 200) and
          _bucket_ready(state, creds), pid, home, timeout=60)
    return pid


def _bucket_ready(state: StackState, creds: dict[str, str]) -> bool:
    import boto3
    import botocore.exceptions

    client = boto3.client(
        "s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
        aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"],
    )
    try:
        client.head_bucket(Bucket=state.bucket)
        return True
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
        return False


def _write_ahead_log(db: Path) -> None:
    """The tracking database commits through a write-ahead log: one sync per write instead of a
    journal file created, synced and deleted, and readers no longer wait for writers. The
    mode is stored in the file; the server keeps it."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _start_mlflow(state: StackState, home: Path, creds: dict[str, str]) -> int:
    _write_ahead_log(home / "mlflow.db")
    cmd = [
        _executable("mlflow"), "server", "--host", HOST, "--port", str(state.ports["mlflow"]),
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{state.bucket}/mlflow-artifacts",
        # MLflow's Flask app under gunicorn (threads, one process) rather than its default
        # uvicorn: the tracking API is the same Flask handlers and security checks either way,
        # and uvicorn's FastAPI bridge cost 15.6 ms of server CPU a request against 5.3 ms
        # here (measured on this stack's requests). A sampling job sends four requests, or six
        # when its run is opened ahead (SCHEDULED) while its pipeline waits for room.
        "--workers", "1", "--gunicorn-opts", "--threads 8 --timeout 300",
    ]
    env = {
        "MLFLOW_S3_ENDPOINT_URL": state.s3_endpoint,
        "AWS_ACCESS_KEY_ID": creds["access_key"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        # The server's background job runner (GenAI evaluation jobs) is not used: six fewer
        # processes and about 1 GiB less memory.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    pid = _spawn("mlflow", cmd, home, env)
    _wait("mlflow", lambda: _http_status(f"{state.tracking_uri}/health") == 200, pid, home,
          timeout=120)
    return pid


def _start_ray(state: StackState, home: Path) -> int:
    p = state.ports
    num_cpus = state.num_cpus or os.cpu_count() or 1
    cmd = [
        _executable("ray"), "start", "--head", "--block", f"--node-ip-address={HOST}",
        f"--port={p['ray']}", f"--dashboard-host={HOST}", f"--dashboard-port={p['ray_dashboard']}",
        f"--ray-client-server-port={p['ray_client']}",
        f"--dashboard-agent-listen-port={p['ray_agent']}",
        f"--num-cpus={num_cpus}", f"--num-gpus={_num_gpus(state)}", "--disable-usage-stats",
    ]
    # A Ray job's entrypoint (`genforge submit`) runs `python` from the PATH: on the local
    # stack that is this interpreter, with genforge's dependencies.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # Ray's gRPC servers (GCS, raylet, workers) listen on every interface whatever the node
    # address: every RPC and dashboard request must carry the stack's token. (Left to itself,
    # Ray >= 2.59 turns token authentication on or off depending on whether ~/.ray/auth_token
    # happens to exist; the stack says what it wants, whatever the machine's history.)
    # The nodes hold the S3 credentials, as a cluster's nodes hold theirs (an instance role, or
    # the environment of `ray start`): a job submitted to the stack needs to carry none.
    # On SIGTERM, `ray start --block` (Ray >= 2.60) first drains its node for up to 30 s,
    # for Serve to move traffic to other nodes; the stack's one node has none to move it to,
    # so the drain only held `genforge down` (and a busy node was then SIGKILLed): off.
    creds = credentials(home)
    auth = ray_auth_env(home)
    pid = _spawn("ray", cmd, home, {"RAY_USAGE_STATS_ENABLED": "0", "PATH": path, **auth,
                                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                                    "RAY_AUTH_TOKEN": "",  # a caller's token must not win
                                    "AWS_ACCESS_KEY_ID": creds["access_key"],
                                    "AWS_SECRET_ACCESS_KEY": creds["secret_key"]})
    bearer = {"Authorization": f"Bearer {Path(auth['RAY_AUTH_TOKEN_PATH']).read_text()}"}
    _wait("ray", lambda: _port_open(p["ray"]) and
          _http_status(f"{state.dashboard_url}/api/version", bearer) == 200, pid, home, timeout=90)
    return pid


def _num_gpus(state: StackState) -> float:
    """Real GPUs where there are any; else logical ones, so GPU-requesting jobs schedule."""
    if state.num_gpus is not None:
        return state.num_gpus
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2


SERVICES = ("seaweedfs", "mlflow", "ray")
STOP_GRACE_S = 30  # how long `down` waits for a service to exit on SIGTERM before SIGKILL


def status(home: Path | None = None) -> StackState | None:
    """The running stack of `home`, or None when it is not (completely) up."""
    home = home or stack_home()
    state = StackState.load(home)
    if state and all(_alive(state.pids.get(s)) for s in SERVICES):
        return state
    return None


def up(home: Path | None = None, *, ports: dict[str, int] | None = None,
       num_cpus: int | None = None, num_gpus: float | None = None,
       echo: Callable[[str], None] = lambda _: None) -> StackState:
    """Start the stack (idempotent: services already running are reused)."""
    home = home or stack_home()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    state = StackState.load(home) or StackState(home=str(home))
    if ports:
        state.ports.update(ports)
    state.num_cpus = num_cpus if num_cpus is not None else state.num_cpus
    state.num_gpus = num_gpus if num_gpus is not None else state.num_gpus
    creds = credentials(home)
    starters = {
        "seaweedfs": lambda: _start_seaweedfs(state, home, creds),
        "mlflow": lambda: _start_mlflow(state, home, creds),
        "ray": lambda: _start_ray(state, home),
    }
    for service in SERVICES:
        if _alive(state.pids.get(service)):
            echo(f"{service}: running (pid {state.pids[service]})")
            continue
        echo(f"{service}: starting")
        t0 = time.monotonic()
        state.pids[service] = starters[service]()
        state.save()
        echo(f"{service}: up in {time.monotonic() - t0:.1f} s (pid {state.pids[service]})")
    state.save()
    return state


def down(home: Path | None = None, *, echo: Callable[[str], None] = lambda _: None) -> None:
    """Stop the processes `up` started, by pid: SIGTERM, then SIGKILL of their group."""
    home = home or stack_home()
    state = StackState.load(home)
    if state is None:
        echo(f"no stack in {home}")
        return
    for service in reversed(SERVICES):
        pid = state.pids.get(service)
        if not _alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)  # ray --block stops its own children
        deadline = time.monotonic() + STOP_GRACE_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        outlived = _alive(pid)
        try:
            os.killpg(pid, signal.SIGKILL)  # anything of the group that outlived it
        except OSError:
            pass
        echo(f"{service}: killed, still running {STOP_GRACE_S} s after SIGTERM (pid {pid})"
             if outlived else f"{service}: stopped (pid {pid})")
    state.pids = {}
    state.save()


def env_lines(state: StackState, creds: dict[str, str]) -> list[str]:
    return [
        f"export RAY_ADDRESS={state.ray_address}",
        *(f"export {k}={v}" for k, v in ray_auth_env(Path(state.home)).items()),
        f"export MLFLOW_TRACKING_URI={state.tracking_uri}",
        f"export AWS_ENDPOINT_URL={state.s3_endpoint}",
        f"export AWS_ACCESS_KEY_ID={creds['access_key']}",
        f"export AWS_SECRET_ACCESS_KEY={creds['secret_key']}",
        f"export GENFORGE_STORAGE={state.storage}",
        f"# MLflow UI: {state.tracking_uri}   Ray dashboard: {state.dashboard_url}",
    ]
