"""DCGAN networks and the GAN losses and training step."""

from __future__ import annotations

import pytest
import torch

from workers.gan.layout import dcgan_layout
from workers.nn.adversarial import discriminator_loss, generator_loss
from workers.gan.nets import Discriminator, Generator


@pytest.mark.parametrize("size, channels", [(8, 1), (16, 3), (28, 1), (32, 3), (64, 1)])
def test_shapes(size, channels):
    g = Generator(z_dim=16, channels=channels, image_size=size, width=8)
    d = Discriminator(channels=channels, image_size=size, width=8)
    x = g(torch.randn(5, 16))
    assert x.shape == (5, channels, size, size) and x.abs().max() <= 1  # tanh
    assert d(x).shape == (5,)


def test_layout_and_bad_sizes():
    assert dcgan_layout(28) == (7, 2) and dcgan_layout(32) == (4, 3) and dcgan_layout(8) == (4, 1)
    for size in (9, 7, 6):
        with pytest.raises(ValueError, match="cannot be reached"):
            dcgan_layout(size)


def test_dcgan_init():
    g = Generator(z_dim=64, channels=1, image_size=32, width=64)
    convs = [m.weight for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    std = torch.cat([w.flatten() for w in convs]).std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    bn = [m.weight for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert torch.cat(bn).mean().item() == pytest.approx(1.0, abs=0.01)


def test_losses_on_hand_built_logits():
    real, fake = torch.tensor([3.0, 1.0]), torch.tensor([-2.0, 0.5])
    bce = discriminator_loss(real, fake, "bce")
    expected = (-torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean())
    assert bce.item() == pytest.approx(expected.item(), rel=1e-5)
    # non-saturating: -log D(G(z)), strong gradient where D rejects the fake
    assert generator_loss(fake, "bce").item() == pytest.approx(
        -torch.log(torch.sigmoid(fake)).mean().item(), rel=1e-5)
    # hinge: relu(1 - real) + relu(1 + fake); generator: -fake
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx((0 + 0) / 2 + (0 + 1.5) / 2)
    assert generator_loss(fake, "hinge").item() == pytest.approx(0.75)


def test_discriminator_learns_to_separate():
    torch.manual_seed(0)
    d = Discriminator(channels=1, image_size=8, width=8)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.5, 0.999))
    real = torch.rand(32, 1, 8, 8) * 0.2 + 0.7  # bright
    fake = torch.rand(32, 1, 8, 8) * 0.2 - 0.9  # dark
    first = discriminator_loss(d(real), d(fake), "bce").item()
    for _ in range(30):
        loss = discriminator_loss(d(real), d(fake), "bce")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


@pytest.mark.parametrize("d_steps, forwards", [(1, 1), (3, 3)])
def test_a_step_runs_the_generator_once_per_discriminator_step(tmp_path, d_steps, forwards):
    """The last discriminator step's fakes are the generator update's too (as in DCGAN): a
    step of k discriminator updates costs k generator forwards, not k + 1."""
    from orchestrator.inprocess import tasks
    from workers.gan.worker import GANWorker

    spec = {"experiment": "g", "defaults": {"data": {"dataset": "digits", "image_size": 8}},
            "jobs": [{"name": "gan", "kind": "train", "family": "gan",
                      "model": {"z_dim": 8, "g_width": 8, "d_width": 8, "d_steps": d_steps},
                      "train": {"steps": 1, "batch_size": 4}}]}
    worker = GANWorker(next(tasks(tmp_path, spec)))
    worker.build(worker.job["model"], (1, 8, 8))
    worker.configure_optimizers(worker.job["train"])
    calls = []
    worker.modules["g"].register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    d_before = [p.detach().clone() for p in worker.modules["d"].parameters()]
    g_before = [p.detach().clone() for p in worker.modules["g"].parameters()]
    losses = worker.train_step(torch.rand(4, 1, 8, 8) * 2 - 1, None, torch.Generator().manual_seed(0))
    assert len(calls) == forwards and calls[-1] and not any(calls[:-1])
    assert all(torch.isfinite(v) for v in losses.values())
    # both networks moved
    assert any(not torch.equal(a, p) for a, p in zip(d_before, worker.modules["d"].parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(g_before, worker.modules["g"].parameters()))
