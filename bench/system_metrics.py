"""What MLflow's system metrics cost a training job: the same DDPM job with them off, at the
driver's default interval (10 s) and at 1 s, interleaved in one run on one private stack, so
drift of the machine hits each alike; also the points each run got.

    python bench/system_metrics.py [--steps 400] [--rounds 3] [--out bench/results/system_metrics.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, finish, launch, private_stack, report, take_result, train_spec, write_report  # noqa: E402
from orchestrator.tracking import SYSTEM_METRICS_ENV  # noqa: E402

EXPERIMENT = "bench-system-metrics"
SETTINGS = ("0", "10", "1")  # off, the default, ten times as often


def one_job(home: Path, root, client, interval: str, args) -> dict:
    spec = train_spec(EXPERIMENT, steps=args.steps, batch_size=args.batch_size,
                      threads=args.threads, checkpoint_every=None)
    finish(launch(home, spec, **{SYSTEM_METRICS_ENV: interval})[1])
    timing = take_result(root, EXPERIMENT)["timing"]
    run = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string="tags.`genforge.job` = 'ddpm'", order_by=["attributes.start_time DESC"],
        max_results=1)[0]
    points = len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"))
    return {"steps_per_s": timing["steps_run"] / timing["loop_s"], "loop_s": timing["loop_s"],
            "system_points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "system_metrics.json"))
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    with private_stack(args.threads) as (home, state, root):
        client = MlflowClient(state.tracking_uri)
        for r in range(args.rounds):
            for interval in SETTINGS[r % 3:] + SETTINGS[:r % 3]:  # each first once in 3 rounds
                runs[interval].append(one_job(home, root, client, interval, args))
                print(f"interval {interval:>2} s: {runs[interval][-1]}", file=sys.stderr)
    speed = {s: statistics.mean(j["steps_per_s"] for j in jobs) for s, jobs in runs.items()}
    out = report("system_metrics", args.threads, config=vars(args), runs=runs,
                 mean_steps_per_s=speed,
                 ratio_to_off={s: speed[s] / speed["0"] for s in SETTINGS if s != "0"})
    write_report(args.out, out)
    print(json.dumps({k: out[k] for k in ("mean_steps_per_s", "ratio_to_off")}, indent=2))


if __name__ == "__main__":
    main()
