"""jobspecs/distill-ddpm.yaml end to end on the real stack, with tiny step counts: teacher,
student rounds, samples of both and their evaluation, through the same driver, tracking and
storage as every other job. Distillation's one end-to-end test: the other methods, and
jobspecs/distill-ar.yaml, run in-process in tests/test_distill.py."""

from __future__ import annotations

import json

import pytest

from support import ROOT, example_spec, genforge, write_spec
from test_e2e_families import check_pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900),
              pytest.mark.skipif(not (ROOT.parent / "shared" / "data").exists(),
                                 reason="no ../shared/data")]

TINY = {"batch_size": 8, "checkpoint_every": None, "sample_every": None, "log_every": 2,
        "sample_images": 4, "warmup_steps": 0, "keep_checkpoints": None}


def tiny(name: str, experiment: str) -> dict:
    spec = example_spec(name, experiment, limit=400)
    for job in spec["jobs"]:
        if "train" in job:
            job["train"].update(steps=4, **TINY)
        if job["kind"] == "sample":
            job["sample"]["num_images"] = 5
        if job["kind"] == "evaluate":
            job["evaluate"].update(num_samples=20, classifier={"steps": 20, "width": 8})
    return spec


def test_progressive_distillation_pipeline(tmp_path, local_stack, stack_env, s3_client):
    spec = tiny("distill-ddpm", "e2e-distill-ddpm")
    next(j for j in spec["jobs"] if j["name"] == "student")["train"]["steps"] = 2  # per round
    out = genforge(["run", str(write_spec(tmp_path / "distill-ddpm.yaml", spec))], stack_env)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = check_pipeline(local_stack, s3_client, "e2e-distill-ddpm", {
        "teacher": "ddpm", "student": "ddpm", "teacher-64": "ddpm", "teacher-4": "ddpm",
        "student-4": "ddpm", "score-4-steps": "-", "score-teacher-64": "-"})
    runs, client, found = seen["runs"], seen["client"], seen["keys"]

    student = runs["student"].data
    assert student.tags["genforge.kind"] == "distill"
    assert student.tags["genforge.teacher"] == runs["teacher"].data.tags["genforge.checkpoint"]
    assert student.metrics["teacher_sampling_steps"] == 64
    assert student.metrics["student_sampling_steps"] == 4
    assert student.metrics["student_params"] == student.metrics["teacher_params"] > 0
    assert student.metrics["speedup"] > 2  # 4 steps of the same network against 64
    rounds = client.get_metric_history(runs["student"].info.run_id, "round_student_steps")
    assert sorted((m.step, m.value) for m in rounds) == [(1, 32), (2, 16), (3, 8), (4, 4)]
    # a checkpoint at the end of every round (2 steps each), each with its student's step count
    manifests = sorted(k for k in found if k.startswith("genforge/e2e-distill-ddpm/student/")
                       and k.endswith("manifest.json"))
    assert [k.split("/")[-2] for k in manifests] == [f"step-00000{i}" for i in (2, 4, 6, 8)]
    last = json.loads(s3_client.get_object(Bucket=local_stack.bucket, Key=manifests[-1])["Body"].read())
    assert last["meta"]["model"]["distilled_steps"] == 4 and last["meta"]["model"]["prediction"] == "v"
    assert last["meta"]["teacher"]["job"] == "teacher"

    four = runs["score-4-steps"].data.metrics
    assert {"teacher.fd", "student.fd", "baseline.fd"} <= set(four)
    assert runs["score-teacher-64"].data.metrics["teacher.fd"] > 0
