"""bench/gpu.py in its tiny CPU form, in a process that cannot import Ray, MLflow or boto3 (a GPU
machine may have none of them): every measurement runs and lands in the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from workers.precision import cpu_has_native

ROOT = Path(__file__).resolve().parent.parent

BLOCKED = """
import importlib.abc, runpy, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("mlflow", "ray", "boto3", "botocore"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Blocked())
sys.argv = ["bench/gpu.py", *sys.argv[1:]]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""


def test_gpu_bench_runs_tiny_without_ray_mlflow_or_s3(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["tiny"] is True
    families = report["families"]
    assert set(families) == {"ddpm", "flow", "gan", "vqgan", "ldm-autoencoder",
                             "autoregressive", "ldm"}
    for name, entry in families.items():
        for config in ("fp32", "bf16"):
            run = entry["train"][config]
            assert run["images_per_s"] > 0, (name, config)
            # bf16 where this CPU has native kernels for it; fp32 (the fallback) elsewhere
            assert run["precision"] == ("bf16" if config == "bf16" and cpu_has_native("bf16")
                                        else "fp32")
        assert entry["bf16_over_fp32"] > 0
    for name in ("ddpm", "flow", "gan", "vqgan", "autoregressive", "ldm"):
        assert families[name]["sample"]["images_per_s"] > 0, name
    assert families["ddpm"]["train"]["bf16-rgb"]["images_per_s"] > 0
    overhead = report["job_vs_bare_loop"]
    assert len(overhead["bare_images_per_s"]) == len(overhead["genforge_images_per_s"]) == 2
    assert 0 < overhead["ratio"]
    assert report["evaluation"]["num_samples"] == 64 and report["evaluation"]["metrics"]["ddpm-bf16.fd"] >= 0
