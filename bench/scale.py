"""Scheduling many short jobs through genforge against the same work as plain Ray tasks, and
the data-parallel speedup of one training job on 1 and 2 workers.

Part 1: one small DDPM is trained, then `--jobs` sampling jobs read its checkpoint, each with
`--cpus` CPUs (so several run at once), through `genforge run` (one pipeline: actors reused
job after job, an MLflow run and outputs per job), and as plain Ray tasks that run the same
worker code on the same checkpoint with the same resources, writing the same outputs, without
MLflow; in `--rounds` rounds that alternate which goes first. Each side is one Ray driver per
batch, as a user runs a pipeline or a script: both start their worker processes cold, and
each waits for the other's processes to be gone before it starts. Reported per round and in
all: wall time and jobs/s of each, the ratio (target >= 0.9; genforge timed from its pipeline
run's start, as the plain tasks are timed once their driver is connected, and also with its
start-up), the time per job, the driver's peak memory and its overhead per job. Then one
more plain batch in a driver whose task workers are already warm, as a long-lived driver
(a notebook) sees them: genforge has no such case, each pipeline is a new driver.

Part 2: the same DDPM training job with `resources.workers` 1 and 2 (one CPU each, the same
global batch), interleaved: training images/s of each and the speedup.

    python bench/scale.py [--jobs 100] [--rounds 2] [--images 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, finish, launch, private_stack, report,  # noqa: E402
                    train_spec, write_report)

import ray  # noqa: E402  (after common: see its HOME)

from orchestrator.storage import S3Credentials  # noqa: E402
from orchestrator.task import Task  # noqa: E402

MODEL = {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "timesteps": 100}


def sample_job(i: int, source: str, args) -> dict:
    return {"name": f"s{i:04d}", "kind": "sample", "family": "ddpm", "from": source,
            "sample": {"num_images": args.images, "steps": args.steps, "seed": i,
                       "batch_size": args.images},
            "resources": {"cpus": args.cpus, "gpus": 0, "max_restarts": 0}}


def peak_rss_mb(pid: int, stop: threading.Event, out: list[float]) -> None:
    """The process's peak resident memory (Linux VmHWM), read until it exits."""
    while not stop.wait(0.5):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) / 1024)
        except OSError:
            return


def through_genforge(home: Path, experiment: str, jobs: list[dict]) -> dict:
    spec = {"experiment": experiment, "jobs": jobs}
    started, proc = launch(home, spec)
    stop, rss = threading.Event(), []
    watcher = threading.Thread(target=peak_rss_mb, args=(proc.pid, stop, rss), daemon=True)
    watcher.start()
    finish(proc)
    wall = time.time() - started
    stop.set()
    return {"wall_s": wall, "driver_peak_rss_mb": max(rss, default=0.0)}


@ray.remote
def plain_sample(task: Task) -> float:
    from workers.registry import worker_class

    t0 = time.perf_counter()
    worker_class("ddpm")(task).sample()
    return time.perf_counter() - t0


