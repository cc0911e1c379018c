"""DDPM training speed inside a genforge job vs the same model, batch and data in a bare
PyTorch loop, measured side by side in one run; also the wall time from `genforge run` to the
first training step with the stack already up.

The bare loop does the same algorithm (Algorithm 1 loss, Adam, gradient clipping, EMA update);
what the job adds is the harness: per-step seeded batches, progress reporting, batched MLflow
logging, and checkpoints every `--checkpoint-every` steps (serialised between two steps, uploaded
in the background).
Mid-training sample grids are off here: they are extra sampling work, not overhead.

    python bench/train_overhead.py [--steps 300] [--out bench/results/train_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODEL, ROOT, finish, launch, private_stack, take_result, train_spec, write_report  # noqa: E402
from orchestrator.datasets import stage  # noqa: E402
from orchestrator.spec import DataSpec  # noqa: E402
from workers.ddpm.config import DDPMModel  # noqa: E402
from workers.data import load_images  # noqa: E402
from workers.diffusion.losses import ddpm_loss  # noqa: E402
from workers.diffusion.schedules import make_schedule  # noqa: E402
from workers.nn.ema import EMA  # noqa: E402
from workers.nn.unet import UNet  # noqa: E402


def bare_loop(x: torch.Tensor, steps: int, batch_size: int, threads: int) -> float:
    """Steps/s of a hand-written loop over the same data and model."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = DDPMModel(**MODEL)
    net = UNet(in_channels=1, image_size=x.shape[-1], channels=cfg.channels,
               channel_mult=cfg.channel_mult, num_res_blocks=cfg.num_res_blocks)
    schedule = make_schedule(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ema = EMA(net, decay=0.995)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,))
        loss = ddpm_loss(net, schedule, x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net)
    return steps / (time.perf_counter() - t0)


def genforge_job(home: Path, root, steps: int, batch_size: int, threads: int,
                 checkpoint_every: int) -> dict:
    spec = train_spec("bench-overhead", steps=steps, batch_size=batch_size, threads=threads,
                      checkpoint_every=checkpoint_every)
    launched, proc = launch(home, spec)
    finish(proc)
    total = time.time() - launched
    timing = take_result(root, "bench-overhead")["timing"]
    return {"steps_per_s": timing["steps_run"] / timing["loop_s"],
            "launch_to_first_step_s": timing["started_unix"] - launched,
            "run_total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="genforge jobs, between bare runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_overhead.json"))
    args = parser.parse_args()

    with private_stack(args.threads) as (home, state, root):
        key = stage(DataSpec(dataset="digits", image_size=16), root)
        x, _ = load_images(root, key, image_size=16, channels=1)

        # The bare loop runs as a Ray task with the job's CPUs, so both run in the same kind
        # of process (Ray's worker environment differs from this one's: thread settings,
        # allocator); what differs is only the harness.
        import ray

        ray.init(address=state.ray_address, logging_level="ERROR", log_to_driver=False)
        remote_bare = ray.remote(num_cpus=args.threads)(bare_loop)

        def bare() -> float:
            return ray.get(remote_bare.remote(x, args.steps, args.batch_size, args.threads))

        # bare, job, bare, job, bare: interleaved, so drift of the machine hits both alike
        bares, jobs = [], []
        for i in range(2 * args.rounds + 1):
            if i % 2 == 0:
                bares.append(bare())
                print(f"bare loop:     {bares[-1]:.2f} steps/s", file=sys.stderr)
            else:
                jobs.append(genforge_job(home, root, args.steps, args.batch_size, args.threads,
                                         args.checkpoint_every))
                print(f"genforge job:  {jobs[-1]['steps_per_s']:.2f} steps/s", file=sys.stderr)
        in_process = bare_loop(x, args.steps, args.batch_size, args.threads)
        print(f"bare loop in this process: {in_process:.2f} steps/s", file=sys.stderr)
        ray.shutdown()

    bare = sum(bares) / len(bares)
    job_speed = sum(j["steps_per_s"] for j in jobs) / len(jobs)
    report = {
        "benchmark": "train_overhead",
        "config": {**vars(args), "model": MODEL, "data": "digits 16x16",
                   "torch": torch.__version__, "device": "cpu"},
        "bare_steps_per_s": bares,
        "bare_steps_per_s_outside_ray": in_process,
        "genforge_steps_per_s": [j["steps_per_s"] for j in jobs],
        "ratio": job_speed / bare,
        "target_ratio": 0.95,
        "launch_to_first_step_s": [j["launch_to_first_step_s"] for j in jobs],
        "genforge_run_total_s": [j["run_total_s"] for j in jobs],
    }
    write_report(args.out, report)
    print(json.dumps({k: report[k] for k in ("bare_steps_per_s", "genforge_steps_per_s", "ratio",
                                             "launch_to_first_step_s")}, indent=2))


if __name__ == "__main__":
    main()
