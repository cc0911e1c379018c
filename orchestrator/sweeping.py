"""The driver's side of a sweep (see orchestrator/sweep.py): the swept job's trials become jobs
of the pipeline as the study asks for them, at most `sweep.parallel` at once; their in-training
measurements are reported to the study as the actors' progress brings them; a trial the
pruner stops is asked to stop (it saves its checkpoint) and ends KILLED, its run tagged with
why. When every trial has ended, the sweep's result names the best trial's checkpoint: what
`from: <sweep>` reads; `from: <sweep>[i]` reads trial i's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from orchestrator.plan import PlannedJob, job_hash
from orchestrator.runs import RESULT, run_params
from orchestrator.spec import trial_job
from orchestrator.sweep import Study, TrialRecord, objective_of, trial_label
from orchestrator.tracking import flatten

if TYPE_CHECKING:
    from orchestrator.driver import Driver, JobState


class Sweeper:
    """One running sweep: its job's state (status `sweeping`) and its study."""

    def __init__(self, driver: Driver, state: JobState):
        self.driver, self.state = driver, state
        self.planned = state.planned
        self.storage = driver._storage(state)
        self.study = Study(self.planned.job, self.storage)
        self.metric = self.planned.job.sweep.objective.metric
        run = driver.runs.launch(self.planned)
        self.run_id = run.id
        driver.runs.log(self.planned.name, run_params(self.planned),
                        {"genforge.sweep": self.planned.job.sweep.method,
                         "genforge.trials": str(self.study.total)})
        for rec in self.study.records:  # a study resumed from its journal
            if not rec.ended:
                self._add(rec)
        driver.echo(f"job '{state.name}': sweep of {self.study.total} trials "
                    f"({self.planned.job.sweep.method}), {len(self.study.records)} from before")

    def _add(self, rec: TrialRecord) -> None:
        """The trial's job, pending in the pipeline (a cache hit if it ran before)."""
        from orchestrator.driver import JobState

        job = trial_job(self.planned.job, rec.params)
        label = trial_label(self.planned.name, rec.index)
        upstream = {ref: self.driver.jobs[ref].planned.hash if ref in self.driver.jobs
                    else f"{self.driver.plan.inputs.checkpoints[ref].uri}@"
                         f"{self.driver.plan.inputs.checkpoints[ref].digest}"
                    for ref in job.sources}
        rec.hash = job_hash(job, upstream, self.planned.code, self.planned.data_key)
        planned = PlannedJob(job=job, deps=self.planned.deps, hash=rec.hash, code=self.planned.code,
                             data_key=self.planned.data_key, checkpoints=self.planned.checkpoints,
                             label=label)
        self.driver.runs.parents[label] = self.run_id
        self.driver.jobs[label] = JobState(planned, trial=(self.planned.name, rec.index))

    def tick(self) -> None:
        """Tell the study what its trials did since the last turn, stop the weak ones, start
        the next ones, and end the sweep once every trial has ended."""
        study, changed = self.study, False
        for rec in study.running():
            state = self.driver.jobs[trial_label(self.planned.name, rec.index)]
            if state.status in ("finished", "cached"):
                for step, values in state.result.get("evals") or []:
                    rec.intermediate.setdefault(int(step), float(values[self.metric]))
                study.tell(rec, "complete", objective_of(state.result, self.metric),
                           checkpoint=state.result.get("checkpoint"),
                           steps=state.result.get("step"))
            elif state.status == "pruned":
                study.tell(rec, "pruned", reason=state.error,
                           checkpoint=state.result.get("checkpoint"),
                           steps=state.result.get("step"))
            elif state.status in ("failed", "skipped", "killed"):
                study.tell(rec, "failed", reason=state.error)
            elif state.status == "running" and state.prune is None:
                for step, values in state.progress.get("evals") or []:
                    known = len(rec.intermediate)  # the progress lists every eval so far
                    reason = study.report(rec, int(step), float(values[self.metric]))
                    changed = changed or len(rec.intermediate) > known
                    if reason:
                        self.driver.prune(state, reason)
                        break
                continue
            else:
                continue
            changed = True
        while study.can_ask() and len(study.running()) < self.planned.job.sweep.parallel:
            self._add(study.ask())
            changed = True
        if changed:
            study.save()
        if study.done():
            self._end()

    def _end(self) -> None:
        best = self.study.best()
        trials = [{"index": r.index, "job": trial_label(self.planned.name, r.index),
                   "hash": r.hash, "state": r.state, "value": r.value, "params": r.params,
                   "checkpoint": r.checkpoint, "reason": r.reason}
                  for r in self.study.records]
        if best is None:
            self.driver.finish(self.state, "failed", f"no trial of {len(trials)} finished with "
                                                     f"a {self.metric}")
            return
        label = trial_label(self.planned.name, best.index)
        result = {"status": "finished", "kind": "sweep", "checkpoint": best.checkpoint,
                  "best": best.index, "metric": self.metric, "value": best.value,
                  "mode": self.study.mode, "trials": trials,
                  "importance": self.study.importance()}
        self.storage.put_bytes(RESULT, json.dumps(result, indent=2).encode())
        self.state.result = result
        pruned = sum(r.state == "pruned" for r in self.study.records)
        self.driver.runs.log(self.planned.name, flatten({"best": best.params}), {
            "genforge.best_trial": label, "genforge.checkpoint": best.checkpoint or "",
            "genforge.trials_pruned": str(pruned)})
        self.driver.runs.metrics(self.planned.name, {f"best_{self.metric}": best.value,
                                                     "trials_pruned": float(pruned)})
        self.driver.echo(f"job '{self.state.name}': best trial {label}, {self.metric} "
                         f"{best.value:.4g}; {pruned} of {len(trials)} stopped early")
        self.driver.finish(self.state, "finished")


def sweep_uri(result: dict[str, Any], index: int) -> str | None:
    """The checkpoint of trial `index` of a finished sweep."""
    for trial in result.get("trials", []):
        if trial["index"] == index:
            return trial.get("checkpoint")
    return None
