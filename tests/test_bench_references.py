"""bench/references.py's reference implementations, which bench/peers.py sets beside genforge's
families: the DCGAN is pytorch/examples' (its parameter counts at 64 px, its layout scaled to
16 px) and trains; the VQ autoencoder is genforge's encoder and decoder around
vector-quantize-pytorch's quantizer, measured as genforge measures its VQGAN; x-transformers'
decoder reads code sequences in genforge's layout, learns them, and is scored in nats per token
as genforge's transformer's loss is computed. The optional packages (the `bench` extra) are
skipped where they are not installed."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import references  # noqa: E402

TINY_VQ = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "latent_channels": 4,
           "codebook_size": 16, "beta": 0.25, "codebook_decay": 0.99}


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def smooth_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] an autoencoder can learn in a few steps: 2x2 pixels upsampled."""
    low = torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def counting_codes(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(n, length) sequences t_i = (t_0 + i) mod vocab: only the first token is uncertain."""
    start = torch.randint(vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(length)) % vocab


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


def test_the_vq_reference_is_genforges_autoencoder_but_for_the_quantizer():
    pytest.importorskip("vector_quantize_pytorch")
    from workers.autoencoder import build_autoencoder

    torch.manual_seed(3)
    ours = build_autoencoder("vqgan", {**TINY_VQ, "restart_threshold": 1.0}, 1)
    torch.manual_seed(3)
    theirs = references.VQAutoencoder(image_channels=1, **TINY_VQ)
    assert count(theirs) == count(ours)  # both quantizers keep their codebooks as EMA buffers
    for mine, genforges in ((theirs.encoder, ours.encoder), (theirs.decoder, ours.decoder)):
        for a, b in zip(mine.state_dict().values(), genforges.state_dict().values()):
            assert torch.equal(a, b)  # same nets, same seed: the same initial weights
    rec, idx, commit = theirs(smooth_images(6))
    assert rec.shape == (6, 1, 8, 8) and idx.shape == (6, 4, 4) and commit.ndim == 0
    assert 0 <= int(idx.min()) and int(idx.max()) < TINY_VQ["codebook_size"]


def test_the_vq_reference_trains_for_its_budget_and_is_measured_like_genforges():
    pytest.importorskip("vector_quantize_pytorch")
    x, heldout = smooth_images(256), smooth_images(64, seed=1)
    settings = dict(lr=2e-3, betas=(0.5, 0.9), batch_size=32, grad_clip=1.0)
    untrained, none = references.vq_autoencoder(x, 0.0, 0, TINY_VQ, **settings)
    trained, steps = references.vq_autoencoder(x, 0.3, 0, TINY_VQ, **settings)
    before = references.reconstruction_metrics(untrained, heldout)
    after = references.reconstruction_metrics(trained, heldout)
    assert none == 0 and steps >= 1 and not trained.training
    assert set(after) == {"mse", "psnr", "l1", "perplexity", "codebook_usage"}
    assert math.isfinite(after["psnr"]) and after["psnr"] > before["psnr"]
    assert 0 < after["codebook_usage"] <= 1
    assert 1 <= after["perplexity"] <= TINY_VQ["codebook_size"] * after["codebook_usage"] + 1e-3


def test_reconstruction_metrics_are_genforges_definitions():
    from workers.autoencoder import psnr

    class Shifted(torch.nn.Module):  # reconstructs 0.1 too bright, cycles through 4 of 8 codes
        codebook_size = 8

        def forward(self, x):
            return x + 0.1, torch.arange(len(x) * 4).view(len(x), 2, 2) % 4, torch.zeros(())

    net = Shifted()
    m = references.reconstruction_metrics(net, torch.zeros(10, 1, 4, 4), batch_size=3)
    assert m["mse"] == pytest.approx(0.01) and m["l1"] == pytest.approx(0.1)
    assert m["psnr"] == pytest.approx(psnr(0.01)) == pytest.approx(10 * math.log10(400))
    assert m["codebook_usage"] == 0.5 and m["perplexity"] == pytest.approx(4.0, rel=1e-4)
    assert not net.training
    # clamped to [-1, 1] as genforge's reconstructions are: an overshoot costs nothing
    assert references.reconstruction_metrics(net, torch.ones(2, 1, 4, 4))["mse"] == 0


def test_nats_per_token_is_genforges_transformer_loss():
    from workers.autoregressive.transformer import Transformer

    torch.manual_seed(0)
    net = Transformer(vocab_size=16, seq_len=8, dim=16, layers=1, heads=2).eval()
    codes = torch.randint(16, (20, 8))
    nats = references.nats_per_token(net.logits, codes, batch_size=7)  # uneven batches
    with torch.no_grad():
        assert nats == pytest.approx(float(net.loss(codes)), rel=1e-5)


def test_the_x_transformer_reads_codes_in_genforges_layout():
    pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    net = references.x_transformer(vocab_size=16, seq_len=8, dim=32, layers=1, heads=4).eval()
    codes = counting_codes(4, 8, 16)
    logits = references.x_transformer_logits(net, codes)
    assert logits.shape == (4, 8, 16)  # one prediction per token, over the codebook only
    changed = codes.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 16
    moved = (references.x_transformer_logits(net, changed) - logits).abs().amax(dim=(0, 2))
    assert (moved[:4] == 0).all() and (moved[4:] > 0).all()  # position i sees tokens < i only


def test_the_x_transformer_learns_codes_for_given_steps_and_counts_tokens():
    pytest.importorskip("x_transformers")
    codes, held = counting_codes(256, 8, 16), counting_codes(64, 8, 16, seed=1)
    settings = dict(vocab_size=16, dim=32, layers=1, heads=4, lr=3e-3, betas=(0.9, 0.95),
                    weight_decay=0.01, batch_size=32, grad_clip=1.0)
    untrained, _, none = references.train_x_transformer(codes, 0, 0, **settings)
    net, seconds, seen = references.train_x_transformer(codes, 30, 0, **settings)
    assert none == 0 and seen == 30 * 32 * 8 and seconds > 0 and not net.training
    before = references.nats_per_token(lambda t: references.x_transformer_logits(untrained, t), held)
    after = references.nats_per_token(lambda t: references.x_transformer_logits(net, t), held)
    assert abs(before - math.log(16)) < 0.5  # an untrained model guesses about uniformly
    assert math.isfinite(after) and after < math.log(16) - 1


def test_genforges_transformer_learns_in_the_references_loop():
    """The AR comparison's same-network run: genforge's transformer, trained by the loop that
    trains the x-transformers decoder."""
    from workers.autoregressive.transformer import Transformer

    codes, held = counting_codes(256, 8, 16), counting_codes(64, 8, 16, seed=1)
    shape = dict(vocab_size=16, dim=32, layers=1, heads=4)
    recipe = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, batch_size=32, grad_clip=1.0)
    torch.manual_seed(0)
    net = Transformer(seq_len=8, **shape).eval()
    before = references.nats_per_token(net.logits, held)
    net, seconds, seen = references.train_transformer(net, lambda m, b: m.logits(b), codes, 30, 0,
                                                      **recipe)
    assert seen == 30 * 32 * 8 and seconds > 0 and not net.training
    assert references.nats_per_token(net.logits, held) < before - 1
    assert references.ar_net_outside(codes, 3, 0, dropout=0.0, **shape, **recipe) > 0


def test_train_steps_runs_exactly_the_steps():
    calls: list[int] = []
    seconds = references.train_steps(5, calls.append)
    assert calls == [1, 2, 3, 4, 5] and seconds >= 0


def test_diffusers_ddpm_on_latents_clips_nothing():
    """On images the schedulers clip to [-1, 1]; on latents (the LDM's reference) nothing is."""
    pytest.importorskip("diffusers")
    latents = 3 * smooth_images(64, size=8).repeat(1, 4, 1, 1)  # 4 channels, range ±3
    recipe = dict(channels=8, channel_mult=(1, 2), lr=1e-3, batch_size=16, ema_decay=0.9,
                  sampler_steps=4)
    clipped, _ = references.diffusers_ddpm(latents, 0.5, 0, 8, **recipe)
    free, steps = references.diffusers_ddpm(latents, 0.5, 0, 8, **recipe, clip=False)
    assert steps >= 1 and free.shape == clipped.shape == (8, 4, 8, 8)
    assert clipped.abs().max() <= 1 < free.abs().max()
