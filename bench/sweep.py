"""What early stopping saves a sweep: the same search space and seeds run (a) with every trial to
full length and (b) with the sweep's pruner, measuring the training steps used, the wall time
and the best trial's final FD of each.

Both run the study exactly as the driver does (orchestrator/sweep.py's `Study`: Optuna's
sampler and pruner through ask-and-tell, the objective read from each trial's in-training
measurements as its progress reports them, a pruned trial asked to stop at its next step), one
trial at a time, each trial's worker in this process on file:// storage: the search, not the
cluster, is what is compared. A trial whose settings ran before in the other arm is trained
again (no cache across arms).

    python bench/sweep.py [--trials 8] [--steps 400] [--out bench/results/sweep.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.inprocess import MemoryLogger, tasks  # noqa: E402
from orchestrator.spec import parse_spec, trial_job  # noqa: E402
from orchestrator.storage import open_storage  # noqa: E402
from orchestrator.sweep import Study  # noqa: E402
from workers.registry import worker_class  # noqa: E402

FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"


def spec(args: argparse.Namespace, early_stop: str) -> dict:
    """The swept job; each arm is an experiment of its own (no trial is a cache hit of the
    other arm's), on one data set (the classifier, trained once, is shared)."""
    data = ({"dataset": "npz", "path": str(FASHION / "train.npz"), "image_size": 16,
             "split": {"heldout": str(FASHION / "test.npz")}}
            if FASHION.is_dir() and not args.tiny else {"dataset": "digits", "image_size": 8})
    return {"experiment": f"bench-sweep-{early_stop}", "jobs": [{
        "name": "ddpm", "kind": "train", "family": "ddpm", "data": data,
        "model": {"channels": 16, "channel_mult": [1, 2], "timesteps": 1000, "schedule": "cosine"},
        "train": {"steps": args.steps, "batch_size": 64, "warmup_steps": 50, "log_every": 50,
                  "checkpoint_every": args.steps, "sample_images": 4, "seed": 0},
        "sweep": {"method": "tpe", "trials": args.trials, "seed": 0, "parallel": 1,
                  "params": {"train.lr": {"log_uniform": [1e-4, 1e-2]},
                             "train.ema_decay": [0.99, 0.995, 0.999]},
                  "objective": {"metric": "fd", "every": args.every,
                                "num_samples": args.num_samples},
                  "early_stop": {"method": early_stop, "min_steps": args.every}}}]}


def run_trial(workdir: Path, raw: dict, rec, study: Study) -> tuple[dict, int, float]:
    """One trial's job in a thread, its in-training measurements reported to the study as they
    come, stopped when the pruner says so. Returns its result, the steps it trained and the
    seconds its in-training evaluations took."""
    job = raw["jobs"][0]
    trial = trial_job(parse_spec(raw).jobs[0], rec.params).model_dump(mode="json", by_alias=True,
                                                                       exclude_none=True)
    trial["name"] = f"t{rec.index}"
    (task,) = tasks(workdir, {"experiment": raw["experiment"], "jobs": [trial]})
    worker = worker_class(job["family"]).for_task(task)(task)
    worker.log = MemoryLogger()
    out: dict = {}
    torch.manual_seed(0)  # initial weights: the harness leaves them to torch's global generator
    thread = threading.Thread(target=lambda: out.update(worker.run()))
    thread.start()
    reported = 0
    while thread.is_alive() or reported < len(worker._progress.get("evals", [])):
        evals = worker._progress.get("evals", [])
        for step, values in evals[reported:]:
            reason = study.report(rec, int(step), float(values["fd"]))
            if reason and thread.is_alive():
                worker.request_stop()
                out["pruned"] = reason
        reported = len(evals)
        thread.join(0.2)
    steps = int(out.get("step", 0))
    eval_s = worker.log.series("eval_s")
    return out, steps, eval_s[-1][2] if eval_s else 0.0


def arm(args: argparse.Namespace, early_stop: str, workdir: Path) -> dict:
    raw = spec(args, early_stop)
    started = time.perf_counter()
    study = Study(parse_spec(raw).jobs[0], open_storage(f"file://{workdir / early_stop}"))
    total_steps, trials = 0, []
    while study.can_ask():
        rec = study.ask()
        trial_started = time.perf_counter()
        result, steps, eval_s = run_trial(workdir, raw, rec, study)
        total_steps += steps
        if "pruned" in result:
            study.tell(rec, "pruned", reason=result["pruned"])
        else:
            fd = rec.intermediate.get(args.steps)
            study.tell(rec, "complete", fd)
        trials.append({"index": rec.index, "params": rec.params, "state": rec.state,
                       "steps": steps, "fd": rec.value, "curve": rec.intermediate,
                       "wall_s": time.perf_counter() - trial_started, "eval_s": eval_s,
                       "loop_s": (result.get("timing") or {}).get("loop_s"),
                       "evals": len(rec.intermediate)})
        print(f"  [{early_stop}] trial {rec.index}: {rec.state} at step {steps}, "
              f"fd {rec.value}", file=sys.stderr)
    best = study.best()
    return {"early_stop": early_stop, "total_steps": total_steps,
            "wall_s": time.perf_counter() - started, "best_fd": best.value if best else None,
            "best_trial": best.index if best else None, "trials": trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--pruner", default="hyperband", choices=["median", "hyperband"])
    parser.add_argument("--tiny", action="store_true", help="digits at 8 px, whatever is on disk")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # the early-stopping arm first: it pays for
        pruned = arm(args, args.pruner, Path(tmp))  # training the data set's classifier
        full = arm(args, "none", Path(tmp))
    # the share of a trial's wall time its evaluations take, at the example's schedule
    # (jobspecs/sweep.yaml: 2000 steps, every 500, 256 samples), from what the full arm measured
    evals = sum(t["evals"] for t in full["trials"])
    per_eval = sum(t["eval_s"] for t in full["trials"]) / evals * 256 / args.num_samples
    per_step = (sum(t["loop_s"] - t["eval_s"] for t in full["trials"])
                / sum(t["steps"] for t in full["trials"]))
    report = {
        "eval_s_per_256_samples": per_eval, "train_s_per_step": per_step,
        "eval_share_at_example": 4 * per_eval / (2000 * per_step + 4 * per_eval),
        "machine": platform.processor() or platform.machine(), "settings": vars(args),
        "full": full, "early_stopped": pruned,
        "steps_ratio": pruned["total_steps"] / full["total_steps"],
        "wall_ratio": pruned["wall_s"] / full["wall_s"],
        "best_fd_ratio": (pruned["best_fd"] / full["best_fd"]
                          if pruned["best_fd"] and full["best_fd"] else None),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k.endswith(("ratio", "example"))}
                     | {"full_best_fd": full["best_fd"], "pruned_best_fd": pruned["best_fd"],
                        "full_steps": full["total_steps"], "pruned_steps": pruned["total_steps"]},
                     indent=2))


if __name__ == "__main__":
    main()
