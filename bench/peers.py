"""genforge beside well-known reference implementations at the same wall-clock training budget,
on the same data, scored by genforge's own evaluation.

For each family and seed, genforge's training job and an evaluate job of it run through the
real stack (a private one: Ray, MLflow, SeaweedFS), as a user runs them; then the reference
implementation (bench/references.py) trains in this process, on the same number of threads
and the same staged images, for exactly the seconds genforge's training loop took, and its
samples are scored like the evaluate job's (bench/scoring.py: the same held-out images, the
same cached feature network, the same metrics). The real-vs-real baseline is the evaluate
job's. For the GAN, genforge's own networks also run in the reference's loop (`outside`), so
that the harness's cost per step is told apart from the architecture's.

    python bench/peers.py [--families gan ddpm] [--seeds 0 1 2] [--out bench/results/peers.json]

Needs the `bench` extra (pip install -e '.[bench]') and ../shared/data/fashion-mnist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import HOME, ROOT, finish, launch, private_stack, report, write_report  # noqa: E402
from orchestrator.storage import Storage  # noqa: E402

FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"
THREADS = 2
NUM_SAMPLES = 1000
DATA = {"dataset": "npz", "path": str(FASHION / "train.npz"), "image_size": 16,
        "split": {"heldout": str(FASHION / "test.npz")}}


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


def gan_reference(x: torch.Tensor, seconds: float, seed: int) -> tuple[torch.Tensor, int]:
    from references import dcgan

    return dcgan(x, seconds, seed, NUM_SAMPLES)


def ddpm_reference(x: torch.Tensor, seconds: float, seed: int) -> tuple[torch.Tensor, int]:
    from references import diffusers_ddpm

    return diffusers_ddpm(x, seconds, seed, NUM_SAMPLES, channels=32, channel_mult=(1, 2),
                          lr=1e-3, batch_size=128, ema_decay=0.995, sampler_steps=50)


# family -> (genforge's job, its steps, the evaluate job's sampler settings, the reference,
#            what the reference is)
FAMILIES: dict[str, tuple[Callable[[int, int], dict], int, dict, Callable, str]] = {
    "gan": (gan_job, 3000, {}, gan_reference,
            "pytorch/examples DCGAN at 16 px (nz 100, ngf = ndf = 64, BCE, Adam 2e-4 (0.5, 0.999))"),
    "ddpm": (ddpm_job, 700, {"sampler": "ddim", "steps": 50}, ddpm_reference,
             "diffusers UNet2DModel (32, 64) + DDPMScheduler (cosine) + AdamW 1e-3 + EMAModel "
             "0.995, batch 128, DDIMScheduler 50 steps"),
}


def result_of(root: Storage, experiment: str, job: str) -> dict:
    key = next(k for k in root.list(f"{experiment}/{job}/") if k.endswith("result.json"))
    return json.loads(root.get_bytes(key))


def run_genforge(root: Storage, family: str, seed: int, steps: int, sample: dict) -> dict:
    make = FAMILIES[family][0]
    experiment = f"peers-{family}-{seed}"
    train = make(seed, steps)
    spec = {"experiment": experiment,
            "defaults": {"data": DATA, "resources": {"cpus": THREADS, "gpus": 0}},
            "jobs": [train, {"name": "score", "kind": "evaluate", "from": train["name"],
                             "evaluate": {"num_samples": NUM_SAMPLES, "sample": sample}}]}
    finish(launch(HOME, spec)[1])
    trained = result_of(root, experiment, train["name"])
    scored = result_of(root, experiment, "score")["metrics"]
    timing = trained["timing"]
    return {"steps": timing["steps_run"], "loop_s": timing["loop_s"],
            "steps_per_s": timing["steps_run"] / timing["loop_s"],
            "metrics": scored["sources"][0]["metrics"], "baseline": scored["baseline"]}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="genforge's steps (each family's own by default)")
    parser.add_argument("--outside-s", type=float, default=30.0,
                        help="seconds genforge's GAN networks run in the reference's loop")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers.json"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    from scoring import Scorer

    out: dict[str, Any] = {}
    with private_stack(THREADS) as (_, _, root):
        for family in args.families:
            _, steps, sample, reference, about = FAMILIES[family]
            steps = args.steps or steps
            runs = []
            for seed in args.seeds:
                ours = run_genforge(root, family, seed, steps, sample)
                scorer = Scorer(root, DATA, NUM_SAMPLES)
                samples, ref_steps = reference(scorer.train, ours["loop_s"], seed)
                theirs = {"steps": ref_steps, "loop_s": ours["loop_s"],
                          "steps_per_s": ref_steps / ours["loop_s"], "metrics": scorer(samples)}
                runs.append({"seed": seed, "genforge": ours, "reference": theirs})
                print(json.dumps({"family": family, "seed": seed,
                                  "fd": [ours["metrics"]["fd"], theirs["metrics"]["fd"]],
                                  "steps_per_s": [ours["steps_per_s"], theirs["steps_per_s"]]}),
                      file=sys.stderr)
            entry: dict[str, Any] = {
                "reference": about, "genforge_steps": steps, "runs": runs,
                "fd": {"genforge": summary([r["genforge"]["metrics"]["fd"] for r in runs]),
                       "reference": summary([r["reference"]["metrics"]["fd"] for r in runs]),
                       "real_vs_real": summary([r["genforge"]["baseline"]["fd"] for r in runs])},
                "steps_per_s": {"genforge": summary([r["genforge"]["steps_per_s"] for r in runs]),
                                "reference": summary([r["reference"]["steps_per_s"] for r in runs])}}
            if family == "gan":  # the same networks inside genforge and in the reference's loop
                from references import gan_nets_outside

                scorer = Scorer(root, DATA, NUM_SAMPLES)
                outside = gan_nets_outside(scorer.train, args.outside_s, 0, z_dim=64, width=64)
                entry["same_network"] = {
                    "outside_steps_per_s": outside / args.outside_s,
                    "inside_steps_per_s": entry["steps_per_s"]["genforge"]["mean"],
                    "ratio": entry["steps_per_s"]["genforge"]["mean"] * args.outside_s / outside}
            out[family] = entry
    write_report(args.out, report("peers", THREADS, num_samples=NUM_SAMPLES, data=DATA,
                                  families=out))
    print(json.dumps({f: {"fd": e["fd"], "steps_per_s": e["steps_per_s"],
                          **({"same_network": e["same_network"]} if "same_network" in e else {})}
                      for f, e in out.items()}, indent=2))


if __name__ == "__main__":
    main()
