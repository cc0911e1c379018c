"""bench/references.py's DCGAN is pytorch/examples' (its parameter counts at 64 px, its
layout scaled to 16 px) and trains: the reference bench/peers.py sets beside `family: gan`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import references  # noqa: E402


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_the_dcgan_is_pytorch_examples_at_64_px_and_scales_down():
    g, d = references.dcgan_nets(64, 3)
    assert (count(g), count(d)) == (3_576_704, 2_765_568)  # examples/dcgan, nz 100, nc 3
    g, d = references.dcgan_nets(16, 1)
    x = g(torch.randn(5, 100, 1, 1))
    assert x.shape == (5, 1, 16, 16) and d(x).shape == (5, 1, 1, 1)
    assert [m.out_channels for m in g if isinstance(m, torch.nn.ConvTranspose2d)] == [128, 64, 1]


def test_the_reference_loop_trains_for_its_budget_and_samples():
    x = torch.rand(256, 1, 8, 8) * 2 - 1
    samples, steps = references.dcgan(x, 0.5, 0, 70)
    assert steps >= 1 and samples.shape == (70, 1, 8, 8) and samples.abs().max() <= 1
    batches = references.Batches(x, 100, 0)
    seen = torch.cat([batches.next() for _ in range(2)])
    assert len({tuple(row.flatten().tolist()) for row in seen}) == 200  # no repeat in an epoch
