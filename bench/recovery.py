"""Recovery after a worker kill, against the checkpoint interval; and what checkpointing costs.

For each checkpoint interval, a DDPM job is started, its actor is killed with SIGKILL once it
reaches `--kill-at`, and the resumed attempt's first step is read back: steps lost (trained
again) and the wall time from the kill to the first step of the new attempt. Then the training
throughput with checkpoints at `--overhead-interval` against none, interleaved, as a ratio.

    python bench/recovery.py [--out bench/results/recovery.json]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, finish, launch, private_stack, take_result, train_spec, write_report  # noqa: E402

import ray  # noqa: E402  (after common: see its HOME)


def progress_of(experiment: str):
    """The running job's actor (looked up by name) and its progress report."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "genforge" and actor["name"].startswith(f"genforge:{experiment}:"):
            handle = ray.get_actor(actor["name"], namespace="genforge")
            try:
                return handle, ray.get(handle.progress.remote(), timeout=5)
            except Exception:  # not ready yet, or just killed
                return None, {}
    return None, {}


def kill_and_resume(home: Path, root, *, interval: int, steps: int, kill_at: int,
                    batch_size: int, threads: int) -> dict:
    experiment = f"bench-recovery-{interval}"
    launched, proc = launch(home, train_spec(experiment, steps=steps, batch_size=batch_size,
                                             threads=threads, checkpoint_every=interval))
    deadline = time.monotonic() + 600
    while True:
        handle, prog = progress_of(experiment)
        if prog.get("phase") == "train" and prog.get("step", 0) >= kill_at:
            break
        if time.monotonic() > deadline:
            raise SystemExit("the job never reached the kill step")
        time.sleep(0.05)
    pid = ray.get(handle.pid.remote())
    step_at_kill = ray.get(handle.progress.remote())["step"]
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    finish(proc)
    result = take_result(root, experiment)
    resumed_from = result["step"] - result["timing"]["steps_run"]
    return {
        "checkpoint_every": interval,
        "killed_at_step": step_at_kill,
        "resumed_from_step": resumed_from,
        "steps_lost": step_at_kill - resumed_from,
        "kill_to_first_step_s": result["timing"]["started_unix"] - killed,
        "run_total_s": time.time() - launched,
    }


def throughput(home: Path, root, *, interval: int | None, steps: int, batch_size: int,
               threads: int) -> float:
    spec = train_spec("bench-ckpt", steps=steps, batch_size=batch_size, threads=threads,
                      checkpoint_every=interval)
    _, proc = launch(home, spec)
    finish(proc)
    timing = take_result(root, "bench-ckpt")["timing"]
    return timing["steps_run"] / timing["loop_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=int, nargs="*", default=[10, 25, 50])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kill-at", type=int, default=74)
    parser.add_argument("--overhead-interval", type=int, default=100)
    parser.add_argument("--overhead-steps", type=int, default=300)
    parser.add_argument("--overhead-rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.json"))
    args = parser.parse_args()

    with private_stack(args.threads) as (home, state, root):
        ray.init(address=state.ray_address, logging_level="ERROR", log_to_driver=False)
        recovery = []
        for interval in args.intervals:
            recovery.append(kill_and_resume(home, root, interval=interval, steps=args.steps,
                                            kill_at=args.kill_at, batch_size=args.batch_size,
                                            threads=args.threads))
            print(recovery[-1], file=sys.stderr)
        # none, every N, none, every N, ...: interleaved against drift
        speeds: dict[str, list[float]] = {"none": [], "every": []}
        for interval in (None, args.overhead_interval) * args.overhead_rounds:
            key = "none" if interval is None else "every"
            speeds[key].append(throughput(home, root, interval=interval, steps=args.overhead_steps,
                                          batch_size=args.batch_size, threads=args.threads))
            print(key, speeds[key][-1], file=sys.stderr)
        ray.shutdown()

    mean = {k: sum(v) / len(v) for k, v in speeds.items()}
    report = {
        "benchmark": "recovery",
        "config": vars(args),
        "recovery": recovery,
        "checkpoint_overhead": {
            "steps_per_s_without": speeds["none"],
            f"steps_per_s_every_{args.overhead_interval}": speeds["every"],
            "ratio": mean["every"] / mean["none"],
            "target_ratio": 0.97,
        },
    }
    write_report(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
