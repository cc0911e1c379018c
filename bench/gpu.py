"""genforge on whatever device it finds, in one run, written as JSON:

- per family (ddpm, flow, gan, vqgan, autoregressive, ldm and its autoencoder): training
  images/s at fp32, bf16 and bf16 + torch.compile (compile for --compile families), and the
  job's peak device memory; sampling images/s;
- a genforge DDPM training job against the same model, batch and data in a bare PyTorch loop
  (images/s, and on a GPU the device's busy fraction from NVML over each one's steady state);
- an evaluation of --eval-samples samples (sampling, features, metrics) on the device.

The jobs run in-process without MLflow (orchestrator/inprocess.py `run_untracked`): the same
workers and training loop as under the driver, so this needs torch and pydantic, not Ray,
MLflow or an S3 server. Steady-state speed is taken over the job's logged windows after
the first (which holds one-time work: compilation, allocations), as all their images over all
their time. Every job's windows hold the same number of steps.

On a GPU the models are sized for one modern device: Fashion-MNIST at 32 px (the DDPM paper's
CIFAR-10 U-Net, 35.7M parameters, batch 128), plus a 3-channel copy of it at 32 px. On a CPU it
runs a tiny version (a few steps of small models at 16 px) so that CI keeps it working.

    python bench/gpu.py [--data fashion-mnist/train.npz] [--out bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.inprocess import MemoryLogger, run_untracked  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "fashion-mnist" / "train.npz"

# (GPU size, tiny size) of each family's model section
DDPM_UNET = {"channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
             "attn_resolutions": [16], "dropout": 0.1}  # Ho et al. 2020, CIFAR-10
TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}
MODELS = {
    "ddpm": ({**DDPM_UNET, "timesteps": 1000, "schedule": "linear"},
             {**TINY_UNET, "timesteps": 100}),
    "flow": (dict(DDPM_UNET), dict(TINY_UNET)),
    "gan": ({"z_dim": 128, "g_width": 128, "d_width": 128}, {"z_dim": 16, "g_width": 8, "d_width": 8}),
    "vqgan": ({"channels": 64, "channel_mult": [1, 2, 2], "latent_channels": 64, "codebook_size": 512,
               "disc_start": 0, "disc_width": 64},
              {"channels": 8, "channel_mult": [1, 2], "latent_channels": 8, "codebook_size": 16,
               "disc_start": 0, "disc_width": 8}),
    "ldm-autoencoder": ({"stage": "autoencoder", "channels": 64, "channel_mult": [1, 2, 2],
                         "latent_channels": 4, "disc_start": 0, "disc_width": 64},
                        {"stage": "autoencoder", "channels": 8, "channel_mult": [1, 2],
                         "latent_channels": 4, "disc_start": 0, "disc_width": 8}),
    "autoregressive": ({"tokenizer": "vqgan-fp32", "dim": 256, "layers": 8, "heads": 8,
                        "class_conditional": True},
                       {"tokenizer": "vqgan-fp32", "dim": 16, "layers": 1, "heads": 2,
                        "class_conditional": True}),
    "ldm": ({"autoencoder": "ldm-autoencoder-fp32", "channels": 128, "channel_mult": [1, 2],
             "num_res_blocks": 2, "attn_resolutions": [8], "timesteps": 1000},
            {"autoencoder": "ldm-autoencoder-fp32", **TINY_UNET, "timesteps": 100}),
}
FAMILY = {"ldm-autoencoder": "ldm"}  # model name -> family, where they differ
BATCH = {"vqgan": 64, "ldm-autoencoder": 64}  # else 128 on a GPU
# what each family samples with in the sampling measurement
SAMPLE = {"ddpm": {"sampler": "ddim", "steps": 50}, "flow": {"sampler": "euler", "steps": 50},
          "ldm": {"sampler": "ddim", "steps": 50}, "autoregressive": {"top_k": 64}}


class Busy:
    """The device's busy fraction (NVML's utilization: the share of time a kernel ran), sampled
    every 50 ms on a thread; None where there is no NVML (a CPU, no nvidia-ml-py)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._handle = None
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            except Exception as exc:  # noqa: BLE001 - the rest of the benchmark stands
                print(f"no NVML ({type(exc).__name__}: {exc}): no busy fraction", file=sys.stderr)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if self._handle is not None:
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            self.samples.append((time.time(), util))

    def between(self, t0: float, t1: float) -> float | None:
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        return sum(inside) / len(inside) / 100 if inside else None

    def close(self) -> None:
        self._stop.set()


