"""Flow matching beside DDPM, and classifier-free guidance, each scored in one evaluation.

Part 1: a DDPM and a flow-matching model with the same U-Net, data, batch, learning rate, EMA
and training steps, sampled with the same number of network evaluations: DDIM and Euler at 10
and 50 steps, and the flow's Heun at 5 and 25 steps (9 and 49 evaluations). Part 2: the same
two trained class-conditional (label dropout 0.1), scored at guidance 0, 1, 2 and 4. Every
score is FD, KID, precision/recall, class KL (and, conditional, label accuracy) in the
evaluation's classifier feature space against Fashion-MNIST's held-out split, with seconds
per image; real against real is the floor.

The jobs run in-process (orchestrator/inprocess.py): the same workers, harness and
evaluation as under the driver, without Ray.

    python bench/flow.py [--steps 1500] [--samples 1000] [--out bench/results/flow.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, report, write_report  # noqa: E402
from orchestrator.inprocess import run_jobs  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"
UNET = {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1}


def spec(args) -> dict:
    train = {"steps": args.steps, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100,
             "ema_decay": 0.995, "log_every": 50, "sample_images": 16, "seed": 0}
    ddpm = {**UNET, "timesteps": 1000, "schedule": "cosine"}
    flow = dict(UNET)
    conditional = {"class_conditional": True, "label_dropout": 0.1}
    evaluate = {"num_samples": args.samples, "classifier": {"steps": 1500}}
    jobs = [
        {"name": "ddpm", "kind": "train", "family": "ddpm", "model": ddpm, "train": train},
        {"name": "flow", "kind": "train", "family": "flow", "model": flow, "train": train},
        {"name": "ddpm-cfg", "kind": "train", "family": "ddpm", "model": {**ddpm, **conditional},
         "train": train},
        {"name": "flow-cfg", "kind": "train", "family": "flow", "model": {**flow, **conditional},
         "train": train},
        # the same network evaluations: DDIM and Euler at 10 and 50 steps ...
        {"name": "same-nfe", "kind": "evaluate", "from": ["ddpm", "flow"],
         "evaluate": {**evaluate, "sweep": {"steps": [10, 50]}}},
        # ... and Heun at 5 and 25 steps: 9 and 49
        {"name": "heun", "kind": "evaluate", "from": ["flow"],
         "evaluate": {**evaluate, "sample": {"sampler": "heun"}, "sweep": {"steps": [5, 25]}}},
        {"name": "guidance", "kind": "evaluate", "from": ["ddpm-cfg", "flow-cfg"],
         "evaluate": {**evaluate, "sample": {"steps": args.guided_steps},
                      "sweep": {"guidance": [0, 1, 2, 4]}}},
    ]
    return {"experiment": "flow-bench",
            "defaults": {"data": {"dataset": "npz", "path": str(DATA / "train.npz"),
                                  "image_size": 16,
                                  "split": {"heldout": str(DATA / "test.npz")}},
                         "resources": {"cpus": args.threads, "gpus": 0}},
            "jobs": jobs}


COLUMNS = ("fd", "kid", "precision", "recall", "class_kl", "label_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each model")
    parser.add_argument("--samples", type=int, default=1000, help="images per scoring")
    parser.add_argument("--guided-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "flow.json"))
    args = parser.parse_args()

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_jobs(Path(tmp), spec(args))
    rows = []
    for name in ("same-nfe", "heun", "guidance"):
        metrics = results[name]["metrics"]
        rows.append({"evaluation": name, "model": "real vs real", "sampler": "-", "nfe": None,
                     "s_per_image": None, **{k: metrics["baseline"].get(k) for k in COLUMNS}})
        for src in metrics["sources"]:
            sampler = src["sampler"]
            rows.append({"evaluation": name, "model": src["label"],
                         "sampler": f"{sampler.get('sampler')} {sampler.get('steps')} steps"
                                    + (f", guidance {sampler['guidance']:g}"
                                       if sampler.get("guidance") is not None else ""),
                         "nfe": sampler.get("nfe", sampler.get("steps")),
                         "s_per_image": src["s_per_image"],
                         **{k: src["metrics"].get(k) for k in COLUMNS}})
    train = {name: {"steps_per_s": results[name]["timing"]["steps_run"]
                                   / results[name]["timing"]["loop_s"]}
             for name in ("ddpm", "flow", "ddpm-cfg", "flow-cfg")}
    write_report(args.out, report("flow", args.threads, config=vars(args), training=train,
                                  rows=rows, wall_s=time.time() - t0))
    print("| evaluation | model | sampler | NFE | FD | KID | precision | recall | class KL | "
          "label acc. | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else "-" for k in COLUMNS]
        s = f"{r['s_per_image'] * 1e3:.2f} ms" if r["s_per_image"] else "-"
        print(f"| {r['evaluation']} | {r['model']} | {r['sampler']} | {r['nfe'] or '-'} | "
              + " | ".join(cells) + f" | {s} |")


if __name__ == "__main__":
    main()
