"""jobspecs/gpu/*.yaml, the examples sized for one modern GPU, run in-process on the CPU with
tiny step counts and sample sizes: their full-size U-Nets, 32-px data (1 and 3 channels),
bf16 (fp32, and the run says why, on a CPU without native bfloat16 kernels, where bf16
runs 65x slower), sampling and evaluation work end to end; torch.compile is left to tests/test_compile.py
(compiling these networks takes minutes on two cores) and the GPU itself to tests/test_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.inprocess import run_untracked
from support import ROOT, example_spec
from workers.precision import cpu_has_native

DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason="needs the shared Fashion-MNIST data")


def tiny(spec: dict) -> dict:
    for job in spec["jobs"]:
        if "train" in job:
            job["train"].update(steps=2, batch_size=4, sample_images=2, sample_steps=2,
                                compile=False, checkpoint_every=None, sample_every=None,
                                log_every=1)
        if "sample" in job:
            job["sample"].update(num_images=4, steps=2, batch_size=4, compile=False)
        if "evaluate" in job:
            job["evaluate"].update(num_samples=10, classifier={"steps": 5})
            job["evaluate"]["sample"].update(steps=2, batch_size=10)
    return spec


@pytest.mark.parametrize("name, channels", [("gpu/ddpm", 1), ("gpu/flow-rgb", 3)])
def test_gpu_example_runs_tiny_on_the_cpu(tmp_path, name, channels):
    spec = tiny(example_spec(name, "gpu-example", limit=64))
    out = run_untracked(tmp_path, spec)
    train = next(job["name"] for job in spec["jobs"] if job["kind"] == "train")
    result, log = out[train]
    assert result["status"] == "finished" and result["step"] == 2
    if cpu_has_native("bf16"):
        assert log.tags["genforge.precision"] == "bf16"
    else:
        assert log.tags["genforge.precision"] == "fp32"
        assert log.tags["genforge.precision_fallback"] == "this CPU has no native bfloat16 arithmetic"
    assert np.isfinite([v for _, _, v in log.series("loss")]).all()
    sampled, _ = out["samples"]
    assert sampled["num_images"] == 4
    score, _ = out["score"]
    sources = score["metrics"]["sources"]
    assert sources and all(np.isfinite(s["metrics"]["fd"]) for s in sources)
    assert {s["step"] for s in sources} == {2}
    assert score["metrics"]["baseline"]["num_samples"] == 10
    if name == "gpu/flow-rgb":  # scored at each guidance scale of the sweep
        assert [s["swept"] for s in sources] == [{"guidance": g} for g in (1.0, 2.0, 4.0)]
