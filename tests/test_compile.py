"""`train.compile` and `sample.compile` on the CPU (inductor's C++ back end; on a GPU it is
Triton, exercised by tests/test_cuda.py): a compiled training job takes the same steps as an
eager one, to float tolerance, with the same checkpoint keys; a tool chain that fails makes the
job run eagerly and say why, for training and sampling alike."""

from __future__ import annotations

import torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import fresh_cache

import workers.compile as compile_module
from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri
from orchestrator.inprocess import run_untracked


def spec(compile: bool, steps: int = 4) -> dict:
    return {"experiment": "c", "jobs": [
        {"name": "ddpm", "kind": "train", "family": "ddpm",
         "model": {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "timesteps": 50},
         "data": {"dataset": "digits", "image_size": 8},
         "train": {"steps": steps, "batch_size": 16, "log_every": 1, "sample_images": 4,
                   "compile": compile},
         "resources": {"cpus": 2}},
        {"name": "grid", "kind": "sample", "family": "ddpm", "from": "ddpm",
         "sample": {"num_images": 4, "steps": 5, "compile": compile}}]}


def test_a_compiled_job_trains_as_the_eager_one(tmp_path):
    def trained(name: str, compile: bool):
        torch.manual_seed(0)  # the same initial weights
        return run_untracked(tmp_path / name, spec(compile), ["ddpm"])["ddpm"]

    eager, compiled = trained("eager", False), trained("compiled", True)
    assert eager[1].tags["genforge.compile"] == "false"
    assert compiled[1].tags["genforge.compile"] == "true"
    assert "genforge.compile_fallback" not in compiled[1].tags
    losses = [[v for _, _, v in log.series("loss")] for _, log in (eager, compiled)]
    assert len(losses[1]) == 4
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-4)
    weights = [load_checkpoint(*resolve_checkpoint_uri(result["checkpoint"])).tensors
               for result, _ in (eager, compiled)]
    assert weights[1].keys() == weights[0].keys()  # compiled in place: no "_orig_mod." keys
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-2, atol=1e-3)


def test_a_broken_tool_chain_runs_eagerly_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_module, "_probed", {})  # probe again, with no C++ compiler
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    torch._dynamo.reset()
    with fresh_cache():  # nothing compiled before (by the test above) can be reused
        out = run_untracked(tmp_path, spec(True, steps=2))
    torch._dynamo.reset()
    for name in ("ddpm", "grid"):
        result, log = out[name]
        assert result["status"] == "finished"
        assert log.tags["genforge.compile"] == "false"
        assert log.tags["genforge.compile_fallback"].startswith("torch.compile failed on cpu: ")
