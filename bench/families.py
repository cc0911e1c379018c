"""Training and sampling speed of every model family, at the sizes of the example specs, in one
run: training steps/s (and images/s, tokens/s for the transformer) and sampling images/s, plus
the transformer's sampling with and without its KV cache.

The jobs run in-process (orchestrator/inprocess.py): the same workers, harness, checkpoints and
MLflow logging as under the driver, without Ray, so the numbers are the models' own. The step
counts are cut short; the data is the spec's own (Fashion-MNIST from ../shared/data, MNIST
digits for the quickstart), limited to `--limit` images.

    python bench/families.py [--train-steps 40] [--out bench/results/families.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, report, write_report  # noqa: E402
from orchestrator.inprocess import run_jobs  # noqa: E402

# spec -> (train job, sample job) pairs measured; the sample job reads the train job
PAIRS = {
    "quickstart": [("ddpm", "grid")],
    "gan": [("dcgan", "samples")],
    "vqgan-ar": [("vqgan", "reconstructions"), ("transformer", "samples")],
    "ldm": [("autoencoder", "reconstructions"), ("diffusion", "samples")],
    "flow": [("flow", "samples")],
}


def load(name: str, steps: int, limit: int, images: int, threads: int) -> dict:
    path = ROOT / "jobspecs" / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text())
    data = spec.get("defaults", {}).get("data", {})
    if "path" in data:
        data["path"] = str((path.parent / data["path"]).resolve())
        data["limit"] = limit
    spec.setdefault("defaults", {})["resources"] = {"cpus": threads, "gpus": 0}
    spec["jobs"] = [j for j in spec["jobs"] if j["kind"] in ("train", "sample")
                    and j.get("from", j["name"]) in {t for t, _ in PAIRS[name]}]
    for job in spec["jobs"]:
        if job["kind"] == "train":
            job["train"].update(steps=steps, checkpoint_every=None, sample_every=None,
                                log_every=max(1, steps // 4), warmup_steps=0, sample_images=4)
        else:
            job["sample"].update(num_images=images, batch_size=images)
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--sample-images", type=int, default=16)
    parser.add_argument("--limit", type=int, default=2000, help="images of each data set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "families.json"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="genforge-bench-") as tmp:
        for name, pairs in PAIRS.items():
            spec = load(name, args.train_steps, args.limit, args.sample_images, args.threads)
            workdir = Path(tmp) / name
            workdir.mkdir()
            for train_job, sample_job in pairs:
                job = next(j for j in spec["jobs"] if j["name"] == train_job)
                print(f"{name}: {train_job} ...", file=sys.stderr)
                trained = run_jobs(workdir, spec, only=[train_job])[train_job]
                timing = trained["timing"]
                row = {"spec": name, "job": train_job, "family": job["family"],
                       "stage": job["model"].get("stage"),
                       "batch_size": job["train"]["batch_size"],
                       "train_steps_per_s": timing["steps_run"] / timing["loop_s"]}
                row["train_images_per_s"] = row["train_steps_per_s"] * row["batch_size"]
                sampled = run_jobs(workdir, spec, only=[sample_job])[sample_job]
                row["sample_images_per_s"] = 1.0 / sampled["s_per_image"]
                row["sample_settings"] = next(j for j in spec["jobs"] if j["name"] == sample_job)["sample"]
                if job["family"] == "autoregressive":
                    row["sample_tokens_per_s_cached"] = sampled["metrics"]["tokens_per_s"]
                    uncached = copy.deepcopy(spec)
                    target = next(j for j in uncached["jobs"] if j["name"] == sample_job)
                    target["sample"]["use_cache"] = False
                    plain = run_jobs(workdir, uncached, only=[sample_job])[sample_job]
                    row["sample_tokens_per_s_uncached"] = plain["metrics"]["tokens_per_s"]
                    row["kv_cache_speedup"] = (row["sample_tokens_per_s_cached"]
                                               / row["sample_tokens_per_s_uncached"])
                rows.append(row)
                print(f"  {row}", file=sys.stderr)

    write_report(args.out, report("families", args.threads, train_steps=args.train_steps,
                                  rows=rows))
    print(f"{'spec':<11}{'job':<16}{'train steps/s':>14}{'images/s':>10}{'sample img/s':>14}")
    for r in rows:
        print(f"{r['spec']:<11}{r['job']:<16}{r['train_steps_per_s']:>14.2f}"
              f"{r['train_images_per_s']:>10.1f}{r['sample_images_per_s']:>14.2f}")
    for r in rows:
        if "kv_cache_speedup" in r:
            print(f"transformer sampling: {r['sample_tokens_per_s_cached']:.0f} tokens/s with the "
                  f"KV cache, {r['sample_tokens_per_s_uncached']:.0f} without "
                  f"({r['kv_cache_speedup']:.2f}x)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
