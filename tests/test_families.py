"""The VQGAN, autoregressive and latent-diffusion families: their networks, losses and samplers
on tiny inputs, and their workers chained in-process (tests/inprocess.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.checkpoints import load_checkpoint, resolve_checkpoint_uri
from orchestrator.inprocess import run_jobs
from orchestrator.storage import open_storage
from workers.nn.autoencoder import Autoencoder, PatchDiscriminator, adaptive_weight
from workers.nn.bottleneck import VectorQuantizer
from workers.autoregressive.transformer import Transformer, filter_logits


def digits(n: int = 32, size: int = 16) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:n]).float()[:, None] / 8.0 - 1.0
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")


# ---- networks -----------------------------------------------------------------------------

@pytest.mark.parametrize("bottleneck", ["vq", "kl"])
@pytest.mark.parametrize("size, channels, mult", [(16, 1, (1, 2, 2)), (28, 1, (1, 2, 4)), (32, 3, (1, 2))])
def test_autoencoder_shapes(bottleneck, size, channels, mult):
    ae = Autoencoder(image_channels=channels, channels=8, channel_mult=mult, latent_channels=4,
                     bottleneck=bottleneck, codebook_size=16)
    x = torch.randn(3, channels, size, size)
    rec, loss, stats = ae(x)
    f = 2 ** (len(mult) - 1)
    assert rec.shape == x.shape and loss.ndim == 0
    assert ae.latent_shape((channels, size, size)) == (4, size // f, size // f)
    z = ae.encode_latents(x)
    assert z.shape == (3, 4, size // f, size // f)
    assert ae.decode_latents(z).shape == x.shape
    if bottleneck == "vq":
        idx = ae.encode(x)
        assert idx.shape == (3, size // f, size // f) and idx.dtype == torch.long
        assert int(idx.max()) < 16
        assert ae.decode(idx).shape == x.shape
        assert stats["indices"].shape == idx.shape
    else:
        with pytest.raises(TypeError, match="vector-quantised"):
            ae.encode(x)
    assert PatchDiscriminator(channels=channels, width=8)(x).shape[:2] == (3, 1)


def test_quantizer_gradient_is_straight_through():
    vq = VectorQuantizer(codebook_size=8, dim=4).eval()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, stats = vq(z_e)
    # the forward pass sees codebook vectors...
    assert torch.allclose(z_q, vq.lookup(stats["indices"]))
    # ...and the upstream gradient reaches the encoder output unchanged
    weight = torch.randn_like(z_q)
    (z_q * weight).sum().backward()
    assert torch.allclose(z_e.grad, weight)


def test_quantizer_commitment_loss_and_ema_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=4, dim=2, beta=0.25, decay=0.5, restart_threshold=0.0)
    vq.embed.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))
    vq.embed_avg.copy_(vq.embed)
    vq.cluster_size.fill_(1.0)
    z = torch.tensor([[2.0, 0.0], [2.0, 0.0]]).t().reshape(1, 2, 1, 2)  # two vectors at (2, 0)
    _, loss, stats = vq(z)
    assert stats["indices"].flatten().tolist() == [0, 0]
    assert loss.item() == pytest.approx(0.25 * 1.0 / 2)  # β·mean((2-1)² + 0²) over 2 dims
    # EMA: code 0 moves towards the mean of the vectors assigned to it, nothing learns by grad
    assert 1.0 < vq.embed[0, 0].item() < 2.0
    assert not any(p.requires_grad for p in vq.parameters())


def test_dead_codes_restart_onto_the_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=8, dim=4, restart_threshold=1.0)
    vq.embed.fill_(100.0)  # far from every input: would never be chosen
    vq.embed[0] = 0.0
    vq.embed_avg.copy_(vq.embed)
    vq.cluster_size.fill_(0.0)
    vq.cluster_size[0] = 50.0  # only code 0 is alive
    z = torch.randn(4, 4, 4, 4)
    vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for code in vq.embed[1:]:  # every dead code now sits on one of the batch's vectors
        assert (flat - code).norm(dim=1).min() < 1e-5
    _, _, stats = vq.eval()(z)
    assert stats["codebook_usage"].item() > 0.5  # no longer collapsed onto code 0


def test_without_restart_the_codebook_stays_collapsed():
    vq = VectorQuantizer(codebook_size=8, dim=4, restart_threshold=0.0)
    vq.embed.fill_(100.0)
    vq.embed[0] = 0.0
    vq.embed_avg.copy_(vq.embed)
    vq.cluster_size.fill_(1.0)
    _, _, stats = vq(torch.randn(4, 4, 4, 4))
    assert stats["codebook_usage"].item() == pytest.approx(1 / 8)


def test_adaptive_weight_balances_gradients():
    w = torch.randn(3, 3, requires_grad=True)
    rec, gan = (w * 2).sum(), (w * 0.5).sum()
    assert adaptive_weight(rec, gan, w).item() == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize("bottleneck", ["vq", "kl"])
def test_autoencoder_loss_falls_and_decoder_inverts_encoder(bottleneck):
    torch.manual_seed(0)
    x = digits(32)
    ae = Autoencoder(image_channels=1, channels=16, channel_mult=(1, 2), latent_channels=8,
                     bottleneck=bottleneck, codebook_size=64)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        rec, loss, _ = ae(x)
        total = (rec - x).abs().mean() + (loss if bottleneck == "vq" else 1e-4 * loss)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float((rec - x).abs().mean().detach()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    ae.eval()
    with torch.no_grad():
        rec = ae.decode_latents(ae.encode_latents(x))
    # the decoder inverts the encoder: error well below the data's own variance
    assert float((rec - x).pow(2).mean()) < 0.25 * float(x.var())


# ---- transformer --------------------------------------------------------------------------

def test_kv_cache_sampling_matches_uncached():
    torch.manual_seed(0)
    net = Transformer(vocab_size=20, seq_len=12, num_classes=3, dim=32, layers=2, heads=4).eval()
    labels = torch.tensor([0, 1, 2, 1])
    for kwargs in ({}, {"top_k": 5}, {"top_p": 0.8, "temperature": 0.7}):
        cached = net.generate(4, labels=labels, use_cache=True,
                              generator=torch.Generator().manual_seed(3), **kwargs)
        plain = net.generate(4, labels=labels, use_cache=False,
                             generator=torch.Generator().manual_seed(3), **kwargs)
        assert cached.shape == (4, 12) and torch.equal(cached, plain)
    # the cached logits are the full-sequence logits, position by position
    seq = torch.cat([net.start_tokens(4, labels, torch.device("cpu")), cached[:, :-1]], dim=1)
    full, _ = net(seq)
    cache, steps = None, []
    for t in range(seq.shape[1]):
        logits, cache = net(seq[:, t:t + 1], cache)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_transformer_loss_falls_on_a_tiny_batch():
    torch.manual_seed(0)
    net = Transformer(vocab_size=16, seq_len=8, num_classes=2, dim=32, layers=2, heads=2)
    tokens = torch.randint(0, 16, (8, 8))
    labels = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = net.loss(tokens, labels).item()
    assert first == pytest.approx(np.log(16), rel=0.1)  # uniform at init
    for _ in range(40):
        loss = net.loss(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.3 * first



@pytest.mark.parametrize("dim", [128, 768])
def test_transformer_initialisation_scales_with_the_width(dim):
    """PyTorch's linear init (std 1/sqrt(3 dim)), He-normal token embeddings and N(0, 1/dim)
    positions: 2.5x GPT-2's fixed 0.02 at width 128, about it at 768."""
    torch.manual_seed(0)
    net = Transformer(vocab_size=512, seq_len=64, dim=dim, layers=1, heads=4)
    assert float(net.head.weight.std()) == pytest.approx((3 * dim) ** -0.5, rel=0.05)
    assert float(net.blocks[0].attn.qkv.weight.std()) == pytest.approx((3 * dim) ** -0.5, rel=0.05)
    assert float(net.tok.weight.std()) == pytest.approx((2 / dim) ** 0.5, rel=0.05)
    assert float(net.pos.std()) == pytest.approx(dim ** -0.5, rel=0.05)


