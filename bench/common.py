"""What the benchmarks share: a private stack on free ports, a one-job DDPM spec, running it
through the CLI and reading back what the worker recorded."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import stack  # noqa: E402
from orchestrator.storage import S3Credentials, Storage, open_storage  # noqa: E402

MODEL = {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "timesteps": 1000,
         "schedule": "cosine"}

# The private stack's folder and Ray token are made when this module is imported, which each
# benchmark does before it imports Ray: Ray reads its authentication settings once, then, and
# the benchmark's own ray.init talks to that stack.
HOME = Path(tempfile.mkdtemp(prefix="genforge-bench-"))
atexit.register(shutil.rmtree, HOME, True)
stack.set_ray_auth(HOME)


@contextlib.contextmanager
def private_stack(threads: int) -> Iterator[tuple[Path, stack.StackState, Storage]]:
    print("starting a private stack ...", file=sys.stderr)
    state = stack.up(HOME, ports=stack.free_ports(), num_cpus=threads, num_gpus=0)
    try:
        creds = stack.credentials(HOME)
        root = open_storage(state.storage, S3Credentials(
            state.s3_endpoint, creds["access_key"], creds["secret_key"]))
        yield HOME, state, root
    finally:
        stack.down(HOME)


def train_spec(experiment: str, *, steps: int, batch_size: int, threads: int,
               checkpoint_every: int | None, **resources) -> dict:
    return {"experiment": experiment, "jobs": [{
        "name": "ddpm", "kind": "train", "family": "ddpm", "model": MODEL,
        "data": {"dataset": "digits", "image_size": 16},
        "train": {"steps": steps, "batch_size": batch_size, "lr": 1e-3, "ema_decay": 0.995,
                  "checkpoint_every": checkpoint_every, "log_every": 10,
                  "seed": time.time_ns() % 2**31},  # a new hash each time: never a cache hit
        "resources": {"cpus": threads, "gpus": 0, **resources},
    }]}


def launch(home: Path, spec: dict, **env: str) -> tuple[float, subprocess.Popen]:
    """`genforge run` of `spec` on the private stack in `home`, its driver given `env` too."""
    path = home / f"{spec['experiment']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))},
           "GENFORGE_HOME": str(home), **env}
    launched = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return launched, proc


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"genforge run failed:\n{err[-2000:]}")


def take_result(root: Storage, experiment: str) -> dict:
    """The result.json of the experiment's job, removed so the next run's is not confused with it."""
    key = next(k for k in root.list(f"{experiment}/ddpm/") if k.endswith("result.json"))
    result = json.loads(root.get_bytes(key))
    for stale in root.list(f"{experiment}/"):
        root.delete(stale)
    return result


def machine(threads: int) -> dict:
    """What a benchmark ran on, for its report."""
    import platform

    import torch

    return {"cpu_threads": threads, "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "platform": platform.platform()}


def report(name: str, threads: int, **fields) -> dict:
    """A benchmark's JSON report: its name, when, the machine, and its own fields."""
    return {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": machine(threads), **fields}


def write_report(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
