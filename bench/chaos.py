"""Chaos: a seeded schedule of faults over several pipelines of short jobs, then checks from
outside that nothing was lost, duplicated, left running or corrupted.

A private stack (2 CPUs, 2 logical GPUs) runs `--pipelines` small pipelines (experiments
`chaos-0`, ...: a few tiny DDPM training jobs on digits at 8x8 and a sample job), each
different by seed. Rounds, drawn from `random.Random(seed)`, each start one pipeline's driver
(`genforge run`) and inject one to three faults at random moments (1-8 s after the last event,
or once a new checkpoint appears in the bucket):

    kill_worker     kill -9 of a live JobActor of the pipeline
    kill_driver     kill -9 of the driver (the pipeline runs again in a later round)
    sigterm_driver  SIGTERM of the driver: expected to exit 143 within 40 s
    restart_s3      kill -9 of SeaweedFS, 1-3 s down, `stack.up` brings it back
    restart_mlflow  the same for the MLflow server
    two_drivers     a second driver of the same spec while the first runs

A fault counts only if it hit something (a worker existed, the driver still ran). A pipeline
that completes during the rounds is replaced by a new one (`chaos-<next>`) while faults
remain to be injected, so every fault has work to land on. Then every pipeline is run to
completion with plain reruns (at most 5 each), and the bucket and MLflow are checked:

    lost                     jobs without a FINISHED run, or without a result.json
    duplicated               jobs with more than one FINISHED run
    left_running             runs (pipeline runs included) still RUNNING or SCHEDULED
    corrupt                  listed checkpoints that fail verification against their manifest
    metric_steps_duplicated  steps of a FINISHED run's `loss` history logged more than once
    metric_steps_missing     steps of log_every, 2 log_every, ..., steps that are absent
    leases_left              LEASE objects still in the bucket after everything ended
    hung                     drivers that did not exit in time and were killed

`survived` counts the faults whose pipeline checks out; `target_met` needs >= 50 faults and no
lost, duplicated, left-running or corrupt. `problems` and `anomalies` (unexpected exit codes)
say what went wrong where; the logs of the drivers concerned are copied to `--logs`.

    python bench/chaos.py [--seed 0] [--faults 50] [--pipelines 4] [--out bench/results/chaos.json]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HOME, ROOT, report, write_report  # noqa: E402  (sets the stack's Ray token)

import boto3  # noqa: E402
import yaml  # noqa: E402
from botocore.config import Config  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.util.state import list_actors  # noqa: E402  (after common: see its HOME)

from orchestrator import stack  # noqa: E402
from orchestrator.checkpoints import list_checkpoints, verify_checkpoint  # noqa: E402
from orchestrator.storage import S3Credentials, StorageError, open_storage, split_uri  # noqa: E402

KINDS = ("kill_worker", "kill_driver", "sigterm_driver", "restart_s3", "restart_mlflow",
         "two_drivers")
ENDS_DRIVER = ("kill_driver", "sigterm_driver")
SERVICE_OF = {"restart_s3": "seaweedfs", "restart_mlflow": "mlflow"}
DRIVER_TIMEOUT_S = 600  # a driver still running after this is killed and counted as hung
SIGTERM_EXIT_S = 40  # a driver stopped by SIGTERM should be gone within this
SIGTERM_KILL_S = 120  # ...and is killed (hung) after this
CHECKPOINT_WAIT_S = 60  # a fault waiting for a new checkpoint fires anyway after this
WORKER_WAIT_S = 10  # kill_worker waits this long for a live worker before it misses
RERUNS = 5  # plain reruns per pipeline at the end


@dataclass
class Pipeline:
    experiment: str
    spec: dict
    path: Path
    complete: bool = False
    rounds: list[int] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    final_exit_codes: list[int | None] = field(default_factory=list)


def pipeline_spec(experiment: str, rng: random.Random) -> dict:
    """A few tiny DDPM training jobs (steps, logging and checkpoint intervals drawn from `rng`)
    and a sample job reading one of them."""
    jobs = []
    for i in range(rng.randint(2, 4)):
        log_every = rng.choice((1, 2))
        jobs.append({
            "name": f"t{i}", "kind": "train", "family": "ddpm",
            "model": {"channels": 8, "channel_mult": [1], "timesteps": 20},
            "train": {"steps": rng.randrange(40, 121, 2), "batch_size": 32, "lr": 1e-3,
                      "checkpoint_every": rng.choice((3, 4, 5)), "log_every": log_every,
                      "seed": rng.randrange(2**31)},
        })
    jobs.append({"name": "grid", "kind": "sample", "family": "ddpm",
                 "from": rng.choice(jobs)["name"], "sample": {"num_images": 16, "steps": 10}})
    return {"experiment": experiment,
            "defaults": {"data": {"dataset": "digits", "image_size": 8},
                         "resources": {"cpus": 1, "max_restarts": 20}},
            "jobs": jobs}


def expected_steps(job: dict) -> set[int]:
    steps, every = job["train"]["steps"], job["train"]["log_every"]
    return {s for s in range(1, steps + 1) if s % every == 0 or s == steps}


class Chaos:
    """The private stack, the pipelines, and what happened to them."""

    def __init__(self, state: stack.StackState, rng: random.Random, logs: Path):
        self.state, self.rng, self.logs = state, rng, logs
        self.home = Path(state.home)
        creds = stack.credentials(self.home)
        self.creds = S3Credentials(state.s3_endpoint, creds["access_key"], creds["secret_key"])
        self.s3 = boto3.client(
            "s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
            aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"],
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}))
        _, self.bucket, root = split_uri(state.storage)
        self.root = f"{root}/" if root else ""
        self.env = {**{k: v for k, v in os.environ.items()
                       if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "GENFORGE_"))},
                    "GENFORGE_HOME": str(self.home)}
        self.pipelines: list[Pipeline] = []
        self.schedule: list[dict] = []
        self.rounds: list[dict] = []
        self.anomalies: list[dict] = []
        self.hung = 0

    # ---- pipelines and drivers ----------------------------------------------------------------
    def add_pipeline(self) -> Pipeline:
        experiment = f"chaos-{len(self.pipelines)}"
        spec = pipeline_spec(experiment, self.rng)
        path = self.home / f"{experiment}.yaml"
        path.write_text(yaml.safe_dump(spec))
        self.pipelines.append(Pipeline(experiment, spec, path))
        return self.pipelines[-1]

    def start_driver(self, pipeline: Pipeline, label: str) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{label}-{pipeline.experiment}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run",
                                     str(pipeline.path)], env=self.env, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        pipeline.logs.append(log)
        return proc, log

    def wait_driver(self, proc: subprocess.Popen, timeout: float) -> int | None:
        """Its exit code; None if it had to be killed (hung)."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.hung += 1
            return None

    # ---- looking from outside -----------------------------------------------------------------
    def keys(self, prefix: str) -> list[str]:
        """Keys under `<storage>/<prefix>`, relative to the storage root; [] while S3 is away."""
        found = []
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.root + prefix)
            for page in pages:
                found += [o["Key"][len(self.root):] for o in page.get("Contents", [])]
        except Exception:  # noqa: BLE001 - storage restarting
            return []
        return found

    def checkpoints_written(self, experiment: str) -> set[str]:
        """The manifests there now (a set: retention deletes old ones, so a count can fall)."""
        return {k for k in self.keys(f"{experiment}/")
                if re.search(r"/checkpoints/step-\d+/manifest\.json$", k)}

    def live_workers(self, experiment: str) -> list:
        try:
            actors = list_actors(address=self.state.dashboard_url, filters=[
                ("class_name", "=", "JobActor"), ("state", "=", "ALIVE")],
                timeout=10, raise_on_missing_output=False)
        except Exception:  # noqa: BLE001
            return []
        return [a for a in actors if (a.name or "").startswith(f"genforge:{experiment}:") and a.pid]

    # ---- faults -------------------------------------------------------------------------------
    def restart_service(self, service: str) -> str:
        pid = stack.StackState.load(self.home).pids[service]
        os.killpg(pid, signal.SIGKILL)  # its group: MLflow's gunicorn workers too
        down = self.rng.uniform(1, 3)
        time.sleep(down)
        t = time.monotonic()
        for attempt in range(3):
            try:
                stack.up(self.home)
                break
            except stack.StackError:
                if attempt == 2:
                    raise
                time.sleep(2)
        return f"pid {pid} killed, down {down:.1f} s, back in {time.monotonic() - t:.1f} s"

    def inject(self, kind: str, pipeline: Pipeline, drivers: list, label: str) -> tuple[bool, str]:
        """Inject one fault while the round's drivers run; (hit, note)."""
        running = [(p, log) for p, log in drivers if p.poll() is None]
        if not running:
            return False, "no driver running (exit codes " + \
                ", ".join(str(p.returncode) for p, _ in drivers) + ")"
        proc, _ = running[0]
        if kind == "kill_worker":
            deadline = time.monotonic() + WORKER_WAIT_S
            while not (workers := self.live_workers(pipeline.experiment)):
                if time.monotonic() > deadline or proc.poll() is not None:
                    return False, "no live worker"
                time.sleep(0.5)
            actor = self.rng.choice(workers)
            try:
                os.kill(actor.pid, signal.SIGKILL)
            except ProcessLookupError:
                return False, f"worker {actor.name} (pid {actor.pid}) already gone"
            return True, f"killed {actor.name} (pid {actor.pid})"
        if kind == "kill_driver":
            proc.kill()
            proc.wait()
            return True, f"driver pid {proc.pid} killed"
        if kind == "sigterm_driver":
            proc.send_signal(signal.SIGTERM)
            t = time.monotonic()
            rc = self.wait_driver(proc, SIGTERM_KILL_S)
            took = time.monotonic() - t
            note = f"driver pid {proc.pid}: exit {rc} after {took:.1f} s"
            if rc == 0:  # its pipeline was done (a driver ignores stops once its run is over)
                return True, note + " (its pipeline had finished)"
            if rc != 143 or took > SIGTERM_EXIT_S:  # its log's last line says where it was
                self.anomaly(label, pipeline, f"SIGTERM: {note} (expected 143 within "
                                              f"{SIGTERM_EXIT_S} s); its log ends: "
                                              f"{last_line(running[0][1])}")
            return True, note
        if kind in SERVICE_OF:
            return True, self.restart_service(SERVICE_OF[kind])
        if kind == "two_drivers":
            second = self.start_driver(pipeline, f"{label}-{len(drivers)}")
            drivers.append(second)
            return True, f"second driver pid {second[0].pid} ({second[1].name})"
        raise ValueError(kind)

    def dump_stacks(self, pipeline: Pipeline, drivers: list, label: str) -> None:
        """Where the pipeline's drivers and workers are stuck: their Python stacks (py-spy,
        when it is installed), in a log copied with the pipeline's."""
        spy = shutil.which("py-spy")
        if spy is None:
            return
        # every worker actor's process (Ray titles them `ray::JobActor...`): the state API
        # may be the thing that is stuck
        found = subprocess.run(["pgrep", "-f", "^ray::JobActor"], capture_output=True, text=True)
        pids = [p.pid for p, _ in drivers if p.poll() is None] + \
            [int(pid) for pid in found.stdout.split()]
        log = self.logs / f"{label}-stacks-{pipeline.experiment}.log"
        with open(log, "w") as out:
            for pid in pids:
                subprocess.run([spy, "dump", "--pid", str(pid)], stdout=out,
                               stderr=subprocess.STDOUT, timeout=60, check=False)
        pipeline.logs.append(log)

    def anomaly(self, label: str, pipeline: Pipeline, what: str) -> None:
        self.anomalies.append({"round": label, "pipeline": pipeline.experiment, "what": what})

    def wait_for_trigger(self, pipeline: Pipeline, drivers: list, seen: set[str]) -> str:
        """Sleep until the next fault's moment: a random delay, or a new checkpoint."""
        if self.rng.random() < 0.5:
            delay = self.rng.uniform(1, 8)
            time.sleep(delay)
            return f"after {delay:.1f} s"
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        while time.monotonic() < deadline and any(p.poll() is None for p, _ in drivers):
            if self.checkpoints_written(pipeline.experiment) - seen:
                return "at a new checkpoint"
            time.sleep(0.3)
        return "no new checkpoint"

    def draw_faults(self, left: int) -> list[str]:
        """One to three faults, at most one that ends the driver, and that one last."""
        kinds = [self.rng.choice(KINDS) for _ in range(min(left, self.rng.choice((1, 2, 2, 3))))]
        enders = [k for k in kinds if k in ENDS_DRIVER][:1]
        return [k for k in kinds if k not in ENDS_DRIVER] + enders

    def run_round(self, number: int, pipeline: Pipeline, left: int) -> int:
        """One driver of `pipeline` with its faults; returns the faults that hit."""
        label = f"r{number:03d}"
        pipeline.rounds.append(number)
        drivers = [self.start_driver(pipeline, f"{label}-0")]
        start, hits = time.monotonic(), 0
        for kind in self.draw_faults(left):
            seen = self.checkpoints_written(pipeline.experiment)
            trigger = self.wait_for_trigger(pipeline, drivers, seen)
            if trigger == "no new checkpoint" and any(p.poll() is None for p, _ in drivers):
                self.anomaly(label, pipeline, f"no new checkpoint for {CHECKPOINT_WAIT_S} s "
                                              "while a driver ran")
                self.dump_stacks(pipeline, drivers, label)
            at = time.monotonic() - start
            hit, note = self.inject(kind, pipeline, drivers, label)
            hits += hit
            self.schedule.append({"round": number, "pipeline": pipeline.experiment, "fault": kind,
                                  "at_s": round(at, 1), "hit": hit, "note": f"{trigger}: {note}"})
            print(f"  round {number} {pipeline.experiment}: {kind} at {at:.1f} s "
                  f"{'hit' if hit else 'missed'} ({note})", file=sys.stderr)
        outcome = []
        for i, (proc, log) in enumerate(drivers):
            rc = self.wait_driver(proc, DRIVER_TIMEOUT_S)
            outcome.append({"log": log.name, "exit": rc})
            if rc is None:
                self.anomaly(label, pipeline, f"driver {i} hung ({log.name}); killed")
            elif rc == 0:
                pipeline.complete = True
            elif rc not in (-9, -15, 143):  # a SIGTERM's exit is judged there
                self.anomaly(label, pipeline, f"driver {i} exited {rc} ({log.name}): "
                                              f"{failure_lines(log)}")
        self.rounds.append({"round": number, "pipeline": pipeline.experiment,
                            "drivers": outcome, "s": round(time.monotonic() - start, 1)})
        return hits

    def run_schedule(self, faults: int, pipelines: int) -> int:
        for _ in range(pipelines):
            self.add_pipeline()
        injected, number = 0, 0
        while injected < faults and number < 4 * faults:  # bounded: misses cost rounds
            active = [p for p in self.pipelines if not p.complete] or [self.add_pipeline()]
            number += 1
            injected += self.run_round(number, self.rng.choice(active), faults - injected)
            if injected < faults:  # a pipeline that completed makes room for a new one
                for _ in range(pipelines - sum(not p.complete for p in self.pipelines)):
                    self.add_pipeline()
        return injected

    def finish_pipelines(self) -> None:
        """Plain reruns until each pipeline exits 0 (at most RERUNS each)."""
        for pipeline in self.pipelines:
            for attempt in range(RERUNS):
                proc, log = self.start_driver(pipeline, f"final-{attempt}")
                rc = self.wait_driver(proc, DRIVER_TIMEOUT_S)
                pipeline.final_exit_codes.append(rc)
                if rc == 0:
                    break
                self.anomaly("final", pipeline, f"rerun {attempt} exited {rc} ({log.name}): "
                                                f"{failure_lines(log)}")
            print(f"  {pipeline.experiment}: final exit codes {pipeline.final_exit_codes}",
                  file=sys.stderr)

    # ---- the checks ---------------------------------------------------------------------------
    def check(self) -> tuple[Counter, list[dict]]:
        """Counts of what is wrong, over every pipeline, and one entry per problem."""
        client = MlflowClient(self.state.tracking_uri)
        counts: Counter = Counter()
        problems: list[dict] = []

        def problem(pipeline: Pipeline, kind: str, n: int = 1, **detail) -> None:
            counts[kind] += n
            problems.append({"pipeline": pipeline.experiment, "problem": kind, **detail})

        for pipeline in self.pipelines:
            runs = all_runs(client, pipeline.experiment)
            counts["checked_runs"] += len(runs)
            for run in runs:
                if run.info.status in ("RUNNING", "SCHEDULED"):
                    counts["left_running_" + ("job_runs" if "genforge.job" in run.data.tags
                                              else "pipeline_runs")] += 1
                    problem(pipeline, "left_running", run=run.info.run_id,
                            status=run.info.status, job=run.data.tags.get("genforge.job"),
                            name=run.info.run_name)
            keys = self.keys(f"{pipeline.experiment}/")
            for job in pipeline.spec["jobs"]:
                name = job["name"]
                counts["checked_jobs"] += 1
                finished = [r for r in runs if r.data.tags.get("genforge.job") == name
                            and r.info.status == "FINISHED"]
                hashes = sorted({k.split("/")[2] for k in keys if k.split("/")[1] == name})
                results = [h for h in hashes if f"{pipeline.experiment}/{name}/{h}/result.json"
                           in keys]
                statuses = sorted(r.info.status for r in runs
                                  if r.data.tags.get("genforge.job") == name)
                if not finished or not results:
                    problem(pipeline, "lost", job=name, runs=statuses, results=results)
                if len(finished) > 1:
                    problem(pipeline, "duplicated", job=name,
                            runs=[r.info.run_id for r in finished])
                for h in hashes:
                    counts["checked_checkpoints"] += self.check_checkpoints(pipeline, name, h,
                                                                            problem)
                if job["kind"] == "train" and len(finished) == 1:
                    counts["checked_loss_points"] += self.check_history(client, pipeline, job,
                                                                        finished[0], problem)
        for key in self.keys(""):
            if key.rsplit("/", 1)[-1].startswith("LEASE"):
                pipeline = next((p for p in self.pipelines
                                 if key.startswith(f"{p.experiment}/")), None)
                counts["leases_left"] += 1
                problems.append({"pipeline": pipeline and pipeline.experiment,
                                 "problem": "leases_left", "key": key})
        return counts, problems

    def check_checkpoints(self, pipeline: Pipeline, job: str, job_hash: str, problem) -> int:
        """Verifies every listed checkpoint of the job's prefix; returns how many there were."""
        storage = open_storage(f"{self.state.storage}/{pipeline.experiment}/{job}/{job_hash}",
                               self.creds)
        names = list_checkpoints(storage)
        for name in names:
            try:
                verify_checkpoint(storage, name)
            except StorageError as exc:  # CheckpointError, or a file of its manifest missing
                problem(pipeline, "corrupt", job=job, checkpoint=name, error=str(exc)[:300])
        return len(names)

    def check_history(self, client, pipeline: Pipeline, job: dict, run, problem) -> int:
        """Checks the run's `loss` history step by step; returns how many points it has."""
        logged = Counter(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        twice = sorted(s for s, n in logged.items() if n > 1)
        missing = sorted(expected_steps(job) - set(logged))
        if twice:
            problem(pipeline, "metric_steps_duplicated", len(twice), job=job["name"],
                    run=run.info.run_id, steps=twice[:50])
        if missing:
            problem(pipeline, "metric_steps_missing", len(missing), job=job["name"],
                    run=run.info.run_id, steps=missing[:50])
        return sum(logged.values())


def all_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1].strip()[:300] if lines else "(empty)"


