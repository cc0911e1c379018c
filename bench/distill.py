"""Progressive distillation's payoff, side by side in one run: images/s of the 4-step student
against its teacher's 1000-step ancestral sampler and the teacher's own 4-step DDIM (on both
timestep spacings), on Fashion-MNIST, with a grid of each from the same seed.

The teacher and student are those of jobspecs/distill-ddpm.yaml: either checkpoints of a run
of that spec (`--teacher URI --student URI`; s3:// URIs of the local stack or of the
environment's S3 are read with its credentials), or trained here in-process first, with the
spec's step counts unless cut with --teacher-train-steps / --round-steps. Every sampler runs as
a sample job in-process (orchestrator/inprocess.py), so its time per image is the one a user's
sample job records; the JSON goes to bench/results/distill.json, the grids beside it.

    python bench/distill.py [--teacher URI --student URI] [--images 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, report, write_report  # noqa: E402
from orchestrator.inprocess import run_jobs  # noqa: E402
from orchestrator.settings import resolve  # noqa: E402
from orchestrator.storage import open_storage  # noqa: E402

SPEC = ROOT / "jobspecs" / "distill-ddpm.yaml"
# (label, file name, source job, sampler settings); the first is the reference for the ratios
SAMPLERS = [
    ("teacher ancestral 1000", "teacher-ancestral-1000", "teacher", {"sampler": "ancestral"}),
    ("teacher ddim 4 (trailing)", "teacher-ddim-4-trailing", "teacher",
     {"sampler": "ddim", "steps": 4, "spacing": "trailing"}),
    ("teacher ddim 4 (linspace)", "teacher-ddim-4-linspace", "teacher",
     {"sampler": "ddim", "steps": 4, "spacing": "linspace"}),
    ("student 4", "student-4", "student", {}),
]


def base_spec(threads: int, teacher_steps: int | None, round_steps: int | None) -> dict:
    spec = yaml.safe_load(SPEC.read_text())
    data = spec["defaults"]["data"]
    data["path"] = str((SPEC.parent / data["path"]).resolve())
    data["split"]["heldout"] = str((SPEC.parent / data["split"]["heldout"]).resolve())
    spec["defaults"]["resources"] = {"cpus": threads, "gpus": 0}
    jobs = {j["name"]: j for j in spec["jobs"]}
    if teacher_steps:
        jobs["teacher"]["train"].update(steps=teacher_steps, checkpoint_every=None)
    if round_steps:
        jobs["student"]["train"]["steps"] = round_steps
    spec["jobs"] = [jobs["teacher"], jobs["student"]]
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="checkpoint URI of the teacher (a train job)")
    parser.add_argument("--student", help="checkpoint URI of its progressive student")
    parser.add_argument("--teacher-train-steps", type=int, help="when training here")
    parser.add_argument("--round-steps", type=int, help="when distilling here")
    parser.add_argument("--images", type=int, default=64, help="images per sampler (one batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill.json"))
    args = parser.parse_args()
    if bool(args.teacher) != bool(args.student):
        parser.error("give both --teacher and --student, or neither")
    torch.set_num_threads(args.threads)

    spec = base_spec(args.threads, args.teacher_train_steps, args.round_steps)
    settings = resolve() if args.teacher else None
    s3 = settings.s3 if settings else None
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="genforge-bench-") as tmp:
        workdir = Path(tmp)
        if args.teacher:
            sources = {"teacher": args.teacher, "student": args.student}
            spec["jobs"] = []
        else:
            print("training the teacher and distilling the student in-process ...", file=sys.stderr)
            trained = run_jobs(workdir, spec)
            sources = {name: trained[name]["checkpoint"].rsplit("/checkpoints/", 1)[0]
                       for name in ("teacher", "student")}
        jobs = [{"name": f"s{i}", "kind": "sample", "family": "ddpm", "from": sources[src],
                 "sample": {"num_images": args.images, "batch_size": args.images, "seed": 1,
                            **sampler}}
                for i, (_, _, src, sampler) in enumerate(SAMPLERS)]
        sampled = run_jobs(workdir, {"experiment": "bench-distill", "jobs": jobs, "defaults": {
            "resources": {"cpus": args.threads, "gpus": 0}}}, s3=s3)
        rows = []
        for i, (label, slug, _, sampler) in enumerate(SAMPLERS):
            result = sampled[f"s{i}"]
            parent, _, name = result["outputs"][1].rpartition("/")
            grid = out_dir / f"distill-{slug}.png"
            grid.write_bytes(open_storage(parent).get_bytes(name))
            rows.append({"sampler": label, "source": result["source"], "settings": sampler,
                         "s_per_image": result["s_per_image"],
                         "images_per_s": 1.0 / result["s_per_image"],
                         "grid": grid.name})
    reference = rows[0]["s_per_image"]
    for row in rows:
        row["speedup_vs_ancestral_1000"] = reference / row["s_per_image"]
    write_report(args.out, report("distill", args.threads, images=args.images, rows=rows))
    print(f"{'sampler':<28}{'images/s':>10}{'vs ancestral 1000':>19}")
    for r in rows:
        print(f"{r['sampler']:<28}{r['images_per_s']:>10.2f}{r['speedup_vs_ancestral_1000']:>18.1f}x")
    print(f"wrote {args.out} and the grids beside it")


if __name__ == "__main__":
    main()
