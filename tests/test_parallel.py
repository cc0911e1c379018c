"""The data-parallel collective on two real gloo processes: averaged half-batch gradients are
the full batch's gradient, ranks agree on stopping, rank 0's weights reach every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from workers.parallel import Collective, module_state


def _rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        c = Collective()
        torch.manual_seed(rank)  # different fresh weights on each rank...
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
        c.broadcast(module_state([model]))  # ...until rank 0's are broadcast
        start = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.linspace(-1, 1, 32).reshape(8, 4)
        y = x.sum(1, keepdim=True) ** 2
        model.eval()  # BatchNorm in eval: the per-row loss does not couple the halves
        loss = ((model(x.chunk(2)[rank]) - y.chunk(2)[rank]) ** 2).mean()
        loss.backward()
        c.average_gradients(model)
        torch.save({"start": start, "grads": [p.grad for p in model.parameters()],
                    "mean": c.mean({"a": float(rank), "b": 2.0 * rank}),
                    "any": (c.any(rank == 1), c.any(False)),
                    "gather": c.gather(f"node-{rank}")}, f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_ranks(fn, tmp_path, *args) -> tuple[dict, dict]:
    """What `fn(rank, init, out, *args)` saved on each of two gloo ranks."""
    out = str(tmp_path / "rank")
    mp.spawn(fn, args=(f"file://{tmp_path / 'pg'}", out, *args), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}-{r}.pt", weights_only=True) for r in (0, 1))
    return r0, r1


def test_averaged_gradients_are_the_full_batch_gradient(tmp_path):
    r0, r1 = _two_ranks(_rank, tmp_path)
    for k in r0["start"]:
        assert torch.equal(r0["start"][k], r1["start"][k]), k
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    model.load_state_dict(r0["start"])
    model.eval()
    x = torch.linspace(-1, 1, 32).reshape(8, 4)
    ((model(x) - x.sum(1, keepdim=True) ** 2) ** 2).mean().backward()
    for full, g0, g1 in zip([p.grad for p in model.parameters()], r0["grads"], r1["grads"]):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, full)
        assert g0.abs().sum() > 0
    assert r0["mean"] == {"a": 0.5, "b": 1.0}
    assert r0["any"] == r1["any"] == (True, False)
    assert r0["gather"] == ["node-0", "node-1"]


# ---- the VQ codebook of a data-parallel VQGAN ---------------------------------------------

def _vq_steps(z: torch.Tensor, gen: torch.Generator, restart_threshold: float) -> dict:
    """A fresh quantizer (the same on every rank) through len(z) training steps; its buffers."""
    from workers.nn.bottleneck import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, dim=4, decay=0.8, restart_threshold=restart_threshold)
    for batch in z:
        vq(batch, gen)
    return {k: v.clone() for k, v in vq.state_dict().items()}


def _vq_data(steps: int = 4, batch: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    z = torch.randn(steps, batch, 4, 3, 3, generator=g)
    z[:, batch // 2:] += 3.0  # rank 1's half is far from rank 0's: different codes used
    return z


def _vq_rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mine = _vq_data().chunk(2, dim=1)[rank]  # this rank's slice of every global batch
        gen = torch.Generator().manual_seed(1000 + rank)  # each rank's own noise, as in training
        torch.save({"restart": _vq_steps(mine, gen, 1.0), "plain": _vq_steps(mine, gen, 0.0)},
                   f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_vq_codebook_is_the_same_on_every_rank(tmp_path):
    r0, r1 = _two_ranks(_vq_rank, tmp_path)
    for case in ("restart", "plain"):  # with dead-code restarts (every code, at step 1) and without
        for k in ("embed", "embed_avg", "cluster_size"):
            assert torch.equal(r0[case][k], r1[case][k]), (case, k)
    # the statistics are the global batch's: the same update as one process on all the data
    alone = _vq_steps(_vq_data(), torch.Generator().manual_seed(0), 0.0)
    for k in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(r0["plain"][k], alone[k])
    assert r0["plain"]["cluster_size"].sum() == pytest.approx(
        sum(0.8 ** (3 - i) * 0.2 * 6 * 9 for i in range(4)))  # every vector of both halves counted


def test_vq_update_with_a_world_of_one_is_the_plain_update(tmp_path):
    z = _vq_data()
    plain = {t: _vq_steps(z, torch.Generator().manual_seed(3), t) for t in (0.0, 1.0)}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg1'}", rank=0, world_size=1)
    try:
        one = {t: _vq_steps(z, torch.Generator().manual_seed(3), t) for t in (0.0, 1.0)}
    finally:
        dist.destroy_process_group()
    for t in plain:
        for k, v in plain[t].items():
            assert torch.equal(one[t][k], v), (t, k)


def _group_error(failures: dict[int, Exception]) -> Exception:
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("Training failed due to worker errors", failures)


def test_a_rank_whose_process_died_is_lost_workers_however_ray_train_reports_it():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import (WorkerHealthCheckFailedError,
                                                   WorkerHealthCheckTimeoutError)

    from orchestrator.task import WorkersLost
    from workers.base import JobError
    from workers.parallel import _failure

    died = ActorDiedError()
    reports = {
        "the actor's error itself": died,
        # the controller's health check saw the dead actor first (the order of the two is a race)
        "a failed health check": WorkerHealthCheckFailedError("A worker health check failed.", died),
        "a hung health check": WorkerHealthCheckTimeoutError("A worker health check timed out."),
        "a peer's broken collective": RuntimeError("gloo: Connection reset by peer"),
    }
    for how, cause in reports.items():
        error = _failure(_group_error({1: ValueError("fine"), 0: cause}), JobError)
        assert isinstance(error, WorkersLost), how
        assert "worker 0 lost" in str(error), how
    # the rank's own error is the job's, with its last line
    own = _failure(_group_error({0: ValueError("line one\nbad learning rate")}), JobError)
    assert isinstance(own, JobError) and str(own) == "rank 0: bad learning rate"


# ---- a family's worker on two ranks ---------------------------------------------------------

def _gan_task(tmp_path):
    from orchestrator.datasets import stage
    from orchestrator.spec import parse_spec
    from orchestrator.storage import open_storage
    from orchestrator.task import Task

    spec = parse_spec({"experiment": "dp", "jobs": [{
        "name": "gan", "kind": "train", "family": "gan",
        "model": {"z_dim": 16, "g_width": 16, "d_width": 16},
        "data": {"dataset": "digits", "image_size": 8},
        "train": {"steps": 12, "batch_size": 16, "log_every": 4, "checkpoint_every": 6,
                  "sample_images": 2, "seed": 3},
        "resources": {"workers": 2}}]})
    root = f"file://{tmp_path / 'store'}"
    key = stage(spec.jobs[0].data, open_storage(root))
    return Task(job=spec.jobs[0].resolved(), job_hash="0" * 16, experiment="dp",
                storage_root=root, prefix="dp/gan/0", tracking_uri="", run_id=None,
                code_version="test", data_key=key)


def _gan_rank(rank: int, init: str, out: str, task) -> None:
    from workers.gan.worker import GANWorker

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        worker = GANWorker(task, collective=Collective())
        result = worker.run()
        torch.save({"result": result, "params": {
            f"{name}/{k}": v for name in ("g", "d")
            for k, v in worker.modules[name].named_parameters()},
            "ema": worker.emas["g"].module.state_dict()}, f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_gan_trains_on_two_ranks_in_step(tmp_path):
    """The GAN's two networks and k discriminator steps per generator step, data-parallel:
    once trained, both ranks hold the same weights (Ray Train's own part, and a rank that
    dies, are tests/test_e2e_parallel.py's)."""
    from orchestrator.checkpoints import load_checkpoint
    from orchestrator.storage import open_storage

    task = _gan_task(tmp_path)
    r0, r1 = _two_ranks(_gan_rank, tmp_path, task)
    assert r0["result"]["status"] == r1["result"]["status"] == "finished"
    assert r0["result"]["step"] == 12 and "checkpoint" in r0["result"]
    assert r0["params"].keys() == r1["params"].keys() and len(r0["params"]) > 4
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    for k in r0["ema"]:
        if r0["ema"][k].is_floating_point() and "running" not in k:
            assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    # rank 0 alone writes the checkpoints: the final one holds those weights
    ckpt = load_checkpoint(open_storage(task.storage_root).child(task.prefix))
    assert ckpt.step == 12
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in r0["params"].items())
