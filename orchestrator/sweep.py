"""A sweep: one train job searched over its settings with Optuna's samplers and pruners,
through its ask-and-tell interface, so that genforge's driver keeps scheduling (admission,
priorities, leases, resume) and every trial is an ordinary job with its own hash.

The study's truth is a journal in storage beside the sweep (`<sweep prefix>/study.json`):
each trial's index, settings, hash, state, the objective at each measured step and why it
ended. A driver that starts the sweep again (after its own death, or in a later run) replays
the journal into a new Optuna study: finished and stopped trials are told again, a trial that
was running is asked again with the same settings (its job resumes from its checkpoint), and
the search goes on from there. Optuna's own storages (RDB, journal files) would need a database
or a file every driver can reach; the object store already is that.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.spec import Job, ParamRange, SweepSpec, objective_mode, trial_job
from orchestrator.storage import NotFound, Storage

JOURNAL = "study.json"
DEFAULT_TRIALS = 16


@dataclass
class TrialRecord:
    """One trial as the journal keeps it."""

    index: int
    params: dict[str, Any]
    hash: str | None = None
    state: str = "running"  # running | complete | pruned | failed
    value: float | None = None  # the objective: its last measurement
    intermediate: dict[int, float] = field(default_factory=dict)  # step -> objective
    reason: str | None = None  # why it was stopped or failed
    checkpoint: str | None = None
    steps: int | None = None  # the steps it trained

    @property
    def ended(self) -> bool:
        return self.state != "running"


def distributions(sweep: SweepSpec) -> dict[str, Any]:
    """Optuna's distribution of each swept path."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for path, values in sweep.params.items():
        if isinstance(values, list):
            out[path] = CategoricalDistribution([_choice(v) for v in values])
        else:
            low, high = values.bounds
            kind = values.kind
            out[path] = (IntDistribution(int(low), int(high), log=kind == "log_int")
                         if kind in ("int", "log_int")
                         else FloatDistribution(low, high, log=kind == "log_uniform"))
    return out


def _choice(value: Any) -> Any:
    """A categorical choice as Optuna takes it (None, bool, int, float, str): lists and
    mappings (e.g. model.channel_mult) as their JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _value(path_values: dict[str, Any], sweep: SweepSpec) -> dict[str, Any]:
    """Params as a trial's job takes them (JSON text of a list or mapping choice decoded)."""
    out = {}
    for path, value in path_values.items():
        choices = sweep.params[path]
        if isinstance(choices, list) and isinstance(value, str) and value not in choices:
            value = json.loads(value)
        out[path] = value
    return out