def genforge_round(home: Path, state, experiment: str, jobs: list[dict]) -> dict:
    before = ray_workers()
    forge = through_genforge(home, experiment, jobs)
    settle(before)
    per_job, forge["pipeline_s"] = job_seconds(state.tracking_uri, experiment)
    forge["startup_s"] = forge["wall_s"] - forge["pipeline_s"]  # the CLI process, ray.init
    forge["mean_job_s"] = sum(per_job) / len(per_job)
    # the slowest are the first jobs, which start their actors' processes; later jobs reuse them
    forge["slowest_job_s"], forge["median_job_s"] = max(per_job), sorted(per_job)[len(per_job) // 2]
    return forge


def through_ray(state, creds: S3Credentials, experiment: str, jobs: list[dict],
                source: str, cpus: float, batches: int = 1) -> list[dict]:
    """`batches` batches of the jobs as plain tasks, one after the other in one driver, timed
    once it is connected; it then disconnects, and returns once its task workers are gone.
    (A task worker that Ray stops takes about a second of CPU to exit with torch and MLflow
    loaded: measured in the next measurement's time, before it was waited for.)"""
    from orchestrator.spec import parse_spec

    spec = parse_spec({"experiment": experiment, "jobs": jobs})
    tasks = [Task(job=j.resolved(), job_hash=f"{i:016d}", experiment=experiment,
                  storage_root=state.storage, prefix=f"{experiment}/{j.name}/plain",
                  tracking_uri=state.tracking_uri, run_id=None, code_version="bench",
                  refs={"from": source}, s3=creds) for i, j in enumerate(spec.jobs)]
    before = ray_workers()
    ray.init(address=state.ray_address, logging_level="ERROR", log_to_driver=False)
    out = []
    for _ in range(batches):
        t0 = time.time()
        done = ray.get([plain_sample.options(num_cpus=cpus).remote(t) for t in tasks])
        out.append({"wall_s": time.time() - t0, "mean_task_s": sum(done) / len(done)})
    ray.shutdown()
    settle(before)
    return out


def ray_workers() -> set[int]:
    """The pids of this machine's Ray worker processes that run jobs or tasks, or wait for
    them (not the detached admission actor, which outlives every driver)."""
    titles = (b"ray::IDLE", b"ray::JobActor", b"ray::plain_sample")
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(titles):
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def settle(before: set[int], timeout: float = 120.0) -> None:
    """Wait until the Ray worker processes started since `before` have exited."""
    deadline = time.monotonic() + timeout
    while ray_workers() - before and time.monotonic() < deadline:
        time.sleep(0.2)


def job_seconds(tracking_uri: str, experiment: str) -> tuple[list[float], float]:
    """From each job's launch (its actor is handed the job) to the end of its run; and the
    pipeline's own time, from its run's start (the driver is connected, the data staged) to
    its end: what the plain tasks' wall time is compared with, since they too start timing
    once Ray is connected."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    jobs = [r for r in runs if r.data.tags.get("genforge.kind") == "sample"]
    pipeline = next(r for r in runs if "genforge.spec" in r.data.tags)
    return ([r.info.end_time / 1000 - float(r.data.tags["genforge.launched"]) for r in jobs],
            (pipeline.info.end_time - pipeline.info.start_time) / 1000)


def train_result(root, experiment: str) -> dict:
    key = next(k for k in root.list(f"{experiment}/") if k.endswith("result.json"))
    return json.loads(root.get_bytes(key))


def data_parallel(home: Path, root, args) -> dict:
    speeds: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(args.dp_rounds):
        for workers in (1, 2):
            experiment = f"bench-dp-{workers}-{round_}"
            spec = train_spec(experiment, steps=args.dp_steps, batch_size=args.dp_batch,
                              threads=1, checkpoint_every=None, workers=workers)
            spec["jobs"][0]["model"] = MODEL
            _, proc = launch(home, spec)
            finish(proc)
            timing = train_result(root, experiment)["timing"]
            speeds[workers].append(timing["steps_run"] * args.dp_batch / timing["loop_s"])
            print(f"data-parallel, {workers} worker(s): {speeds[workers][-1]:.1f} images/s",
                  file=sys.stderr)
    mean = {k: sum(v) / len(v) for k, v in speeds.items()}
    return {"global_batch": args.dp_batch, "steps": args.dp_steps, "cpus_per_worker": 1,
            "images_per_s_1_worker": speeds[1], "images_per_s_2_workers": speeds[2],
            "speedup": mean[2] / mean[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="sampling jobs per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per sampling job")
    parser.add_argument("--cpus", type=float, default=0.5, help="CPUs per sampling job")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dp-steps", type=int, default=150)
    parser.add_argument("--dp-batch", type=int, default=64)
    parser.add_argument("--dp-rounds", type=int, default=2)
    parser.add_argument("--skip-dp", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = parser.parse_args()

    with private_stack(args.threads) as (home, state, root):
        from orchestrator import stack

        c = stack.credentials(home)
        creds = S3Credentials(state.s3_endpoint, c["access_key"], c["secret_key"])
        spec = train_spec("bench-scale-model", steps=30, batch_size=32, threads=args.threads,
                          checkpoint_every=None)
        spec["jobs"][0]["model"] = MODEL
        _, proc = launch(home, spec)
        finish(proc)
        source = train_result(root, "bench-scale-model")["checkpoint"]
        print(f"checkpoint: {source}", file=sys.stderr)

        one = through_genforge(home, "bench-scale-one", [sample_job(0, source, args)])
        jobs = [sample_job(i, source, args) for i in range(args.jobs)]
        rounds = []
        for r in range(args.rounds):
            # Rounds alternate which goes first, so a machine that speeds up or slows down
            # meanwhile (a shared host) favours neither.
            order = ("genforge", "plain_ray") if r % 2 == 0 else ("plain_ray", "genforge")
            result: dict = {"order": order}
            for which in order:
                if which == "genforge":
                    result[which] = genforge_round(home, state, f"bench-scale-genforge-{r}", jobs)
                else:
                    result[which], = through_ray(state, creds, f"bench-scale-ray-{r}", jobs,
                                                 source, args.cpus)
                print(f"round {r}, {which}: {result[which]}", file=sys.stderr)
            result["throughput_ratio"] = result["plain_ray"]["wall_s"] / result["genforge"]["pipeline_s"]
            rounds.append(result)
        cold, warm = through_ray(state, creds, "bench-scale-ray-warm", jobs, source, args.cpus,
                                 batches=2)
        print(f"plain, one driver: {cold}, then warm: {warm}", file=sys.stderr)
        dp = None if args.skip_dp else data_parallel(home, root, args)

    plain_s = sum(r["plain_ray"]["wall_s"] for r in rounds)
    pipeline_s = sum(r["genforge"]["pipeline_s"] for r in rounds)
    total_jobs = args.jobs * args.rounds
    peak = max(r["genforge"]["driver_peak_rss_mb"] for r in rounds)
    out = report(
        "scale", args.threads, config=vars(args),
        many_short_jobs={
            "jobs_per_round": args.jobs, "concurrent": int(args.threads / args.cpus),
            "rounds": rounds,
            "plain_ray_jobs_per_s": total_jobs / plain_s,
            "genforge_jobs_per_s": total_jobs / pipeline_s,
            "throughput_ratio": plain_s / pipeline_s, "target_ratio": 0.9,
            # a second batch in the same plain driver, its task workers warm: no genforge
            # equivalent (a pipeline is a driver), against genforge's mean pipeline
            "plain_ray_warm_batch": {"cold_wall_s": cold["wall_s"], "warm_wall_s": warm["wall_s"],
                                     "ratio_to_genforge": warm["wall_s"] * args.rounds / pipeline_s},
            # with the driver's own start (a Python process, imports, ray.init) counted
            "throughput_ratio_with_startup":
                plain_s / sum(r["genforge"]["wall_s"] for r in rounds),
            # wall time a job adds over the plain task, at this concurrency
            "overhead_per_job_s": (pipeline_s - plain_s) / total_jobs,
            "driver_rss_per_job_kb": 1024 * (peak - one["driver_peak_rss_mb"]) / max(1, args.jobs - 1),
            "driver_peak_rss_mb_one_job": one["driver_peak_rss_mb"],
        },
        data_parallel=dp,
    )
    write_report(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