# ---- workers chained in-process -----------------------------------------------------------

TINY_AE = {"channels": 8, "channel_mult": [1, 2, 2], "disc_start": 4, "disc_width": 8}
TINY_TRAIN = {"batch_size": 16, "log_every": 2, "sample_images": 4}


def chain_spec(ar_train: dict | None = None, **ar_model) -> dict:
    return {
        "experiment": "fam", "defaults": {"data": {"dataset": "digits", "image_size": 16},
                                          "train": TINY_TRAIN},
        "jobs": [
            {"name": "vq", "kind": "train", "family": "vqgan", "train": {"steps": 8},
             "model": {**TINY_AE, "latent_channels": 8, "codebook_size": 32}},
            {"name": "ar", "kind": "train", "family": "autoregressive",
             "train": {"steps": 6, **(ar_train or {})},
             "model": {"tokenizer": "vq", "dim": 32, "layers": 2, "heads": 2, **ar_model}},
            {"name": "ar-s", "kind": "sample", "family": "autoregressive", "from": "ar",
             "sample": {"num_images": 6, "top_k": 8, "batch_size": 4}},
            {"name": "vq-s", "kind": "sample", "family": "vqgan", "from": "vq",
             "sample": {"num_images": 5}},
            {"name": "ae", "kind": "train", "family": "ldm", "train": {"steps": 8},
             "model": {"stage": "autoencoder", **TINY_AE}},
            {"name": "ldm", "kind": "train", "family": "ldm", "train": {"steps": 4},
             "model": {"autoencoder": "ae", "channels": 8, "channel_mult": [1, 2], "timesteps": 20,
                       "class_conditional": True}},
            {"name": "ldm-s", "kind": "sample", "family": "ldm", "from": "ldm",
             "sample": {"num_images": 3, "steps": 5, "label": 2, "guidance": 2.0}},
            {"name": "ldm-fast", "kind": "distill", "family": "ldm", "teacher": "ldm",
             "train": {"steps": 2},
             "distill": {"method": "progressive", "teacher_steps": 4, "student_steps": 1}},
            {"name": "ldm-fast-s", "kind": "sample", "family": "ldm", "from": "ldm-fast",
             "sample": {"num_images": 3}},
        ]}


