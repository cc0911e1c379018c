"""What early stopping saves a sweep: the same search space and seeds run (a) with every trial to
full length and (b) with each of the sweep's pruners, on the local stack as a user runs it
(`genforge run` of a spec with `sweep:` against a private SeaweedFS, MLflow server and Ray
head), measuring the training steps used, the wall time and the best trial's final FD of each.

Every arm is an experiment of its own, so no trial is a cache hit of another arm's; trials run
one at a time (`parallel: 1`) with both of the machine's threads, the pruner deciding with
every earlier trial known. The initial weights come from `train.seed`, the same in every
trial, so two arms that ask for the same settings train the same model. The classifier the
objective is scored with is trained once, before the timed arms. What each trial trained and
measured is read back from the sweep's journal (`study.json`) and the trials' result.json.

    python bench/sweep.py [--trials 16] [--steps 300] [--pruners median,asha,hyperband]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

from common import (HOME, ROOT, finish, launch, private_stack, report,  # noqa: E402
                    take_result, write_report)

from orchestrator.spec import parse_spec, trial_job  # noqa: E402

FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"
THREADS = 2


def job(args: argparse.Namespace) -> dict:
    data = ({"dataset": "npz", "path": str(FASHION / "train.npz"), "image_size": 16,
             "split": {"heldout": str(FASHION / "test.npz")}}
            if FASHION.is_dir() and not args.tiny else {"dataset": "digits", "image_size": 8})
    return {"name": "ddpm", "kind": "train", "family": "ddpm", "data": data,
            "model": {"channels": 16, "channel_mult": [1, 2], "timesteps": 1000,
                      "schedule": "cosine"},
            "train": {"steps": args.steps, "batch_size": 64, "warmup_steps": 50, "log_every": 50,
                      "checkpoint_every": args.steps, "sample_images": 4, "seed": 0},
            "resources": {"cpus": THREADS, "gpus": 0}}


def swept(args: argparse.Namespace, early_stop: str) -> dict:
    return {"experiment": f"bench-sweep-{early_stop}", "jobs": [{**job(args), "sweep": {
        "method": "tpe", "trials": args.trials, "seed": 0, "parallel": 1,
        "params": {"train.lr": {"log_uniform": [1e-4, 1e-2]},
                   "train.ema_decay": [0.99, 0.995, 0.999]},
        "objective": {"metric": "fd", "every": args.every, "num_samples": args.num_samples},
        "early_stop": {"method": early_stop, "min_steps": args.every}}}]}


def warm_up(args: argparse.Namespace) -> None:
    """One step evaluated once: the data set staged and its classifier trained and cached."""
    spec = {"experiment": "bench-sweep-warmup", "jobs": [dict(job(args), train={
        **job(args)["train"], "steps": 1, "eval": {"every": 1, "num_samples": 10}})]}
    finish(launch(HOME, spec)[1])


def arm(args: argparse.Namespace, early_stop: str, root) -> dict:
    spec = swept(args, early_stop)
    launched, proc = launch(HOME, spec)
    finish(proc)
    wall = time.time() - launched
    prefix = f"{spec['experiment']}/ddpm/"
    journal = json.loads(root.get_bytes(next(k for k in root.list(prefix)
                                             if k.endswith("/study.json"))))
    trials = []
    for t in journal["trials"]:
        timing = {}
        if t["state"] == "complete":
            timing = json.loads(root.get_bytes(f"{prefix}{t['hash']}/result.json"))["timing"]
        trials.append({k: t[k] for k in ("index", "params", "state", "steps", "value", "reason")}
                      | {"curve": t["intermediate"], "loop_s": timing.get("loop_s"),
                         "eval_s": timing.get("eval_s")})
        print(f"  [{early_stop}] trial {t['index']}: {t['state']} after {t['steps']} steps, "
              f"fd {t['value']}", file=sys.stderr)
    complete = [t for t in trials if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["value"]) if complete else None
    return {"early_stop": early_stop, "wall_s": wall,
            "total_steps": sum(t["steps"] or 0 for t in trials),
            "best_fd": best["value"] if best else None,
            "best_trial": best["index"] if best else None, "trials": trials}


def eval_share(full: dict, args: argparse.Namespace, steps: int = 2000, every: int = 500,
               samples: int = 256) -> dict:
    """The share of a trial's wall time its evaluations take at jobspecs/sweep.yaml's schedule
    (2000 steps, every 500, 256 samples), from what the full arm's trials measured."""
    timed = [t for t in full["trials"] if t["loop_s"] and t["eval_s"] is not None]
    evals = sum(len(t["curve"]) for t in timed)
    per_eval = sum(t["eval_s"] for t in timed) / evals * samples / args.num_samples
    per_step = sum(t["loop_s"] - t["eval_s"] for t in timed) / sum(t["steps"] for t in timed)
    n = steps // every
    return {"eval_s_per_256_samples": per_eval, "train_s_per_step": per_step,
            "eval_share_at_example": n * per_eval / (steps * per_step + n * per_eval)}


