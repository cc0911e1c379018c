"""Streaming training data from SeaweedFS against the same data held in memory, side by side:

- the same DDPM job (model, batch, steps, threads) on the same staged data, once streaming its
  shards from the S3 server (what every pixel family does) and once loading the set whole
  into memory and drawing batches from it (what the families on codes and latents do);
- each job in a fresh process, its peak RSS read from the kernel (VmHWM): what the job itself
  holds, not the staging;
- two data set sizes: Fashion-MNIST's 60,000 images (or the built-in digits, tiled, without the
  shared data folder) and the same tiled 5x, to show which memory grows with the data set;
- staging throughput (images/s) for each, and for a folder of JPEGs with 1 and 2 decoding
  processes;
- staging an npz and a gzip IDX file of the 60,000 images (and the 5x tiled npz) into local
  storage, each in a fresh process: images/s and that process's peak RSS (VmHWM) beside the
  data set's size, which the staging reads a chunk at a time, never whole.

Shards are 1 MB here (the default is 32 MB), so that a few-hundred-MB data set spans hundreds
of shards and the stream's window is a small part of it.

    python bench/data.py [--steps 80] [--out bench/results/data.json]
    python bench/data.py --staging-only [--out bench/results/data-staging.json]  # no stack
"""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODEL, ROOT, private_stack, report, write_report  # noqa: E402
from orchestrator import stack  # noqa: E402
from orchestrator.datasets import read_index, stage  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402
from orchestrator.storage import S3Credentials  # noqa: E402
from orchestrator.task import Task  # noqa: E402

FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist" / "train.npz"

# One training job in a fresh process: its images/s (steady state: the logged windows after
# the first, all their images over all their time) and its peak RSS.
JOB = """
import pickle, resource, statistics, sys
sys.path.insert(0, {root!r})
from orchestrator.inprocess import MemoryLogger
from workers.ddpm.worker import DDPMWorker

task, streams = pickle.load(open(sys.argv[1], "rb"))
cls = DDPMWorker if streams else type("InMemoryDDPM", (DDPMWorker,), {{"streams": False}})
worker = cls(task)
worker.log = MemoryLogger()
result = worker.run()
speeds = [v for _, _, v in worker.log.series("images_per_s")][1:]
# VmHWM: this process's own peak (ru_maxrss would also carry the parent's, across fork)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(statistics.harmonic_mean(speeds), peak)
"""

# One staging in a fresh process: its seconds and peak RSS (VmHWM), and the RSS it had before.
STAGE = """
import json, sys, time
sys.path.insert(0, {root!r})
from orchestrator.datasets import stage
from orchestrator.spec import DataSpec
from orchestrator.storage import open_storage

def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024

before = hwm()
t0 = time.perf_counter()
stage(DataSpec(**json.loads(sys.argv[1])), open_storage(sys.argv[2]), shard_bytes=int(sys.argv[3]))
print(json.dumps({{"staging_s": time.perf_counter() - t0, "peak_rss_mb": hwm(),
                  "rss_before_mb": before}}))
"""


def images(tile: int) -> np.ndarray:
    if FASHION.exists():
        x = np.load(FASHION)["x"]
    else:
        from sklearn.datasets import load_digits

        x = np.clip(load_digits().images * 16, 0, 255).astype(np.uint8)
        x = np.kron(x, np.ones((1, 3, 3), np.uint8))[:, :28, :28]  # 24 px, padded below
        x = np.pad(x, ((0, 0), (0, 4), (0, 4)))
        x = np.tile(x, (34, 1, 1))  # ~61,000
    return np.tile(x, (tile, 1, 1))


def folder_staging(work: Path, count: int = 8000) -> dict:
    """Images/s staging a folder of 112-px RGB JPEGs (one subfolder per class, as photographs
    come) to 32 px with 1 and 2 decoding processes, into local storage: decoding and resizing
    is the work; a worker process costs about a second to start."""
    from PIL import Image

    from orchestrator.spec import DataSpec
    from orchestrator.storage import open_storage

    x = images(1)[:count]
    for i, image in enumerate(x):
        path = work / "jpegs" / f"c{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.kron(np.stack([image] * 3, -1), np.ones((4, 4, 1), np.uint8))  # 112 px
        Image.fromarray(rgb).save(path, quality=90)
    out = {"images": count, "source": "112x112 RGB JPEG", "image_size": 32}
    for workers in (1, 2):
        storage = open_storage(f"file://{work / f'staged-{workers}'}")
        t0 = time.perf_counter()
        stage(DataSpec(dataset="folder", path=str(work / "jpegs"), image_size=32, channels=3),
              storage, workers=workers)
        out[f"images_per_s_{workers}_workers"] = count / (time.perf_counter() - t0)
        print(f"folder of {count} JPEGs, {workers} worker(s): "
              f"{out[f'images_per_s_{workers}_workers']:.0f} images/s", file=sys.stderr)
    out["speedup"] = out["images_per_s_2_workers"] / out["images_per_s_1_workers"]
    return out