def outputs(result: dict) -> np.ndarray:
    parent, _, name = result["outputs"][0].rpartition("/")
    return np.load(io.BytesIO(open_storage(parent).get_bytes(name)))["images"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    return tmp, run_jobs(tmp, chain_spec(class_conditional=True))


def test_vqgan_trains_logs_and_reconstructs(chain):
    tmp, results = chain
    vq = results["vq"]
    assert vq["status"] == "finished" and vq["step"] == 8
    m = vq["metrics"]
    assert 0 < m["holdout_mse"] < 2 and m["holdout_psnr"] == pytest.approx(10 * np.log10(4 / m["holdout_mse"]))
    assert 0 < m["holdout_codebook_usage"] <= 1 and 1 <= m["holdout_perplexity"] <= 32
    history = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(results["_runs"]["vq"]).data.metrics
    for key in ("rec_l1", "mse", "psnr", "perplexity", "codebook_usage", "d_loss", "g_loss",
                "disc_adaptive_weight", "holdout_psnr"):
        assert key in history, key
    images = outputs(results["vq-s"])
    assert images.shape == (5, 16, 16, 1) and images.dtype == np.uint8
    assert results["vq-s"]["metrics"]["holdout_psnr"] > 0


def test_autoregressive_reads_tokens_once_and_samples_through_the_vqgan(chain, monkeypatch):
    tmp, results = chain
    ar = results["ar"]
    assert ar["status"] == "finished" and ar["step"] == 6
    ckpt = load_checkpoint(*resolve_checkpoint_uri(ar["checkpoint"]))
    # the checkpoint carries its frozen tokenizer: sampling needs nothing else
    assert ckpt.meta["frozen"]["tokenizer"]["family"] == "vqgan"
    vq = load_checkpoint(*resolve_checkpoint_uri(results["vq"]["checkpoint"]))
    assert torch.equal(ckpt.tensors["frozen.tokenizer/bottleneck.embed"], vq.tensors["ae/bottleneck.embed"])
    # its fit to the held-out images' codes, of its EMA (what it samples with) and raw weights
    held = ar["metrics"]
    nats, raw = heldout_fit(tmp, ckpt, vq)
    assert held["holdout_nats_per_token_raw"] == pytest.approx(raw, rel=1e-4) and raw != nats
    assert held["holdout_nats_per_token"] == pytest.approx(nats, rel=1e-4)
    assert 0 < nats < np.log(32) + 0.5 and held["holdout_perplexity"] == pytest.approx(np.exp(nats))
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(results["_runs"]["ar"]).data
    assert run.metrics["holdout_nats_per_token"] == pytest.approx(nats, rel=1e-4)
    assert run.tags["genforge.encoded_cache"] == "miss"
    assert {"loss", "perplexity", "tokens_per_s"} <= set(run.metrics)
    assert run.metrics["tokens_per_s"] == pytest.approx(run.metrics["images_per_s"] * 16)
    images = outputs(results["ar-s"])
    assert images.shape == (6, 16, 16, 1)
    assert results["ar-s"]["metrics"]["tokens_per_s"] > 0
    # a second model on the same tokenizer and data reuses the cached tokens, reading no image
    from workers.data import StagedImages

    read, shards = StagedImages.read, []
    monkeypatch.setattr(StagedImages, "read", lambda self, i: shards.append(i) or read(self, i))
    again = run_jobs(tmp, chain_spec({"ema_decay": 0}, class_conditional=True, dim=16),
                     only=["ar"])
    assert client.get_run(again["_runs"]["ar"]).data.tags["genforge.encoded_cache"] == "hit"
    assert shards == []
    # `train.ema_decay: 0`: no average is kept, and its fit is its weights' own
    plain = load_checkpoint(*resolve_checkpoint_uri(again["ar"]["checkpoint"]))
    assert not any(k.startswith("ema.") for k in plain.tensors)
    own, raw = heldout_fit(tmp, plain, vq)
    held = again["ar"]["metrics"]
    assert raw is None and "holdout_nats_per_token_raw" not in held
    assert held["holdout_nats_per_token"] == pytest.approx(own, rel=1e-4)


def heldout_fit(tmp, ckpt, vq) -> tuple[float, float | None]:
    """An AR checkpoint's held-out nats per token, scored here, of the weights it samples with
    (its EMA where it has one), and of its raw weights where those differ (else None)."""
    from orchestrator.datasets import heldout_key
    from workers.autoencoder import build_autoencoder
    from workers.data import load_images

    data = ckpt.meta["data"]
    x, y = load_images(open_storage(f"file://{tmp / 'store'}"), heldout_key(ckpt.meta["data_key"]),
                       image_size=data["image_size"], channels=data["channels"], limit=1000)
    assert len(x) > 100
    ae = build_autoencoder("vqgan", vq.meta["model"], 1)
    ae.load_state_dict({k[3:]: v for k, v in vq.tensors.items() if k.startswith("ae/")})
    m = ckpt.meta["model"]
    net = Transformer(vocab_size=32, seq_len=16, num_classes=10, dim=m["dim"], layers=m["layers"],
                      heads=m["heads"], dropout=m["dropout"]).eval()
    codes = ae.eval().encode(x).long().reshape(len(x), -1)

    def fit(prefix: str) -> float:
        net.load_state_dict({k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)})
        with torch.no_grad():
            return float(net.loss(codes, y))

    if not any(k.startswith("ema.net/") for k in ckpt.tensors):
        return fit("net/"), None
    return fit("ema.net/"), fit("net/")