def grid(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Every point of a grid sweep, in a fixed order (the first path varies slowest)."""
    paths = list(sweep.params)
    return [dict(zip(paths, point)) for point in itertools.product(*(sweep.params[p] for p in paths))]


def trial_count(sweep: SweepSpec) -> int:
    return len(grid(sweep)) if sweep.method == "grid" else sweep.trials or DEFAULT_TRIALS


class Study:
    """The Optuna study of one swept job and its journal at `storage` (the sweep's prefix)."""

    def __init__(self, job: Job, storage: Storage):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.job, self.sweep, self.storage = job, job.sweep, storage
        self.total = trial_count(self.sweep)
        self.mode = objective_mode(self.sweep.objective)
        self.space = distributions(self.sweep)
        self.study = optuna.create_study(direction="minimize" if self.mode == "min" else "maximize",
                                         sampler=self._sampler(), pruner=self._pruner())
        self.records: list[TrialRecord] = []
        self._live: dict[int, Any] = {}  # index -> its Optuna trial, while it runs
        self._replay()

    # ---- Optuna's parts -----------------------------------------------------------------------
    def _sampler(self) -> Any:
        import optuna

        seed = self.sweep.seed
        if self.sweep.method == "tpe":
            # Optuna's default of 10 random trials first is most of a small sweep's budget
            startup = min(10, max(2, self.total // 3))
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                              constant_liar=True)
        return optuna.samplers.RandomSampler(seed=seed)  # a grid's points are enqueued

    def _pruner(self) -> Any:
        import optuna

        stop = self.sweep.early_stop
        first = stop.min_steps or self.first_measured or 1
        if stop.method == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=first - 1)
        if stop.method == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=first,
                                                          reduction_factor=stop.REDUCTION)
        if stop.method == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=first,
                                                  max_resource=self.job.train.steps,
                                                  reduction_factor=stop.REDUCTION)
        return optuna.pruners.NopPruner()

    @property
    def first_measured(self) -> int | None:
        """The first step at which a trial measures the objective (None: at the end)."""
        trial = trial_job(self.job, {}).train.eval
        if trial is None:
            return None
        return min([*([trial.every] if trial.every else []), *(trial.at or [])], default=None)

    # ---- the journal ------------------------------------------------------------------------
    def _replay(self) -> None:
        """The journal's trials told to a new study: ended ones as they ended, running ones
        asked again with the same settings (their jobs resume)."""
        from optuna.trial import TrialState, create_trial

        try:
            saved = json.loads(self.storage.get_bytes(JOURNAL))
        except NotFound:
            return
        states = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
                  "failed": TrialState.FAIL}
        for raw in saved["trials"]:
            rec = TrialRecord(**{**raw, "intermediate": {int(k): v for k, v in raw["intermediate"].items()}})
            self.records.append(rec)
            if rec.ended:
                params = {p: _choice(v) for p, v in rec.params.items() if p in self.space}
                # (`tell` records a complete trial only with its objective)
                self.study.add_trial(create_trial(
                    state=states[rec.state],
                    value=rec.value if rec.state == "complete" else None,
                    params=params, distributions={p: self.space[p] for p in params},
                    intermediate_values=rec.intermediate))
            else:
                self.study.enqueue_trial({p: _choice(v) for p, v in rec.params.items()})
                trial = self.study.ask(self.space)
                for step, value in sorted(rec.intermediate.items()):
                    trial.report(value, step)
                self._live[rec.index] = trial

    def save(self) -> None:
        self.storage.put_bytes(JOURNAL, json.dumps(
            {"job": self.job.name, "method": self.sweep.method, "mode": self.mode,
             "metric": self.sweep.objective.metric,
             "trials": [asdict(r) for r in self.records]}, indent=1).encode())

    # ---- asking and telling -----------------------------------------------------------------
    def running(self) -> list[TrialRecord]:
        return [r for r in self.records if not r.ended]

    def can_ask(self) -> bool:
        return len(self.records) < self.total

    def ask(self) -> TrialRecord:
        """The next trial's settings (a grid's next point)."""
        index = len(self.records)
        if self.sweep.method == "grid":
            self.study.enqueue_trial({p: _choice(v) for p, v in grid(self.sweep)[index].items()})
        trial = self.study.ask(self.space)
        rec = TrialRecord(index=index, params=_value(trial.params, self.sweep))
        self.records.append(rec)
        self._live[index] = trial
        return rec

    def report(self, rec: TrialRecord, step: int, value: float) -> str | None:
        """A measurement of a running trial's objective; the reason to stop it, or None."""
        if step in rec.intermediate or rec.ended:
            return None
        rec.intermediate[step] = value
        trial = self._live[rec.index]
        if not math.isfinite(value):
            return f"{self.sweep.objective.metric} is {value} at step {step}"
        trial.report(value, step)
        if trial.should_prune():
            return (f"stopped early ({self.sweep.early_stop.method}) at step {step}: "
                    f"{self.sweep.objective.metric} {value:.4g}")
        return None

    def tell(self, rec: TrialRecord, state: str, value: float | None = None,
             reason: str | None = None, checkpoint: str | None = None,
             steps: int | None = None) -> None:
        """A trial's end: complete (with its objective), pruned or failed."""
        from optuna.trial import TrialState

        if rec.ended:
            return
        trial = self._live.pop(rec.index)
        if state == "complete" and (value is None or not math.isfinite(value)):
            state, reason = "failed", reason or "no objective was measured"
        rec.state, rec.value, rec.reason, rec.checkpoint = state, value, reason, checkpoint
        rec.steps = steps
        if state == "pruned" and rec.intermediate:
            rec.value = rec.intermediate[max(rec.intermediate)]
        optuna_state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
                        "failed": TrialState.FAIL}[state]
        self.study.tell(trial, value if state == "complete" else None, state=optuna_state)

    def done(self) -> bool:
        return not self.can_ask() and not self.running()

    def best(self) -> TrialRecord | None:
        """The complete trial with the best objective (the first of equals)."""
        complete = [r for r in self.records if r.state == "complete"]
        if not complete:
            return None
        sign = 1 if self.mode == "min" else -1
        return min(complete, key=lambda r: (sign * r.value, r.index))

    def ranked(self) -> list[TrialRecord]:
        """Complete trials best first, then stopped ones by their last objective, then failed."""
        sign = 1 if self.mode == "min" else -1
        order = {"complete": 0, "pruned": 1, "running": 2, "failed": 3}
        return sorted(self.records, key=lambda r: (order[r.state], sign * r.value
                                                   if r.value is not None else math.inf, r.index))

    def importance(self) -> dict[str, float]:
        """Optuna's parameter importance (fANOVA) over the complete trials, where it can say."""
        import optuna

        try:
            return optuna.importance.get_param_importances(self.study)
        except (RuntimeError, ValueError, ZeroDivisionError):
            return {}


