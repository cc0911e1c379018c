"""genforge beside well-known reference implementations, on the same data, scored alike.

For each family and seed, genforge's jobs run through the real stack (a private one: Ray,
MLflow, SeaweedFS), as a user runs them; then the reference implementation
(bench/references.py) trains in this process, on the same number of threads and the same
staged images:

- `gan`, `ddpm`: an evaluate job scores genforge's model; the reference trains for exactly the
  seconds genforge's training loop took, and its samples are scored like the evaluate job's
  (bench/scoring.py: the same held-out images, the same cached feature network, the same
  metrics). The real-vs-real baseline is the evaluate job's. For the GAN, genforge's own
  networks also run in the reference's loop (`outside`), so that the harness's cost per step is
  told apart from the architecture's.
- `ldm`: the diffusion stage of `family: ldm`, with the `ddpm` comparison's U-Net and recipe,
  over the latents of a small KL autoencoder (`stage: autoencoder`), beside diffusers' DDPM of
  the same shape on the same latents (the training images encoded by that autoencoder and
  scaled by the factor genforge's job measured), trained for genforge's loop seconds; both
  sides' latents are decoded by the same autoencoder and scored as `ddpm`'s.
- `vqgan`: `family: vqgan` at its defaults beside the same encoder and decoder around
  vector-quantize-pytorch's VectorQuantize, trained for genforge's loop seconds; both are
  measured as genforge's job measures itself at the end (its result's metrics): held-out PSNR
  (higher is better), and the perplexity and codebook usage of the held-out codes.
- `ar`: a small VQGAN, then `family: autoregressive` at its defaults over its codes, beside
  x-transformers' decoder of the same shape trained on the same codes (the training images
  encoded by that VQGAN's checkpoint) for the same steps, hence the same tokens seen. genforge's
  job reports nats per token over the held-out images' codes (lower is better) of the
  weights it samples with (its EMA); the reference is measured the same way here, and so are
  genforge's raw weights. 1,500 steps by default (about 35 minutes a seed on 2 cores).
  genforge's transformer also trains in the reference's loop (`outside`), as the GAN's do.

    python bench/peers.py [--families gan ddpm ldm vqgan ar] [--seeds 0 1 2] [--out bench/results/peers.json]

Needs the `bench` extra (pip install -e '.[bench]') and ../shared/data/fashion-mnist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import HOME, ROOT, finish, launch, private_stack, report, write_report  # noqa: E402
from orchestrator.checkpoints import Checkpoint, load_checkpoint  # noqa: E402
from orchestrator.spec import TrainSpec  # noqa: E402
from orchestrator.storage import Storage  # noqa: E402
from workers.vqgan.config import VQGANModel  # noqa: E402

FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"
THREADS = 2
NUM_SAMPLES = 1000
DATA = {"dataset": "npz", "path": str(FASHION / "train.npz"), "image_size": 16,
        "split": {"heldout": str(FASHION / "test.npz")}}
TRAIN = TrainSpec().model_dump()  # genforge's train section defaults (lr, batch size, clipping)
VQGAN_MODEL = VQGANModel().model_dump(mode="json")  # `family: vqgan`'s defaults
AE_BETAS = (0.5, 0.9)  # AutoencoderWorker.configure_optimizers's Adam
# ARWorker.configure_optimizers's AdamW, and the train section's lr, batch size and clipping
AR_RECIPE = {"betas": (0.9, 0.95), "weight_decay": 0.01, "lr": TRAIN["lr"],
             "batch_size": TRAIN["batch_size"], "grad_clip": TRAIN["grad_clip"]}
# The `ar` family's tokenizer: a small VQGAN (defaults but for these) whose 16 px images make
# 8x8 = 64 codes of its 256-entry codebook; its steps take about a minute and a half.
AR_TOKENIZER = {"channels": 32, "channel_mult": [1, 2]}
AR_TOKENIZER_STEPS = 200
# The `ldm` family's first stage: a small KL autoencoder whose 16 px images make 4x8x8 latents.
LDM_AUTOENCODER = {"stage": "autoencoder", "channels": 32, "channel_mult": [1, 2]}
LDM_AUTOENCODER_STEPS = 200
LDM_SAMPLER = {"sampler": "ddim", "steps": 50}
# diffusers' DDPM beside `ddpm_job`'s: the same U-Net shape, lr, batch and EMA decay
DIFFUSERS_RECIPE = {"channels": 32, "channel_mult": (1, 2), "lr": 1e-3, "batch_size": 128,
                    "ema_decay": 0.995}

# (root, experiment, genforge's run, seed) -> (genforge's metrics and the like, the reference's run)
Compare = Callable[[Storage, str, dict, int], tuple[dict, dict]]


def gan_job(seed: int, steps: int) -> dict:
    """`family: gan` at its defaults, batch 64, lr 2e-4 (the reference's)."""
    return {"name": "gan", "kind": "train", "family": "gan", "model": {},
            "train": {"steps": steps, "batch_size": 64, "lr": 2e-4, "seed": seed,
                      "log_every": 50, "sample_images": 16}}


def ddpm_job(seed: int, steps: int) -> dict:
    """The quickstart's U-Net and recipe (cosine schedule, EMA 0.995), batch 128."""
    return {"name": "ddpm", "kind": "train", "family": "ddpm",
            "model": {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                      "timesteps": 1000, "schedule": "cosine"},
            "train": {"steps": steps, "batch_size": 128, "lr": 1e-3, "warmup_steps": 100,
                      "ema_decay": 0.995, "seed": seed, "log_every": 50, "sample_images": 16}}


def ldm_jobs(seed: int, steps: int) -> list[dict]:
    """The LDM_AUTOENCODER, then the diffusion stage over its latents: `ddpm_job`'s U-Net and
    recipe."""
    diffusion = ddpm_job(seed, steps)
    return [{"name": "autoencoder", "kind": "train", "family": "ldm", "model": LDM_AUTOENCODER,
             "train": {"steps": LDM_AUTOENCODER_STEPS, "seed": seed}},
            {**diffusion, "name": "ldm", "family": "ldm",
             "model": {**diffusion["model"], "autoencoder": "autoencoder"}}]


def vqgan_jobs(seed: int, steps: int) -> list[dict]:
    """`family: vqgan` at its defaults (its patch discriminator joins at step 1000)."""
    return [{"name": "vqgan", "kind": "train", "family": "vqgan", "model": {},
             "train": {"steps": steps, "seed": seed}}]


def ar_jobs(seed: int, steps: int) -> list[dict]:
    """The AR_TOKENIZER VQGAN, then `family: autoregressive` at its defaults over its codes."""
    return [{"name": "tokenizer", "kind": "train", "family": "vqgan", "model": AR_TOKENIZER,
             "train": {"steps": AR_TOKENIZER_STEPS, "seed": seed}},
            {"name": "ar", "kind": "train", "family": "autoregressive",
             "model": {"tokenizer": "tokenizer"}, "train": {"steps": steps, "seed": seed}}]


def evaluated(make: Callable[[int, int], dict | list[dict]], sample: dict
              ) -> Callable[[int, int], list[dict]]:
    """The jobs: `make`'s train job (or jobs, the last one scored) and an evaluate job
    ("score") of it, sampling with `sample`."""
    def jobs(seed: int, steps: int) -> list[dict]:
        made = make(seed, steps)
        train = made if isinstance(made, list) else [made]
        return [*train, {"name": "score", "kind": "evaluate", "from": train[-1]["name"],
                         "evaluate": {"num_samples": NUM_SAMPLES, "sample": sample}}]
    return jobs


# ---- genforge's results and checkpoints, and the data its jobs read ------------------------

def job_prefix(root: Storage, experiment: str, job: str) -> str:
    """The folder of the finished job `job` of `experiment` (experiment/job/hash)."""
    key = next(k for k in root.list(f"{experiment}/{job}/") if k.endswith("result.json"))
    return key.rsplit("/", 1)[0]


def result_of(root: Storage, experiment: str, job: str) -> dict:
    return json.loads(root.get_bytes(f"{job_prefix(root, experiment, job)}/result.json"))


def checkpoint_of(root: Storage, experiment: str, job: str) -> Checkpoint:
    """The job's final checkpoint (safetensors weights, a weights-only state)."""
    return load_checkpoint(root.child(job_prefix(root, experiment, job)))


def part(ckpt: Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}


def staged(root: Storage) -> tuple[torch.Tensor, torch.Tensor]:
    """DATA's staged training images and the first HOLDOUT_MAX held-out ones, in [-1, 1]:
    what the jobs train on and measure themselves on at the end."""
    from orchestrator.datasets import heldout_key, stage
    from orchestrator.spec import DataSpec
    from workers.autoencoder import HOLDOUT_MAX
    from workers.data import load_images

    spec = DataSpec.model_validate(DATA)
    key = stage(spec, root)  # staged already by the jobs: only its key
    shape = {k: spec.model_dump(mode="json")[k] for k in ("image_size", "channels")}
    train, _ = load_images(root, key, **shape)
    heldout, _ = load_images(root, heldout_key(key), **shape, limit=HOLDOUT_MAX)
    return train, heldout


def first_stage(ckpt: Checkpoint) -> torch.nn.Module:
    """A VQGAN checkpoint's autoencoder, frozen, as the AR worker's `load_first_stage` loads it."""
    from workers.autoencoder import build_autoencoder

    ae = build_autoencoder(ckpt.meta["family"], ckpt.meta["model"], ckpt.meta["image_shape"][0])
    ae.load_state_dict(part(ckpt, "ae/"))
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def encode(ae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, h*w) code sequences of images, in the AR worker's batches of ENCODE_BATCH."""
    from workers.autoencoder import ENCODE_BATCH

    return torch.cat([ae.encode(x[i:i + ENCODE_BATCH]) for i in range(0, len(x), ENCODE_BATCH)]
                     ).reshape(len(x), -1).long()


def genforge_transformer(ckpt: Checkpoint, prefix: str, vocab_size: int, seq_len: int
                         ) -> torch.nn.Module:
    """The AR checkpoint's transformer ("net/": as trained, "ema.net/": its EMA), unconditional."""
    from workers.autoregressive.transformer import Transformer

    m = ckpt.meta["model"]
    net = Transformer(vocab_size=vocab_size, seq_len=seq_len, dim=m["dim"], layers=m["layers"],
                      heads=m["heads"], dropout=m["dropout"])
    net.load_state_dict(part(ckpt, prefix))
    return net.eval()


def params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---- each family's reference, and genforge's metrics -----------------------------------------

def timed(steps: int, seconds: float, **fields: Any) -> dict:
    return {"steps": steps, "loop_s": seconds, "steps_per_s": steps / seconds, **fields}


# (root, experiment, training images, seconds, seed) -> (samples in [-1, 1], steps)
Reference = Callable[[Storage, str, torch.Tensor, float, int], tuple[torch.Tensor, int]]


def by_samples(reference: Reference) -> Compare:
    """A generator family's comparison: genforge's metrics are its evaluate job's; the
    reference trains for genforge's loop seconds and its samples are scored alike."""
    def compare(root: Storage, experiment: str, ours: dict, seed: int) -> tuple[dict, dict]:
        from scoring import Scorer

        scored = result_of(root, experiment, "score")["metrics"]
        scorer = Scorer(root, DATA, NUM_SAMPLES)
        samples, steps = reference(root, experiment, scorer.train, ours["loop_s"], seed)
        return ({"metrics": scored["sources"][0]["metrics"], "baseline": scored["baseline"]},
                timed(steps, ours["loop_s"], metrics=scorer(samples)))
    return compare


def gan_reference(root: Storage, experiment: str, x: torch.Tensor, seconds: float, seed: int
                  ) -> tuple[torch.Tensor, int]:
    from references import dcgan

    return dcgan(x, seconds, seed, NUM_SAMPLES)


def ddpm_reference(root: Storage, experiment: str, x: torch.Tensor, seconds: float, seed: int
                   ) -> tuple[torch.Tensor, int]:
    from references import diffusers_ddpm

    return diffusers_ddpm(x, seconds, seed, NUM_SAMPLES, **DIFFUSERS_RECIPE, sampler_steps=50)


def ldm_reference(root: Storage, experiment: str, x: torch.Tensor, seconds: float, seed: int
                  ) -> tuple[torch.Tensor, int]:
    """diffusers' DDPM on the latents of the ldm job's frozen autoencoder (its checkpoint's
    copy, with the latent scale the job measured), decoded by it."""
    from references import diffusers_ddpm
    from workers.autoencoder import ENCODE_BATCH

    ae = first_stage(checkpoint_of(root, experiment, "autoencoder"))
    ae.load_state_dict(part(checkpoint_of(root, experiment, "ldm"), "frozen.autoencoder/"))
    scale = float(ae.latent_scale)
    with torch.no_grad():
        z = torch.cat([ae.encode_latents(x[i:i + ENCODE_BATCH])
                       for i in range(0, len(x), ENCODE_BATCH)]) * scale
    latents, steps = diffusers_ddpm(z, seconds, seed, NUM_SAMPLES, **DIFFUSERS_RECIPE,
                                    sampler_steps=LDM_SAMPLER["steps"], clip=False)
    with torch.no_grad():
        return ae.decode_latents(latents / scale).clamp(-1, 1), steps


def vqgan_compare(root: Storage, experiment: str, ours: dict, seed: int) -> tuple[dict, dict]:
    """genforge's held-out metrics from its job's result; the VectorQuantize autoencoder trained
    for genforge's loop seconds with its lr, Adam betas, batch size and gradient clipping, and
    measured alike on the same held-out images."""
    from references import reconstruction_metrics, vq_autoencoder

    ours_metrics = {k.removeprefix("holdout_"): v
                    for k, v in result_of(root, experiment, "vqgan")["metrics"].items()}
    train, heldout = staged(root)
    net, steps = vq_autoencoder(train, ours["loop_s"], seed, VQGAN_MODEL, lr=TRAIN["lr"],
                                betas=AE_BETAS, batch_size=TRAIN["batch_size"],
                                grad_clip=TRAIN["grad_clip"])
    return ({"metrics": ours_metrics},
            timed(steps, ours["loop_s"], metrics=reconstruction_metrics(net, heldout)))


def ar_shape(ckpt: Checkpoint, vocab_size: int) -> dict[str, int]:
    """The AR checkpoint's transformer shape, as the reference's arguments."""
    m = ckpt.meta["model"]
    return {"vocab_size": vocab_size, "dim": m["dim"], "layers": m["layers"], "heads": m["heads"]}


def ar_compare(root: Storage, experiment: str, ours: dict, seed: int) -> tuple[dict, dict]:
    """x-transformers' decoder trained on the tokenizer's codes of the training images for
    genforge's steps at its batch size, lr, AdamW and clipping; both scored in nats per token
    over the held-out images' codes."""
    from references import (ar_net_outside, nats_per_token, train_x_transformer,
                            x_transformer_logits)

    ae = first_stage(checkpoint_of(root, experiment, "tokenizer"))
    train, heldout = staged(root)
    codes, held = encode(ae, train), encode(ae, heldout)
    vocab, seq_len = ae.bottleneck.codebook_size, codes.shape[1]
    ckpt = checkpoint_of(root, experiment, "ar")
    raw = genforge_transformer(ckpt, "net/", vocab, seq_len)
    # what the job samples with: its EMA, unless `train.ema_decay: 0` kept none
    sampled = (genforge_transformer(ckpt, "ema.net/", vocab, seq_len)
               if any(k.startswith("ema.net/") for k in ckpt.tensors) else raw)
    net, seconds, seen = train_x_transformer(codes, ours["steps"], seed,
                                             **ar_shape(ckpt, vocab), **AR_RECIPE)
    # genforge's own transformer in that loop: the harness's cost apart from the network's
    outside_s = ar_net_outside(codes, ours["steps"], seed, **ar_shape(ckpt, vocab),
                               dropout=ckpt.meta["model"]["dropout"], **AR_RECIPE)
    # the job's own figure (of the weights it samples with), checked against this bench's
    # measure of the same weights; the raw weights too, as the reference has no EMA
    reported = result_of(root, experiment, "ar")["metrics"]["holdout_nats_per_token"]
    ours_metrics = {"nats_per_token": reported,
                    "nats_per_token_measured_here": nats_per_token(sampled.logits, held),
                    "nats_per_token_raw": nats_per_token(raw.logits, held)}
    theirs_metrics = {"nats_per_token": nats_per_token(lambda t: x_transformer_logits(net, t), held)}
    tokens = ours["steps"] * min(TRAIN["batch_size"], len(codes)) * seq_len  # InMemory's batches
    return ({"metrics": ours_metrics, "tokens_seen": tokens, "params": params(raw),
             "seq_len": seq_len, "tokenizer": result_of(root, experiment, "tokenizer")["metrics"],
             "same_network": {"outside_steps_per_s": ours["steps"] / outside_s,
                              "ratio": ours["steps_per_s"] * outside_s / ours["steps"]}},
            timed(ours["steps"], seconds, metrics=theirs_metrics, tokens_seen=seen,
                  params=params(net)))


@dataclass(frozen=True)
class Family:
    """genforge's jobs for (seed, steps), of which the one named after the family is compared
    (its steps, its loop's seconds); their default steps; how the reference is set beside it
    (`Compare`); what the reference is; the headline metric, in both sides' metrics, and which
    way is better."""

    jobs: Callable[[int, int], list[dict]]
    steps: int
    compare: Compare
    about: str
    metric: str = "fd"
    higher_is_better: bool = False
    also: tuple[str, ...] = ()  # genforge's further metrics, summarised beside the headline


FAMILIES: dict[str, Family] = {
    "gan": Family(evaluated(gan_job, {}), 3000, by_samples(gan_reference),
                  "pytorch/examples DCGAN at 16 px (nz 100, ngf = ndf = 64, BCE, Adam 2e-4 (0.5, 0.999))"),
    "ddpm": Family(evaluated(ddpm_job, {"sampler": "ddim", "steps": 50}), 700,
                   by_samples(ddpm_reference),
                   "diffusers UNet2DModel (32, 64) + DDPMScheduler (cosine) + AdamW 1e-3 + EMAModel "
                   "0.995, batch 128, DDIMScheduler 50 steps"),
    "ldm": Family(evaluated(ldm_jobs, LDM_SAMPLER), 1500, by_samples(ldm_reference),
                  "diffusers UNet2DModel (32, 64) + DDPMScheduler (cosine, no clipping) + AdamW "
                  "1e-3 + EMAModel 0.995, batch 128, DDIMScheduler 50 steps, on the same KL "
                  "autoencoder's scaled 4x8x8 latents, decoded by it"),
    # ~1.5 s a step at batch 128 on 2 threads: 100 steps, 2.5 min (no discriminator before 1000)
    "vqgan": Family(vqgan_jobs, 100, vqgan_compare,
                    "genforge's Encoder/Decoder (64, (1, 2, 2), 32-dim latents) + vector-quantize-"
                    "pytorch VectorQuantize (256 codes, EMA 0.99, commitment 0.25, kmeans_init, "
                    "threshold_ema_dead_code 2), L1 + commitment, Adam 2e-4 (0.5, 0.9), clip 1, "
                    "batch 128", metric="psnr", higher_is_better=True),
    # ~0.42 s a step (128 sequences of 64 tokens) on 2 threads: 1,500 steps, 10.5 min a side.
    # Not fewer: the job samples with an EMA of its weights, which trails them until about
    # 1,200 steps (bench/ema_lag.py), so a shorter run scores its warm-up, not the model.
    "ar": Family(ar_jobs, 1500, ar_compare,
                 "x-transformers TransformerWrapper(Decoder(dim 128, depth 4, heads 4, head size "
                 "32)) over the same 64-token code sequences, AdamW 2e-4 (0.9, 0.95) wd 0.01, "
                 "clip 1, batch 128, genforge's steps", metric="nats_per_token",
                 also=("nats_per_token_raw",)),
}


def run_genforge(root: Storage, family: str, seed: int, steps: int) -> tuple[str, dict]:
    """The family's jobs through the stack: (their experiment, the compared job's timing)."""
    experiment = f"peers-{family}-{seed}"
    spec = {"experiment": experiment,
            "defaults": {"data": DATA, "resources": {"cpus": THREADS, "gpus": 0}},
            "jobs": FAMILIES[family].jobs(seed, steps)}
    finish(launch(HOME, spec)[1])
    timing = result_of(root, experiment, family)["timing"]
    return experiment, timed(timing["steps_run"], timing["loop_s"])


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def headline(runs: list[dict], metric: str) -> dict[str, dict[str, float]]:
    """The metric's mean and spread over the seeds, each side's (and the real-vs-real one)."""
    out = {side: summary([r[side]["metrics"][metric] for r in runs])
           for side in ("genforge", "reference")}
    if all("baseline" in r["genforge"] for r in runs):
        out["real_vs_real"] = summary([r["genforge"]["baseline"][metric] for r in runs])
    return out


def compare_family(root: Storage, family: str, seeds: list[int], steps: int) -> dict[str, Any]:
    fam = FAMILIES[family]
    runs = []
    for seed in seeds:
        experiment, ours = run_genforge(root, family, seed, steps)
        extra, theirs = fam.compare(root, experiment, ours, seed)
        ours.update(extra)
        runs.append({"seed": seed, "genforge": ours, "reference": theirs})
        print(json.dumps({"family": family, "seed": seed,
                          fam.metric: [ours["metrics"][fam.metric], theirs["metrics"][fam.metric]],
                          "steps_per_s": [ours["steps_per_s"], theirs["steps_per_s"]]}),
              file=sys.stderr)
    return family_report(family, steps, runs)


def family_report(family: str, steps: int, runs: list[dict]) -> dict[str, Any]:
    """One family's entry of the report: its runs (one per seed) and their summaries."""
    fam = FAMILIES[family]
    return {"reference": fam.about, "genforge_steps": steps, "runs": runs, "metric": fam.metric,
            "higher_is_better": fam.higher_is_better, fam.metric: headline(runs, fam.metric),
            **{m: {"genforge": summary([r["genforge"]["metrics"][m] for r in runs])}
               for m in fam.also},
            "steps_per_s": {side: summary([r[side]["steps_per_s"] for r in runs])
                            for side in ("genforge", "reference")},
            **({"same_network": {k: summary([r["genforge"]["same_network"][k] for r in runs])
                                 for k in ("outside_steps_per_s", "ratio")}}
               if all("same_network" in r["genforge"] for r in runs) else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of genforge's compared job (each family's own by default)")
    parser.add_argument("--outside-s", type=float, default=30.0,
                        help="seconds genforge's GAN networks run in the reference's loop")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers.json"),
                        help="the report, replaced (with only the families run)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    out: dict[str, Any] = {}
    with private_stack(THREADS) as (_, _, root):
        for family in args.families:
            entry = compare_family(root, family, args.seeds, args.steps or FAMILIES[family].steps)
            if family == "gan":  # the same networks inside genforge and in the reference's loop
                from references import gan_nets_outside

                outside = gan_nets_outside(staged(root)[0], args.outside_s, 0, z_dim=64, width=64)
                entry["same_network"] = {
                    "outside_steps_per_s": outside / args.outside_s,
                    "inside_steps_per_s": entry["steps_per_s"]["genforge"]["mean"],
                    "ratio": entry["steps_per_s"]["genforge"]["mean"] * args.outside_s / outside}
            out[family] = entry
    write_report(args.out, report("peers", THREADS, num_samples=NUM_SAMPLES, data=DATA,
                                  families=out))
    print(json.dumps({f: {e["metric"]: e[e["metric"]], "steps_per_s": e["steps_per_s"],
                          **({"same_network": e["same_network"]} if "same_network" in e else {})}
                      for f, e in out.items()}, indent=2))


if __name__ == "__main__":
    main()
