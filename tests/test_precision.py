"""`train.precision`: bf16 and fp16 mixed precision run the same training harness, on the CPU
here (autocast is the same API on CUDA), are recorded on the run, keep the weights in float32,
and save fp16's gradient scaler with the checkpoint; a device without autocast, or a CPU
without native kernels for the precision, trains in fp32 and says why."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri
from orchestrator.inprocess import run_jobs
from workers import precision as precision_module
from workers.precision import Precision


def spec(precision: str, steps: int = 12) -> dict:
    return {"experiment": "p", "defaults": {"data": {"dataset": "digits", "image_size": 16}},
            "jobs": [{"name": "ddpm", "kind": "train", "family": "ddpm",
                      "model": {"channels": 8, "channel_mult": [1, 2], "timesteps": 50},
                      "train": {"steps": steps, "batch_size": 16, "log_every": 4,
                                "precision": precision, "sample_images": 4}}]}


def trained(tmp_path, precision: str):
    torch.manual_seed(0)
    results = run_jobs(tmp_path / precision, spec(precision))
    ckpt = load_checkpoint(*resolve_checkpoint_uri(results["ddpm"]["checkpoint"]))
    run = MlflowClient(f"sqlite:///{tmp_path / precision / 'mlflow.db'}").get_run(
        results["_runs"]["ddpm"])
    return results["ddpm"], ckpt, run


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_is_recorded(tmp_path, monkeypatch, precision):
    # the autocast path even where this CPU lacks the native kernels (it is only slower)
    monkeypatch.setattr(precision_module, "cpu_has_native", lambda asked: True)
    _, fp32, run32 = trained(tmp_path, "fp32")
    result, mixed, run = trained(tmp_path, precision)
    assert result["status"] == "finished"
    assert run.data.tags["genforge.precision"] == precision
    assert run32.data.tags["genforge.precision"] == "fp32"
    losses = [m.value for m in MlflowClient(f"sqlite:///{tmp_path / precision / 'mlflow.db'}")
              .get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    weights = mixed.tensors["net/conv_in.weight"]
    assert weights.dtype == torch.float32  # the weights stay float32; autocast is per op
    assert not torch.equal(weights, fp32.tensors["net/conv_in.weight"])  # it did compute lower
    scalers = mixed.state.get("grad_scalers", {})
    assert (set(scalers) == {"net"}) == (precision == "fp16")
    assert fp32.state.get("grad_scalers") == {}


def test_a_device_without_autocast_trains_in_fp32_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.amp.autocast_mode, "is_autocast_available", lambda device: False)
    p = Precision("bf16", torch.device("cpu"))
    assert p.used == "fp32" and p.tags() == {
        "genforge.precision": "fp32", "genforge.precision_fallback": "torch has no autocast on cpu"}
    assert p.scaler("net") is None


@pytest.mark.parametrize("asked, name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_a_cpu_without_native_kernels_trains_in_fp32_and_says_why(monkeypatch, asked, name):
    monkeypatch.setattr(precision_module, "cpu_has_native", lambda p: p != asked)
    p = Precision(asked, torch.device("cpu"))
    assert p.used == "fp32" and p.tags() == {
        "genforge.precision": "fp32",
        "genforge.precision_fallback": f"this CPU has no native {name} arithmetic"}
    monkeypatch.setattr(precision_module, "cpu_has_native", lambda p: True)
    assert Precision(asked, torch.device("cpu")).used == asked


def test_the_native_kernel_probe_answers_for_this_cpu():
    assert all(isinstance(precision_module.cpu_has_native(p), bool) for p in ("bf16", "fp16"))