def example_share() -> dict:
    """train.eval's share of one trial's wall time at jobspecs/sweep.yaml's setting, measured
    directly: its trial job (settings mid-range: lr 1e-3, EMA 0.995, 32 channels) with the
    sweep's objective as its `train.eval`, run alone through the stack on its one CPU, after
    a one-step job has trained and cached the classifier. Its result's timing says how long
    the training loop took and how much of it went to evaluating."""
    example = yaml.safe_load((ROOT / "jobspecs" / "sweep.yaml").read_text())
    example["defaults"]["data"].update(path=str(FASHION / "train.npz"),
                                       split={"heldout": str(FASHION / "test.npz")})
    swept = parse_spec(example, "jobspecs/sweep.yaml").job("ddpm")
    # the trial as the sweep makes it: its train.eval is the sweep's objective
    trial = trial_job(swept, {"train.lr": 1e-3, "train.ema_decay": 0.995,
                              "model.channels": 32}).resolved()
    warm = dict(trial, train={**trial["train"], "steps": 1,
                              "eval": {"every": 1, "num_samples": 10}})
    finish(launch(HOME, {"experiment": "bench-sweep-share-warmup", "jobs": [warm]})[1])
    launched, proc = launch(HOME, {"experiment": "bench-sweep-share", "jobs": [trial]})
    finish(proc)
    return {"wall_s": time.time() - launched, "trial": trial}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=75)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--pruners", default="median,asha,hyperband")
    parser.add_argument("--tiny", action="store_true", help="digits at 8 px, whatever is on disk")
    parser.add_argument("--example-share", action="store_true",
                        help="only train.eval's share of a trial of jobspecs/sweep.yaml, "
                             "measured on that trial (bench/results/sweep-eval-share.json)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep.json"))
    args = parser.parse_args()
    if args.example_share:
        with private_stack(THREADS) as (_, _, root):
            ran = example_share()
            timing = take_result(root, "bench-sweep-share")["timing"]
        share = timing["eval_s"] / timing["loop_s"]
        out = report("sweep-eval-share", 1, **ran, timing=timing, eval_share=share)
        write_report(str(ROOT / "bench" / "results" / "sweep-eval-share.json"), out)
        print(json.dumps({"loop_s": timing["loop_s"], "eval_s": timing["eval_s"],
                          "eval_share": share}, indent=2))
        return
    with private_stack(THREADS) as (_, _, root):
        warm_up(args)
        arms = {name: arm(args, name, root) for name in ["none", *args.pruners.split(",")]}
    full = arms.pop("none")
    out = report("sweep", THREADS, settings=vars(args), full=full, **eval_share(full, args),
                 early_stopped={name: a | {
                     "steps_ratio": a["total_steps"] / full["total_steps"],
                     "wall_ratio": a["wall_s"] / full["wall_s"],
                     "best_fd_ratio": a["best_fd"] / full["best_fd"]
                     if a["best_fd"] and full["best_fd"] else None}
                     for name, a in arms.items()})
    write_report(args.out, out)
    print(json.dumps({"full": {"steps": full["total_steps"], "wall_s": round(full["wall_s"]),
                               "best_fd": full["best_fd"]},
                      "eval_share_at_example": out["eval_share_at_example"],
                      **{name: {k: a[k] for k in ("total_steps", "steps_ratio", "wall_ratio",
                                                  "best_fd", "best_fd_ratio")}
                         for name, a in out["early_stopped"].items()}}, indent=2))


if __name__ == "__main__":
    main()
