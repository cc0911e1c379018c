"""What a pipeline's jobs cost in the cluster's terms: the hours of the devices they held.

A job that held GPUs costs `device_hours` (its wall time times its GPUs: a quarter of a GPU
for an hour is a quarter of a device hour), one without any costs `cpu_hours` (times its
CPUs): the two are priced differently, so neither is folded into the other. The wall time is
the driver's, from each attempt's launch to its end, summed over the job's attempts in this
driver (retries and restarts): its actor holds the resources all that time, start-up and
checkpoint uploads included. A job that a later driver resumes in the same run gets that
driver's hours as another point of the metric; the pipeline's sums are its own driver's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

KINDS = ("device_hours", "cpu_hours")


def job_hours(resources: Mapping[str, float], held_s: float) -> dict[str, float]:
    """The hours of a job that held its `resources` (a job's `resources` section) for `held_s`
    seconds: `device_hours` if it held GPUs, else `cpu_hours`. A data-parallel job holds those
    of all its workers (its coordinating actor holds none)."""
    workers = int(resources.get("workers", 1))
    if workers > 1:
        gpus = workers * float(resources.get("gpus_per_worker", 0))
    else:
        gpus = float(resources.get("gpus", 0))
    hours = held_s / 3600
    if gpus > 0:
        return {"device_hours": hours * gpus}
    return {"cpu_hours": hours * workers * float(resources.get("cpus", 1))}


def pipeline_hours(jobs: Iterable[tuple[str, str, Mapping[str, float]]]) -> dict[str, float]:
    """The pipeline run's metrics from each job's (family, kind, `job_hours`): the sums by
    family and kind (`device_hours.ddpm.train`, `cpu_hours.ddpm.sample`) and in all
    (`device_hours`, `cpu_hours`, both always there, 0 for none)."""
    out: defaultdict[str, float] = defaultdict(float, {kind: 0.0 for kind in KINDS})
    for family, kind, hours in jobs:
        for name, value in hours.items():
            out[f"{name}.{family}.{kind}"] += value
            out[name] += value
    return dict(out)