def array_staging(work: Path, shard_mb: float) -> dict:
    """Images/s staging an npz and a gzip IDX file (images and labels) into local storage, each
    in a fresh process, with that process's peak RSS beside the data set's size: the staging
    reads the source a chunk at a time, so its peak does not grow with the data set."""
    out = {}
    for tile, fmt in ((1, "npz"), (1, "idx.gz"), (5, "npz")):
        x = images(tile)
        y = np.arange(len(x)) % 10
        if fmt == "npz":
            path = work / f"stage-{tile}.npz"
            np.savez(path, x=x, y=y)
            data = {"dataset": "npz", "path": str(path)}
            files = [path]
        else:
            files = [work / f"stage-{tile}-images.gz", work / f"stage-{tile}-labels.gz"]
            for file, array in zip(files, (x, y.astype(np.uint8))):
                header = bytes([0, 0, 8, array.ndim]) + b"".join(
                    d.to_bytes(4, "big") for d in array.shape)
                file.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=6))
            data = {"dataset": "idx", "path": str(files[0]), "labels": str(files[1])}
        run = subprocess.run(
            [sys.executable, "-c", STAGE.format(root=str(ROOT)), json.dumps(data),
             f"file://{work / f'staged-{tile}-{fmt}'}", str(int(shard_mb * 2**20))],
            capture_output=True, text=True, cwd=ROOT, timeout=1800)
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        entry = {"images": len(x), "format": fmt, "uint8_mb": x.nbytes / 2**20,
                 "file_mb": sum(f.stat().st_size for f in files) / 2**20,
                 **json.loads(run.stdout.splitlines()[-1])}
        entry["images_per_s"] = len(x) / entry["staging_s"]
        out[f"{len(x)}-{fmt}"] = entry
        print(f"staging {len(x)} images from {fmt} ({entry['uint8_mb']:.0f} MB of pixels): "
              f"{entry['images_per_s']:.0f} images/s, peak RSS {entry['peak_rss_mb']:.0f} MB "
              f"({entry['rss_before_mb']:.0f} MB before staging)", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shard-mb", type=float, default=1.0)
    parser.add_argument("--staging-only", action="store_true",
                        help="only stage npz and IDX files into local storage (no stack)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="genforge-data-bench-"))
    results = ROOT / "bench" / "results"
    arrays = array_staging(work, args.shard_mb)
    if args.staging_only:
        write_report(args.out or str(results / "data-staging.json"),
                     report("data-staging", 1, shard_mb=args.shard_mb, array_staging=arrays))
        return
    folder = folder_staging(work)
    sizes = {}
    with private_stack(args.threads) as (home, state, root):
        creds = stack.credentials(home)
        s3 = S3Credentials(state.s3_endpoint, creds["access_key"], creds["secret_key"])
        for tile in (1, 5):
            x = images(tile)
            np.savez(work / f"x{tile}.npz", x=x, y=np.zeros(len(x), np.int64))
            spec = parse_spec({"experiment": "data-bench", "jobs": [{
                "name": "ddpm", "kind": "train", "family": "ddpm", "model": MODEL,
                "data": {"dataset": "npz", "path": str(work / f"x{tile}.npz"), "image_size": 16},
                "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": 1e-3,
                          "log_every": 10, "sample_images": 4},
                "resources": {"cpus": args.threads}}]})
            job = spec.jobs[0]
            t0 = time.perf_counter()
            key = stage(job.data, root, s3, shard_bytes=int(args.shard_mb * 2**20))
            staging_s = time.perf_counter() - t0
            index = read_index(root, key)
            entry = {"images": index["count"], "uint8_mb": x[:index["count"]].nbytes / 2**20,
                     "float32_at_16px_mb": index["count"] * 16 * 16 * 4 / 2**20,
                     "shards": len(index["shards"]), "staging_s": staging_s,
                     "staging_images_per_s": len(x) / staging_s}
            for streams in (True, False):
                runs = []
                for attempt in range(2):
                    task = Task(job={**job.resolved(), "train": {**job.resolved()["train"],
                                                                 "seed": attempt}},
                                job_hash=f"{tile}{int(streams)}{attempt}".ljust(16, "0"),
                                experiment="data-bench", storage_root=state.storage,
                                prefix=f"data-bench/{tile}-{streams}-{attempt}-{time.time_ns()}",
                                tracking_uri="", run_id=None, code_version="bench",
                                data_key=key, s3=s3)
                    path = work / "task.pkl"
                    path.write_bytes(pickle.dumps((task, streams)))
                    out = subprocess.run([sys.executable, "-c", JOB.format(root=str(ROOT)), str(path)],
                                         capture_output=True, text=True, cwd=ROOT, timeout=1800)
                    if out.returncode:
                        raise SystemExit(out.stderr[-3000:])
                    speed, rss = map(float, out.stdout.split()[-2:])
                    runs.append({"images_per_s": speed, "peak_rss_mb": rss})
                    print(f"{index['count']} images, {'streamed' if streams else 'in memory'}: "
                          f"{speed:.0f} images/s, peak RSS {rss:.0f} MB", file=sys.stderr)
                entry["streamed" if streams else "in_memory"] = {
                    "images_per_s": statistics.mean(r["images_per_s"] for r in runs),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": runs}
            entry["streamed_over_in_memory"] = (entry["streamed"]["images_per_s"]
                                                / entry["in_memory"]["images_per_s"])
            sizes[f"{index['count']}"] = entry
    out = report("data", args.threads, steps=args.steps, batch_size=args.batch_size,
                 shard_mb=args.shard_mb, model=MODEL, image_size=16, sizes=sizes,
                 folder_staging=folder, array_staging=arrays)
    write_report(args.out or str(results / "data.json"), out)
    print(json.dumps({k: {"streamed/in memory": round(v["streamed_over_in_memory"], 3),
                          "rss streamed MB": round(v["streamed"]["peak_rss_mb"]),
                          "rss in memory MB": round(v["in_memory"]["peak_rss_mb"])}
                      for k, v in sizes.items()}, indent=2))


if __name__ == "__main__":
    main()
