"""The data-parallel collective on two real gloo processes: averaged half-batch gradients are
the full batch's gradient, ranks agree on stopping, rank 0's weights reach every rank."""

from __future__ import annotations

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


def test_averaged_gradients_are_the_full_batch_gradient(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}-{r}.pt", weights_only=True) for r in (0, 1))
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