def steady(log: MemoryLogger) -> tuple[float, float, float]:
    """(images/s over the windows after the first, as the bare loop's is measured: all their
    images over all their time, slow windows included; the span's start and end time)."""
    points = log.series("images_per_s")
    later = points[1:] or points
    return statistics.harmonic_mean([v for _, _, v in later]), points[0][0], points[-1][0]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tiny = args.tiny if args.tiny is not None else self.device == "cpu"
        self.work = Path(tempfile.mkdtemp(prefix="genforge-gpu-bench-"))
        self.busy = Busy()
        self.report: dict[str, Any] = {
            "benchmark": "gpu", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "tiny": self.tiny,
            "machine": {"device": self.device, "torch": torch.__version__,
                        "name": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
                        "cpu_threads": torch.get_num_threads()},
            "families": {}, "errors": {}}
        data = Path(args.data) if args.data else DATA
        size = 16 if self.tiny else 32
        self.data = ({"dataset": "npz", "path": str(data.resolve()), "image_size": size}
                     if data.exists() else {"dataset": "digits", "image_size": size})
        heldout = data.with_name("test.npz")  # Fashion-MNIST's own test split, 10,000 images
        if data.exists() and heldout.exists():
            self.data["split"] = {"heldout": str(heldout.resolve())}
        if self.tiny:
            self.data["limit"] = 512
        self.report["data"] = self.data

    def save(self) -> None:
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(self.report, indent=2))

    def section(self, name: str, fn: Callable[[], None]) -> None:
        """One measurement; an error is recorded and the others still run."""
        t0 = time.time()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            self.report["errors"][name] = f"{type(exc).__name__}: {exc}"[:1000]
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
            if self.args.strict:
                raise
        print(f"{name}: {time.time() - t0:.1f} s", file=sys.stderr)
        self.save()

    # ---- jobs -------------------------------------------------------------------------------
    def train_job(self, model: str, precision: str, compile: bool = False, *,
                  channels: int = 1) -> dict[str, Any]:
        tiny = self.tiny
        name = f"{model}-{precision}{'-compile' if compile else ''}{'-rgb' if channels == 3 else ''}"
        return {"name": name, "kind": "train", "family": FAMILY.get(model, model),
                "model": MODELS[model][1 if tiny else 0],
                "data": {**self.data, "channels": channels},
                "train": {"steps": 6 if tiny else self.args.steps,
                          "batch_size": 8 if tiny else BATCH.get(model, 128), "lr": 2e-4,
                          "log_every": 2 if tiny else self.args.steps // 8,
                          "sample_images": 4 if tiny else 16, "precision": precision,
                          "compile": compile, "seed": 0},
                "resources": {"cpus": torch.get_num_threads(), "gpus": 1 if self.device == "cuda" else 0}}

    def run(self, jobs: list[dict], only: list[str] | None = None
            ) -> dict[str, tuple[dict, MemoryLogger]]:
        return run_untracked(self.work, {"experiment": "gpu-bench", "jobs": jobs}, only)

    def all_jobs(self) -> list[dict]:
        """Every training job the benchmark may run: upstream stages first."""
        jobs = []
        for model in ("vqgan", "ldm-autoencoder", "ddpm", "flow", "gan", "autoregressive", "ldm"):
            for precision in ("fp32", "bf16"):
                jobs.append(self.train_job(model, precision))
            if model in self.args.compile:
                jobs.append(self.train_job(model, "bf16", compile=True))
        jobs.append(self.train_job("ddpm", "bf16", channels=3))
        return jobs

    def training(self) -> None:
        jobs = self.all_jobs()
        for job in jobs:
            model = job["name"].split("-fp32")[0].split("-bf16")[0]
            if self.args.families and model not in self.args.families:
                continue

            def one(job=job, model=model) -> None:
                result, log = self.run(jobs, [job["name"]])[job["name"]]
                speed, t0, t1 = steady(log)
                entry = self.report["families"].setdefault(model, {"train": {}})
                config = job["name"][len(model) + 1:]
                entry["train"][config] = {
                    "images_per_s": speed, "batch_size": job["train"]["batch_size"],
                    "peak_device_memory_mb": result["metrics"].get("peak_device_memory_mb"),
                    "precision": log.tags.get("genforge.precision"),
                    "compile": log.tags.get("genforge.compile"),
                    "compile_fallback": log.tags.get("genforge.compile_fallback"),
                    "busy_fraction": self.busy.between(t0, t1), "loop_s": result["timing"]["loop_s"]}
                print(f"  {job['name']}: {speed:.0f} images/s", file=sys.stderr)

            self.section(f"train {job['name']}", one)
        for model, entry in self.report["families"].items():
            runs = entry["train"]
            if "fp32" in runs and "bf16" in runs:
                entry["bf16_over_fp32"] = runs["bf16"]["images_per_s"] / runs["fp32"]["images_per_s"]
            if "bf16-compile" in runs and "bf16" in runs:
                entry["compile_over_bf16"] = (runs["bf16-compile"]["images_per_s"]
                                              / runs["bf16"]["images_per_s"])

    def sampling(self) -> None:
        train = {j["name"]: j for j in self.all_jobs()}
        n = 16 if self.tiny else self.args.sample_images
        for model in ("ddpm", "flow", "gan", "vqgan", "autoregressive", "ldm"):
            for compile in ((False, True) if model in self.args.compile else (False,)):
                name = f"{model}-sample{'-compile' if compile else ''}"
                settings = {**SAMPLE.get(model, {}), "num_images": n, "compile": compile,
                            "batch_size": min(n, 8 if self.tiny else 512)}
                if self.tiny and "steps" in settings:
                    settings["steps"] = 5
                job = {"name": name, "kind": "sample", "family": FAMILY.get(model, model),
                       "from": f"{model}-bf16", "sample": settings,
                       "resources": {"cpus": torch.get_num_threads()}}

                def one(model=model, job=job, compile=compile) -> None:
                    # twice: the first run holds one-time work (cuDNN autotuning, compiling)
                    runs = [self.run([*train.values(), job], [job["name"]])[job["name"]][0]
                            for _ in range(2)]
                    entry = self.report["families"].setdefault(model, {})
                    entry[f"sample{'_compile' if compile else ''}"] = {
                        "images_per_s": 1 / runs[1]["s_per_image"],
                        "first_run_images_per_s": 1 / runs[0]["s_per_image"],
                        "num_images": n, "settings": runs[1]["sampler"]}

                self.section(f"sample {name}", one)

    # ---- a genforge job against a bare loop -------------------------------------------------
    def bare_loop(self, job: dict) -> tuple[float, float | None]:
        """Images/s (and busy fraction) of the job's model, batch, precision, data (uint8 on the
        device, converted per batch), loss, Adam, clipping and EMA in a hand-written loop."""
        from orchestrator.datasets import stage
        from orchestrator.spec import DataSpec
        from orchestrator.storage import open_storage
        from workers.data import as_float, load_images
        from workers.diffusion.losses import ddpm_loss
        from workers.diffusion.schedules import make_schedule
        from workers.nn.ema import EMA
        from workers.nn.unet import UNet

        device = torch.device(self.device)
        root = open_storage(f"file://{self.work / 'store'}")
        key = stage(DataSpec(**job["data"]), root, base=self.work)
        x, _ = load_images(root, key, image_size=job["data"]["image_size"], channels=1,
                           limit=job["data"].get("limit"), uint8=True)
        x = x.to(device)
        m, t = job["model"], job["train"]
        torch.manual_seed(0)
        net = UNet(in_channels=1, image_size=x.shape[-1], channels=m["channels"],
                   channel_mult=tuple(m["channel_mult"]), num_res_blocks=m["num_res_blocks"],
                   attn_resolutions=tuple(m.get("attn_resolutions", ())),
                   dropout=m.get("dropout", 0.0)).to(device)
        schedule = make_schedule(m["schedule"] if "schedule" in m else "linear", m["timesteps"],
                                 1e-4, 0.02).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=t["lr"])
        ema = EMA(net, decay=0.999)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)

        def steps(k: int) -> None:
            for _ in range(k):
                idx = torch.randint(len(x), (t["batch_size"],), device=device)
                with autocast:
                    loss = ddpm_loss(net, schedule, as_float(x[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                ema.update(net)

        steps(max(2, t["log_every"]))  # warm-up, as the job's first window
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        n = t["steps"]
        steps(n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.time()
        return n * t["batch_size"] / (t1 - t0), self.busy.between(t0, t1)

    def overhead(self) -> None:
        job = self.train_job("ddpm", "bf16")
        job["train"]["checkpoint_every"] = job["train"]["steps"] // 2  # a checkpoint mid-way

        def genforge() -> tuple[float, float | None]:
            job["train"]["seed"] += 1  # a new hash: a fresh job, not a cache hit
            result, log = self.run([job])[job["name"]]
            speed, t0, t1 = steady(log)
            return speed, self.busy.between(t0, t1)

        bare, ours = [], []
        for measure, into in ((self.bare_loop, bare), (genforge, ours), (self.bare_loop, bare),
                              (genforge, ours)):
            into.append(measure(job) if measure == self.bare_loop else measure())
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        busy = lambda pairs: (mean([b for _, b in pairs]) if all(b is not None for _, b in pairs)  # noqa: E731
                              else None)
        self.report["job_vs_bare_loop"] = {
            "model": "ddpm bf16", "batch_size": job["train"]["batch_size"],
            "bare_images_per_s": [s for s, _ in bare], "genforge_images_per_s": [s for s, _ in ours],
            "ratio": mean([s for s, _ in ours]) / mean([s for s, _ in bare]),
            "bare_busy_fraction": busy(bare), "genforge_busy_fraction": busy(ours)}

    # ---- evaluation on the device -----------------------------------------------------------
    def evaluation(self) -> None:
        jobs = self.all_jobs()
        n = 64 if self.tiny else self.args.eval_samples
        jobs.append({"name": "score", "kind": "evaluate", "from": ["ddpm-bf16"],
                     "evaluate": {"num_samples": n, "classifier": {"steps": 20 if self.tiny else 500},
                                  "sample": {"steps": 5 if self.tiny else 20,
                                             "batch_size": 64 if self.tiny else 1000}},
                     "data": self.data, "resources": {"cpus": torch.get_num_threads()}})
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        result, log = self.run(jobs, ["ddpm-bf16", "score"])["score"]  # its source first
        t1 = time.time()
        self.report["evaluation"] = {
            "num_samples": n, "seconds": t1 - t0, "busy_fraction": self.busy.between(t0, t1),
            "peak_device_memory_mb": (torch.cuda.max_memory_allocated() / 2**20
                                      if self.device == "cuda" else None),
            "metrics": {k: v for k, v in (log.metrics[-1][2] if log.metrics else {}).items()
                        if isinstance(v, (int, float))}}

    def main(self) -> None:
        for name, fn in (("training", self.training), ("overhead", self.overhead),
                         ("evaluation", self.evaluation), ("sampling", self.sampling)):
            if name in self.args.sections:
                self.section(name, fn)
        self.busy.close()
        fams = self.report["families"]
        ddpm = fams.get("ddpm", {}).get("train", {})
        self.report["targets"] = {
            "ddpm_bf16_over_fp32 (>= 1.5)": fams.get("ddpm", {}).get("bf16_over_fp32"),
            "ddpm_bf16_compile_over_fp32": (ddpm["bf16-compile"]["images_per_s"] / ddpm["fp32"]["images_per_s"]
                                            if "bf16-compile" in ddpm and "fp32" in ddpm else None),
            "job_over_bare_loop (>= 0.95)": self.report.get("job_vs_bare_loop", {}).get("ratio"),
            "job_busy_fraction (>= 0.9)": self.report.get("job_vs_bare_loop", {}).get("genforge_busy_fraction"),
            "evaluation_finished": "evaluation" in self.report,
        }
        self.save()
        print(json.dumps(self.report["targets"], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an npz (x, y) of 28x28 images; default Fashion-MNIST "
                        "from the shared data folder, else the built-in digits")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="small models, few steps (default: on a CPU)")
    parser.add_argument("--steps", type=int, default=120, help="training steps per job (GPU)")
    parser.add_argument("--compile", type=lambda s: [m for m in s.split(",") if m],
                        default=None, help="families also measured with torch.compile "
                        "(default: ddpm,gan,autoregressive on a GPU, none on a CPU)")
    parser.add_argument("--sample-images", type=int, default=2048)
    parser.add_argument("--eval-samples", type=int, default=10_000)
    parser.add_argument("--sections", type=lambda s: s.split(","),
                        default=["training", "overhead", "evaluation", "sampling"])
    parser.add_argument("--families", type=lambda s: s.split(","), default=None,
                        help="train only these models' jobs (default: all)")
    parser.add_argument("--strict", action="store_true", help="stop at the first error")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = parser.parse_args()
    if args.compile is None:
        args.compile = ["ddpm", "gan", "autoregressive"] if torch.cuda.is_available() else []
    bench = Bench(args)
    bench.main()
    if bench.report["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
