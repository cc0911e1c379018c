"""Every job kind on a CUDA device: training in bf16 with torch.compile, sampling compiled,
progressive distillation, an evaluation that keeps its tensors on the device, a data-parallel
rank on NCCL, and a fractional-GPU job held to its share of the memory. Skipped, with the
reason, where no CUDA device is present (as in CI); on a GPU machine they need neither Ray,
MLflow nor an S3 server (the jobs run in-process on file:// storage):

    python -m pytest --noconftest tests/test_cuda.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from orchestrator.inprocess import MemoryLogger, run_untracked, tasks
from orchestrator.storage import open_storage
from workers.base import JobError
from workers.parallel import Collective
from workers.registry import worker_class

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

UNET = {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
        "timesteps": 100}
DATA = {"dataset": "digits", "image_size": 16}


def train(name: str = "ddpm", **over) -> dict:
    return {"name": name, "kind": "train", "family": "ddpm", "model": UNET, "data": DATA,
            "train": {"steps": 20, "batch_size": 32, "log_every": 5, "sample_images": 4,
                      "precision": "bf16", **over.pop("train", {})},
            "resources": {"cpus": 2, "gpus": 1}, **over}


def test_train_sample_distill_and_evaluate_on_cuda(tmp_path):
    jobs = [train(train={"compile": True}),
            {"name": "grid", "kind": "sample", "family": "ddpm", "from": "ddpm",
             "sample": {"num_images": 16, "steps": 10, "compile": True}},
            {"name": "student", "kind": "distill", "family": "ddpm", "teacher": "ddpm",
             "distill": {"method": "progressive", "teacher_steps": 8, "student_steps": 2},
             "train": {"steps": 5, "batch_size": 32, "log_every": 5, "sample_images": 4},
             "data": DATA, "resources": {"gpus": 1}},
            {"name": "score", "kind": "evaluate", "from": ["ddpm", "student"], "data": DATA,
             "evaluate": {"num_samples": 150, "classifier": {"steps": 50},
                          "sample": {"batch_size": 100}}, "resources": {"gpus": 1}}]
    out = run_untracked(tmp_path, {"experiment": "cuda", "jobs": jobs})
    result, log = out["ddpm"]
    assert result["status"] == "finished" and result["step"] == 20
    assert log.tags["genforge.precision"] == "bf16" and log.tags["genforge.compile"] == "true"
    assert log.tags["genforge.tf32"] == "True"
    assert result["metrics"]["peak_device_memory_mb"] > 0
    assert all(np.isfinite(v) for _, _, v in log.series("loss"))
    grid, grid_log = out["grid"]
    assert grid_log.tags["genforge.compile"] == "true"
    images = np.load(_read(grid["outputs"][0]))["images"]
    assert images.shape == (16, 16, 16, 1) and images.std() > 0
    student, _ = out["student"]
    assert student["metrics"]["speedup"] > 1  # 2 steps against the teacher's 8
    score, _ = out["score"]
    sources = score["metrics"]["sources"]
    assert [s["ref"] for s in sources] == ["ddpm", "student"]
    assert all(np.isfinite(s["metrics"]["fd"]) and s["metrics"]["fd"] >= 0 for s in sources)


def _read(uri: str):
    import io

    parent, key = uri.rsplit("/", 1)
    return io.BytesIO(open_storage(parent).get_bytes(key))


def test_a_data_parallel_rank_trains_on_cuda_over_nccl(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        (task,) = tasks(tmp_path, {"experiment": "dp", "jobs": [train(
            resources={"cpus": 2, "gpus": 1})]})
        collective = Collective()
        assert collective.device.type == "cuda"
        worker = worker_class("ddpm")(task, collective=collective)
        worker.log = MemoryLogger()
        result = worker.run()
    finally:
        dist.destroy_process_group()
    assert result["status"] == "finished" and result["step"] == 20
    assert all(np.isfinite(v) for _, _, v in worker.log.series("loss"))


def test_a_fractional_gpu_job_is_held_to_its_share(tmp_path):
    total = torch.cuda.get_device_properties(0).total_memory
    # 1% of the device: a batch of 1024 32-px images through this U-Net needs far more
    big = train("big", model={**UNET, "channels": 64, "attn_resolutions": [16]},
                data={**DATA, "image_size": 32},
                train={"batch_size": 1024, "steps": 2}, resources={"cpus": 2, "gpus": 0.01})
    (task,) = tasks(tmp_path, {"experiment": "share", "jobs": [big]})
    worker = worker_class("ddpm")(task)
    worker.log = MemoryLogger()
    with pytest.raises(JobError) as err:
        worker.run()
    message = str(err.value)
    assert message.startswith("ran out of GPU memory: it may use its share, resources.gpus 0.01")
    assert f"{0.01 * total / 2**30:.1f} GiB" in message and "\n" not in message
    # the next job of a whole GPU gets the whole device back
    (task,) = tasks(tmp_path / "next", {"experiment": "share", "jobs": [train()]})
    worker = worker_class("ddpm")(task)
    worker.log = MemoryLogger()
    assert worker.memory_share == 1.0
    assert worker.run()["status"] == "finished"