def test_latent_diffusion_scales_latents_and_decodes_samples(chain):
    tmp, results = chain
    ckpt = load_checkpoint(*resolve_checkpoint_uri(results["ldm"]["checkpoint"]))
    scale = float(ckpt.tensors["frozen.autoencoder/latent_scale"])
    assert scale > 0 and scale != 1.0
    tags = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(results["_runs"]["ldm"]).data.tags
    assert float(tags["genforge.latent_scale"]) == pytest.approx(scale, rel=1e-4)
    # the U-Net works in the 4x4x4 latent space of the 16x16 images
    assert ckpt.tensors["net/conv_in.weight"].shape[1] == 4
    images = outputs(results["ldm-s"])
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    # class-conditional: 10 classes and "no label" embedded; sampled guided, of class 2
    assert ckpt.tensors["net/label_embed.weight"].shape[0] == 11
    assert results["ldm-s"]["sampler"]["label"] == 2 and results["ldm-s"]["sampler"]["guidance"] == 2
    assert outputs(results["ldm-s"]).std() > 0


def test_latent_diffusion_distils_in_latent_space(chain):
    """Progressive distillation of the LDM: the student keeps the teacher's frozen autoencoder
    and latent scale, and samples images in its one step."""
    tmp, results = chain
    teacher = load_checkpoint(*resolve_checkpoint_uri(results["ldm"]["checkpoint"]))
    student = load_checkpoint(*resolve_checkpoint_uri(results["ldm-fast"]["checkpoint"]))
    assert results["ldm-fast"]["step"] == 4  # 4 -> 2 -> 1: two rounds of 2 steps
    assert student.meta["model"]["distilled_steps"] == 1
    assert student.meta["model"]["distilled_guidance"] == 1.5  # the default guidance, built in
    for name, tensor in teacher.tensors.items():
        if name.startswith("frozen.autoencoder/"):
            assert torch.equal(student.tensors[name], tensor), name
    assert results["ldm-fast"]["metrics"]["student_sampling_steps"] == 1
    images = outputs(results["ldm-fast-s"])
    assert images.shape == (3, 16, 16, 1) and images.std() > 0