def failure_lines(log: Path, limit: int = 3) -> str:
    """The lines of a driver's log that say what failed."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines()
             if re.search(r"failed|Error|Traceback|genforge:", l)]
    return " | ".join(lines[-limit:])[:600] or "(no failure line)"


def copy_logs(chaos: Chaos, problems: list[dict], dest: Path) -> list[str]:
    """The logs of every pipeline with a problem or an anomaly, and the services' logs."""
    names = {p["pipeline"] for p in problems} | {a["pipeline"] for a in chaos.anomalies}
    logs = [log for p in chaos.pipelines if p.experiment in names for log in p.logs]
    if not logs:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    for log in logs + sorted((chaos.home / "logs").glob("*.log")):
        shutil.copy(log, dest / log.name)
    return [str(dest / log.name) for log in logs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=50)
    parser.add_argument("--pipelines", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    parser.add_argument("--logs", default="/tmp/chaos-logs",
                        help="where the logs of pipelines with problems are copied")
    args = parser.parse_args()

    t0 = time.monotonic()
    logs = HOME / "drivers"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"starting a private stack in {HOME} ...", file=sys.stderr)
    try:
        state = stack.up(HOME, ports=stack.free_ports(), num_cpus=2, num_gpus=2)
        chaos = Chaos(state, random.Random(args.seed), logs)
        injected = chaos.run_schedule(args.faults, args.pipelines)
        chaos.finish_pipelines()
        counts, problems = chaos.check()
        copied = copy_logs(chaos, problems, Path(args.logs) / f"seed-{args.seed}")
    finally:
        stack.down(HOME)

    hit = [s for s in chaos.schedule if s["hit"]]
    troubled = {p["pipeline"] for p in problems}
    fields = ("lost", "duplicated", "left_running", "corrupt", "metric_steps_duplicated",
              "metric_steps_missing", "leases_left")
    result = report(
        "chaos", 2, seed=args.seed, config=vars(args),
        faults_injected=injected,
        faults_by_kind=dict(Counter(s["fault"] for s in hit)),
        faults_missed=len(chaos.schedule) - len(hit),
        survived=sum(s["pipeline"] not in troubled for s in hit),
        **{f: counts[f] for f in fields}, hung=chaos.hung,
        left_running_by_kind={k: counts[f"left_running_{k}"] for k in ("job_runs",
                                                                        "pipeline_runs")},
        checked={k[len("checked_"):]: n for k, n in counts.items() if k.startswith("checked_")},
        final_exit_codes={p.experiment: p.final_exit_codes for p in chaos.pipelines},
        wall_s=round(time.monotonic() - t0, 1),
        target_met=(injected >= 50 and not any(counts[f] for f in fields[:4])),
        problems=problems, anomalies=chaos.anomalies, logs=copied,
        pipelines={p.experiment: {"rounds": p.rounds, "spec": p.spec} for p in chaos.pipelines},
        rounds=chaos.rounds, schedule=chaos.schedule,
    )
    write_report(args.out, result)
    summary = {k: result[k] for k in ("faults_injected", "faults_by_kind", "survived", *fields,
                                      "hung", "checked", "final_exit_codes", "wall_s",
                                      "target_met")}
    print(summary)
    for p in problems:
        print("problem:", p)
    for a in chaos.anomalies:
        print("anomaly:", a)
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