def objective_of(result: dict[str, Any], metric: str) -> float | None:
    """A finished trial's objective from its result: the last in-training measurement, or the
    metric it measured when training ended."""
    evals = result.get("evals") or []
    if evals and metric in evals[-1][1]:
        return float(evals[-1][1][metric])
    value = (result.get("metrics") or {}).get(metric)
    return float(value) if value is not None else None


def trial_label(name: str, index: int) -> str:
    return f"{name}[{index}]"


def split_label(ref: str) -> tuple[str, int | None]:
    """`ddpm[3]` -> ("ddpm", 3); `ddpm` -> ("ddpm", None)."""
    if ref.endswith("]") and "[" in ref:
        name, _, index = ref[:-1].partition("[")
        if index.isdigit():
            return name, int(index)
    return ref, None


def range_of(value: list[Any] | ParamRange) -> str:
    """A param's search space in words, for tables."""
    if isinstance(value, list):
        return "{" + ", ".join(map(str, value)) + "}"
    low, high = value.bounds
    return f"{value.kind}[{low:g}, {high:g}]"


def render(study: Study) -> str:
    """The trials ranked: best first, with their settings, objective and how they ended; then
    the parameter importance where Optuna can give it."""
    paths = list(study.sweep.params)
    metric = study.sweep.objective.metric
    head = ["rank", "trial", *paths, metric, "steps", "state"]
    rows = []
    for rank, rec in enumerate(study.ranked(), 1):
        steps = rec.steps or (max(rec.intermediate) if rec.intermediate else "-")
        value = f"{rec.value:.4g}" if rec.value is not None else "-"
        state = rec.state + (f" ({rec.reason})" if rec.reason and rec.state == "failed" else "")
        rows.append([str(rank), trial_label(study.job.name, rec.index),
                     *(f"{rec.params[p]:.4g}" if isinstance(rec.params[p], float)
                       else str(rec.params[p]) for p in paths), value, str(steps), state])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(0, f"sweep '{study.job.name}': {study.sweep.method}, {len(study.records)} of "
                    f"{study.total} trials, {metric} ({study.mode}imised)")
    trained = sum(r.steps or 0 for r in study.records)
    if trained:
        full = sum(study.job.train.steps for r in study.records if r.steps)
        lines.append(f"steps trained: {trained} of {full} ({trained / full:.0%}) for trials to "
                     f"full length")
    importance = study.importance()
    if importance:
        lines.append("importance: " + ", ".join(f"{p} {v:.2f}" for p, v in importance.items()))
    return "\n".join(lines)


def plot(study: Study, path: str) -> None:
    """The objective over steps of every trial (stopped ones dashed), best one in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = study.best()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rec in study.records:
        if not rec.intermediate:
            continue
        steps = sorted(rec.intermediate)
        ax.plot(steps, [rec.intermediate[s] for s in steps], marker="o", markersize=3,
                linestyle="--" if rec.state == "pruned" else "-",
                linewidth=2.5 if rec is best else 1,
                label=trial_label(study.job.name, rec.index) + ("" if rec.state == "complete"
                                                                 else f" ({rec.state})"))
    ax.set_xlabel("step")
    ax.set_ylabel(study.sweep.objective.metric)
    ax.set_title(f"sweep '{study.job.name}' ({study.sweep.method}, "
                 f"{study.sweep.early_stop.method} stopping)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
