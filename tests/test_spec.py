"""Spec validation and planning: every class of bad input gets one line naming file, job, field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.plan import (PlanInputs, ResolvedCheckpoint, build_plan, check_uri_references,
                               job_hash, resolve_inputs, topological_order)
from orchestrator.spec import SpecError, load_spec, parse_spec
from workers.registry import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "jobspecs" / "quickstart.yaml"


def spec(*jobs: dict, **top) -> dict:
    return {"experiment": "t", **top, "jobs": list(jobs)}


def train(name: str = "ddpm", **over) -> dict:
    return {"name": name, "kind": "train", "family": "ddpm", "train": {"steps": 10}, **over}


def sample(name: str = "grid", src: str = "ddpm", **over) -> dict:
    return {"name": name, "kind": "sample", "family": "ddpm", "from": src, **over}


def evaluate(name: str = "score", sources=("ddpm",), **over) -> dict:
    return {"name": name, "kind": "evaluate", "from": list(sources), **over}


def vq(name: str = "vq", **over) -> dict:
    return train(name, family="vqgan", **{"model": {}, **over})


def ar(name: str = "ar", **over) -> dict:
    return train(name, family="autoregressive", **{"model": {"tokenizer": "vq"}, **over})


def ae(name: str = "ae", **over) -> dict:
    return train(name, family="ldm", **{"model": {"stage": "autoencoder"}, **over})


def ldm(name: str = "ldm", **over) -> dict:
    return train(name, family="ldm", **{"model": {"autoencoder": "ae", "channel_mult": [1]}, **over})


def distill(name: str = "fast", teacher: str = "ddpm", family: str = "ddpm", **over) -> dict:
    method = {"ddpm": "progressive", "ldm": "progressive", "gan": "regress",
              "autoregressive": "kd"}.get(family, "progressive")
    return {"name": name, "kind": "distill", "family": family, "teacher": teacher,
            "distill": {"method": method, **over.pop("distill", {})}, **over}


def errors(data) -> list[str]:
    with pytest.raises(SpecError) as info:
        build_plan(parse_spec(data, "s.yaml"))
    return info.value.lines


def test_quickstart_validates_and_merges_defaults():
    s = load_spec(QUICKSTART)
    ddpm = s.job("ddpm")
    assert ddpm.data.dataset == "digits" and ddpm.data.image_size == 16
    assert ddpm.resources.cpus == 2
    assert ddpm.train.batch_size == 64
    assert ddpm.model["schedule"] == "cosine" and ddpm.model["dropout"] == 0.0  # filled default
    grid = s.job("grid")
    assert grid.data is None and grid.train is None  # defaults fill only what a kind reads
    assert grid.sample.steps == 50


def test_job_values_win_over_defaults():
    s = parse_spec(spec(train(data={"image_size": 8}), defaults={"data": {"dataset": "digits",
                                                                       "image_size": 16}}))
    assert s.jobs[0].data.image_size == 8


@pytest.mark.parametrize("data, expected", [
    (spec(train(modle={})), "s.yaml: job 'ddpm': modle: unknown field"),
    (spec(train(model={"chanels": 3})), "s.yaml: job 'ddpm': model.chanels: unknown field"),
    (spec(train(model={"channels": "many"})), "s.yaml: job 'ddpm': model.channels: Input should be a valid integer"),
    (spec(train(train={"steps": -5})), "s.yaml: job 'ddpm': train.steps: Input should be greater than or equal to 1"),
    (spec(train(kind="fly")), "s.yaml: job 'ddpm': kind: Input should be 'train', 'sample', 'distill' or 'evaluate'"),
    (spec(train(family="vae")), "s.yaml: job 'ddpm': family: must be one of"),
    (spec(train(name="Bad_Name")), "s.yaml: job 'Bad_Name': name: String should match pattern"),
    (spec(train(), train()), "s.yaml: job 'ddpm': name: duplicate job name"),
    (spec(train(), sample(src="nope")), "s.yaml: job 'grid': from: no job named 'nope' in this spec"),
    (spec(sample(src=None)), "s.yaml: job 'grid': from: required field is missing"),
    (spec(train(), sample(train={"steps": 3})), "s.yaml: job 'grid': train: not used by kind 'sample'"),
    (spec(train(data={"dataset": "npz"})), "s.yaml: job 'ddpm': data: dataset 'npz' needs a path"),
    (spec(train(data={"dataset": "npz", "path": "no/such.npz"})), "s.yaml: job 'ddpm': data.path: no such file: no/such.npz"),
    (spec(train(model={"beta_start": 0.1, "beta_end": 0.01})), "s.yaml: job 'ddpm': model: beta_start 0.1 must be smaller than beta_end 0.01"),
    (spec(train(resources={"gpus": -1})), "s.yaml: job 'ddpm': resources.gpus: Input should be greater than or equal to 0"),
    (spec(train(), sample(src="http://x/y")), "s.yaml: job 'grid': from: unsupported URI scheme"),
    (spec(train(), sample(name="g2", src="grid"), sample()), "s.yaml: job 'g2': from: job 'grid' is a 'sample' job"),
    (spec(train(kind="evaluate", train=None, **{"from": ["ddpm"]})), "s.yaml: job 'ddpm': family: an evaluate job scores jobs of any family; leave it out"),
    (spec(train(), {"name": "g", "kind": "sample", "from": "ddpm"}), "s.yaml: job 'g': family: required field is missing"),
    (spec(train(), sample(), evaluate(sources=["grid"], evaluate={"num_samples": 100})), "s.yaml: job 'score': evaluate.num_samples: 100 but job 'grid' made only 64 images"),
    (spec(train(), evaluate(data={"image_size": 28})), "s.yaml: job 'score': from: job 'ddpm' makes 1x16x16 images, the evaluation data is 1x28x28"),
    (spec(train(), evaluate(), evaluate("score2", ["score"])), "s.yaml: job 'score2': from: job 'score' is a 'evaluate' job and produces no images to evaluate"),
    (spec(train(), evaluate(evaluate={"per_source": {"other": {}}})), "s.yaml: job 'score': evaluate.per_source.other: not one of the jobs in 'from'"),
    (spec(train(), evaluate(evaluate={"sample": {"sampler": "euler"}})), "s.yaml: job 'score': evaluate.sample.sampler: must be one of 'ddim', 'ancestral' for family 'ddpm'"),
    (spec(train(), evaluate(**{"from": []})), "s.yaml: job 'score': from: required field is missing"),
    (spec(train(family="vqgan", model={"channel_mult": [1, 2, 2, 2]}, data={"image_size": 12})), "s.yaml: job 'ddpm': data.image_size: 12 is not divisible by 8, which the autoencoder's 4 levels"),
    (spec(vq(), ar(data={"image_size": 32})), "s.yaml: job 'ar': model.tokenizer: job 'vq' works on 1x16x16 images, this job's data is 1x32x32"),
    (spec(train("vq", family="gan", model={}), ar()), "s.yaml: job 'ar': model.tokenizer: job 'vq' is a 'gan' train job; it must be a trained 'vqgan' model"),
    (spec(vq(), sample("vs", "vq", family="vqgan"), ar(model={"tokenizer": "vs"})), "s.yaml: job 'ar': model.tokenizer: job 'vs' is a 'sample' job and has no checkpoint"),
    (spec(vq(), ar(model={"tokenizer": "nope"})), "s.yaml: job 'ar': model.tokenizer: no job named 'nope' in this spec"),
    (spec(ar(model={})), "s.yaml: job 'ar': model.tokenizer: required field is missing"),
    (spec(vq(model={"channel_mult": [1]}), ar(data={"image_size": 40}, model={"tokenizer": "vq"}) | {"name": "ar"}), "s.yaml: job 'ar': model.tokenizer: job 'vq' works on"),
    (spec(vq(data={"image_size": 64}, model={"channel_mult": [1]}), ar(data={"image_size": 64})), "s.yaml: job 'ar': model.tokenizer: 64x64 images make 4096 tokens with job 'vq'; at most 1024"),
    (spec(vq(), ar(model={"tokenizer": "vq", "class_conditional": True}, data={"dataset": "idx", "path": "x.idx"})), "s.yaml: job 'ar': model.class_conditional: the data has no labels"),
    (spec(vq(), ar(model={"tokenizer": "vq", "dim": 30, "heads": 4})), "s.yaml: job 'ar': model: dim 30 is not divisible by heads 4"),
    (spec(ae(), ldm(model={"autoencoder": "ae", "channel_mult": [1, 2, 2, 2]})), "s.yaml: job 'ldm': model.autoencoder: its latent size: 4 is not divisible by 8, which the U-Net's 4 levels"),
    (spec(ae(), ldm(), ldm("ldm2", model={"autoencoder": "ldm"})), "s.yaml: job 'ldm2': model.autoencoder: job 'ldm' is a 'ldm' train job (stage: diffusion); it must be a trained 'ldm' (stage: autoencoder) or 'vqgan' model"),
    (spec(ldm(model={"autoencoder": "ae", "stage": "decoder"})), "s.yaml: job 'ldm': model.stage: must be one of 'diffusion', 'autoencoder'"),
    (spec(ae(model={"stage": "autoencoder", "timesteps": 10})), "s.yaml: job 'ae': model.timesteps: unknown field"),
    (spec(train(data={"image_size": 9})), "s.yaml: job 'ddpm': data.image_size: 9 is not divisible by 2"),
    (spec(train(family="gan", model={}, data={"image_size": 6})), "s.yaml: job 'ddpm': data.image_size: 6 cannot be reached by doubling"),
    (spec(train(family="gan", model={"loss": "wasserstein"})), "s.yaml: job 'ddpm': model.loss: Input should be 'bce' or 'hinge'"),
    ({"experiment": "t", "jobs": []}, "s.yaml: jobs: must be a non-empty list"),
    ({"experiment": "no spaces", "jobs": [train()]}, "s.yaml: experiment: String should match pattern"),
    ({"experiment": "t", "jobs": [train()], "extra": 1}, "s.yaml: extra: unknown field"),
    (["a", "list"], "s.yaml: the spec must be a mapping"),
    (spec(train(), sample(sample={"steps": 5000})), "s.yaml: job 'grid': sample.steps: 5000 steps but job 'ddpm' has 1000 timesteps"),
    # distillation
    (spec(train(), train("gan", family="gan"), distill(teacher="gan")), "s.yaml: job 'fast': teacher: job 'gan' is family 'gan', this job is 'ddpm'"),
    (spec(train(), sample(), distill(teacher="grid")), "s.yaml: job 'fast': teacher: job 'grid' is a 'sample' job; a teacher must be a trained model (a train or distill job)"),
    (spec(train(), distill(distill={"student_steps": 4})), "s.yaml: job 'fast': distill.student_steps: 4 steps cannot be reached by halving the 1000 steps of the teacher (job 'ddpm'); set distill.teacher_steps to 4 times a power of two, e.g. 512"),
    (spec(train(), distill(distill={"student_steps": 4, "teacher_steps": 48})), "s.yaml: job 'fast': distill.teacher_steps: 4 steps cannot be reached by halving the 48 steps"),
    (spec(train(), distill(distill={"teacher_steps": 2048})), "s.yaml: job 'fast': distill.teacher_steps: 2048 but job 'ddpm' has 1000 timesteps"),
    (spec(train(), distill(distill={"teacher_steps": 64}), distill("faster", "fast", distill={"student_steps": 4})), "s.yaml: job 'faster': distill.student_steps: 4 steps are not fewer than the 4 steps of the teacher (job 'fast')"),
    (spec(train("gan", family="gan", model={"g_width": 32}), distill("small", "gan", "gan", distill={"student": {"g_width": 64}})), "s.yaml: job 'small': distill.student.g_width: 64 is larger than the teacher's 32 (job 'gan'); a student is meant to be smaller (set distill.allow_larger_student: true to allow it)"),
    (spec(vq(), ar(), distill("small", "ar", "autoregressive", distill={"student": {"layers": 8}})), "s.yaml: job 'small': distill.student.layers: 8 is larger than the teacher's 4 (job 'ar')"),
    (spec(vq(), ar(), distill("small", "ar", "autoregressive", distill={"student": {"dim": 50}})), "s.yaml: job 'small': distill.student: dim 50 is not divisible by heads 4"),
    (spec(vq(), ar(), distill("small", "ar", "autoregressive", distill={"student": {"tokenizer": "x"}})), "s.yaml: job 'small': distill.student.tokenizer: the student keeps the teacher's tokenizer; it may change dim, layers, heads, dropout"),
    (spec(train("gan", family="gan"), distill("small", "gan", "gan", distill={"method": "kd"})), "s.yaml: job 'small': distill.method: family 'gan' distils with 'regress', not 'kd'"),
    (spec(train(), {"name": "fast", "kind": "distill", "family": "ddpm", "teacher": "ddpm"}), "s.yaml: job 'fast': distill: required field is missing (family 'ddpm' distils with method 'progressive')"),
    (spec(train(), distill(distill={"prediction": "eps"})), "s.yaml: job 'fast': distill.prediction: Input should be 'v' or 'x'"),
    (spec(vq(), distill("vd", "vq", "vqgan")), "s.yaml: job 'vd': kind: family 'vqgan' cannot run kind 'distill'"),
    (spec(ae(), ldm(), distill("ld", "ae", "ldm", distill={"teacher_steps": 64})), "s.yaml: job 'ld': teacher: job 'ae' is the autoencoder stage of 'ldm', which cannot be distilled (use its diffusion stage)"),
    (spec(train(), distill(train={"steps": 5}, sample={"steps": 4})), "s.yaml: job 'fast': sample: not used by kind 'distill'"),
    (spec(train(), distill(distill={"teacher_steps": 64}), sample(src="fast", sample={"sampler": "ancestral"})), "s.yaml: job 'grid': sample.sampler: job 'fast' is distilled for 4-step DDIM; sample it with sampler: ddim"),
    (spec(train(), distill(data={"image_size": 28}, distill={"teacher_steps": 64})), "s.yaml: job 'fast': teacher: job 'ddpm' works on 1x16x16 images, this job's data is 1x28x28"),
    (spec(train(resources={"workers": 3}, train={"batch_size": 32})), "s.yaml: job 'ddpm': train.batch_size: 32 does not split evenly over 3 workers"),
    (spec(train(resources={"workers": 2, "gpus": 1})), "s.yaml: job 'ddpm': resources.gpus: a data-parallel job asks for GPUs per worker, in resources.gpus_per_worker (got 1)"),
    (spec(train(resources={"gpus_per_worker": 1})), "s.yaml: job 'ddpm': resources.gpus_per_worker: only data-parallel jobs (resources.workers > 1) have workers; use resources.gpus"),
    (spec(train(), sample(resources={"workers": 2})), "s.yaml: job 'grid': resources.workers: only train jobs run data-parallel, not kind 'sample'"),
    (spec(train(), evaluate(resources={"workers": 2})), "s.yaml: job 'score': resources.workers: only train jobs run data-parallel, not kind 'evaluate'"),
    (spec(train(resources={"workers": 0})), "s.yaml: job 'ddpm': resources.workers: Input should be greater than or equal to 1"),
    (spec(train(resources={"priority": "high"})), "s.yaml: job 'ddpm': resources.priority: Input should be a valid integer"),
])
def test_bad_input_is_one_clear_line(data, expected):
    lines = errors(data)
    assert any(line.startswith(expected) for line in lines), lines
    assert all("\n" not in line and "Traceback" not in line for line in lines)


@pytest.mark.parametrize("data, expected", [
    # pydantic's own messages: the value given, after the message
    (spec(train(family="vae")), f"s.yaml: job 'ddpm': family: must be one of {', '.join(FAMILIES)} (got 'vae')"),
    (spec(train(kind="trian")), "s.yaml: job 'ddpm': kind: Input should be 'train', 'sample', 'distill' or 'evaluate' (got 'trian')"),
    (spec(train(), sample(sample={"sampler": "plms"})), "s.yaml: job 'grid': sample.sampler: must be one of 'ddim', 'ancestral' for family 'ddpm' (got 'plms')"),
    (spec(train(data={"dataset": "csv"})), "s.yaml: job 'ddpm': data.dataset: Input should be 'digits', 'npz', 'idx' or 'folder' (got 'csv')"),
    (spec(train(data={"channels": 2})), "s.yaml: job 'ddpm': data.channels: Input should be 1 or 3 (got 2)"),
    (spec(train(), evaluate(evaluate={"sample": {"sampler": "euler"}})), "s.yaml: job 'score': evaluate.sample.sampler: must be one of 'ddim', 'ancestral' for family 'ddpm' (got 'euler')"),
    (spec(train(), evaluate(evaluate={"per_source": {"ddpm": {"spacing": "cosine"}}})), "s.yaml: job 'score': evaluate.per_source.ddpm.spacing: must be one of 'linspace', 'trailing' for family 'ddpm' (got 'cosine')"),
    (spec(train(), distill(distill={"prediction": "eps"})), "s.yaml: job 'fast': distill.prediction: Input should be 'v' or 'x' (got 'eps')"),
    (spec(train(family="gan", model={"loss": "wasserstein"})), "s.yaml: job 'ddpm': model.loss: Input should be 'bce' or 'hinge' (got 'wasserstein')"),
    # model-level checks name the field's value inside the message (not the whole section)
    (spec(train(model={"beta_start": 0.1, "beta_end": 0.01})), "s.yaml: job 'ddpm': model: beta_start 0.1 must be smaller than beta_end 0.01"),
    (spec(train(data={"dataset": "digits", "path": "x.npz"})), "s.yaml: job 'ddpm': data: dataset 'digits' is built in and takes no path, labels or split.heldout (got path 'x.npz')"),
    (spec(train(data={"split": {"heldout": "h.npz"}})), "s.yaml: job 'ddpm': data: dataset 'digits' is built in and takes no path, labels or split.heldout (got split.heldout 'h.npz')"),
    (spec(train(data={"dataset": "folder", "path": "imgs", "labels": "l.idx"})), "s.yaml: job 'ddpm': data: dataset 'folder' is a directory or an s3:// prefix whose subfolders are the classes (no labels file; got labels 'l.idx')"),
    (spec(train(data={"dataset": "folder", "path": "http://b/imgs"})), "s.yaml: job 'ddpm': data: dataset 'folder' is a directory or an s3:// prefix whose subfolders are the classes (no labels file; got path 'http://b/imgs')"),
    (spec(train(data={"dataset": "npz", "path": "x.npz", "split": {"heldout_labels": "y.idx"}})), "s.yaml: job 'ddpm': data: split.heldout_labels is for dataset 'idx' only, not 'npz' (got 'y.idx')"),
    # genforge's own checks
    (spec(train(resources={"gpus_per_worker": 1})), "s.yaml: job 'ddpm': resources.gpus_per_worker: only data-parallel jobs (resources.workers > 1) have workers; use resources.gpus (got 1)"),
    (spec(train(resources={"workers": 2, "gpus_per_worker": 0.5})), "s.yaml: job 'ddpm': resources.gpus_per_worker: ranks with a fraction of a GPU would share one, which NCCL refuses; give each rank whole GPUs (got 0.5)"),
    (spec(train(resources={"workers": 2, "gpus": 1})), "s.yaml: job 'ddpm': resources.gpus: a data-parallel job asks for GPUs per worker, in resources.gpus_per_worker (got 1)"),
    (spec(train(), sample(resources={"workers": 2})), "s.yaml: job 'grid': resources.workers: only train jobs run data-parallel, not kind 'sample' (got 2)"),
    (spec(train(kind="evaluate", train=None, **{"from": ["ddpm"]})), "s.yaml: job 'ddpm': family: an evaluate job scores jobs of any family; leave it out (got 'ddpm')"),
    (spec(vq(), ar(), distill("small", "ar", "autoregressive", distill={"student": {"tokenizer": "x"}})), "s.yaml: job 'small': distill.student.tokenizer: the student keeps the teacher's tokenizer; it may change dim, layers, heads, dropout (got 'x')"),
    (spec(vq(), ar(model={"tokenizer": "vq", "class_conditional": True}, data={"dataset": "idx", "path": "x.idx"})), "s.yaml: job 'ar': model.class_conditional: the data has no labels (dataset 'idx' without data.labels; set data.labels)"),
    (spec(vq(), ar(model={"tokenizer": "vq", "class_conditional": True}, data={"dataset": "npz", "path": "x.npz", "y_key": None})), "s.yaml: job 'ar': model.class_conditional: the data has no labels (dataset 'npz' with data.y_key null; set data.y_key)"),
    ({"experiment": "t", "jobs": 3}, "s.yaml: jobs: must be a non-empty list of jobs (got 3)"),
    ({"experiment": "t", "jobs": []}, "s.yaml: jobs: must be a non-empty list of jobs (got [])"),
    ({"experiment": "t"}, "s.yaml: jobs: must be a non-empty list of jobs"),
    (spec(5), "s.yaml: jobs[0]: must be a mapping (got 5)"),
    (["a", "list"], "s.yaml: the spec must be a mapping with 'experiment' and 'jobs' (got ['a', 'list'])"),
    # long values are cut short
    (spec(train(family="v" * 100)), f"s.yaml: job 'ddpm': family: must be one of {', '.join(FAMILIES)} (got '" + "v" * 59 + "...)"),
    (spec(ldm(model={"autoencoder": "ae", "stage": "s" * 100})), "s.yaml: job 'ldm': model.stage: must be one of 'diffusion', 'autoencoder' (got '" + "s" * 59 + "...)"),
    (spec(train(), distill(distill={"method": "m" * 100})), "s.yaml: job 'fast': distill.method: family 'ddpm' distils with 'progressive', not '" + "m" * 59 + "..."),
])
def test_errors_name_the_value_they_got(data, expected):
    lines = errors(data)
    assert expected in lines, lines
    assert all("\n" not in line and "{" not in line for line in lines), lines  # no dict dumps


def test_every_problem_is_reported():
    lines = errors(spec(train(model={"channels": "x", "dropout": 2}), sample(src="missing")))
    assert len(lines) == 2  # two model problems in job 1; the reference is checked after
    assert {l.split(": ")[2] for l in lines} == {"model.channels", "model.dropout"}


def test_cycle_is_named():
    s = parse_spec(spec(train("a"), train("b"), train("c")))
    with pytest.raises(SpecError) as info:
        topological_order(list(s.jobs), {"a": [], "b": ["c"], "c": ["b"]})
    assert "dependency cycle b -> c -> b" in info.value.lines[0]


def test_topological_order_is_stable_and_respects_deps():
    s = parse_spec(spec(sample("z", src="b"), train("b"), train("a")))
    deps = {"z": ["b"], "b": [], "a": []}
    assert topological_order(list(s.jobs), deps) == ["b", "a", "z"]


def planned(data: dict, keys: dict[str, str] | None = None, metas: dict | None = None):
    """The plan of `data` with its inputs resolved by fakes: every data set staged under
    `keys` (by dataset name; default one key) and checkpoint URIs read from `metas`."""
    parsed = parse_spec(data, "s.yaml")
    keys, metas = keys or {}, metas or {}

    def resolve(uri: str) -> ResolvedCheckpoint:
        if uri not in metas:
            raise FileNotFoundError(f"no complete checkpoint under {uri}")
        meta = metas[uri]
        return ResolvedCheckpoint(f"{uri}/checkpoints/step-{meta.get('step', 1):06d}",
                                  meta.get("digest", "d0"), meta)

    return build_plan(parsed, resolve_inputs(
        parsed, lambda job: keys.get(job.data.dataset, "datasets/k0/data.npz"), resolve))


def test_keep_checkpoints_and_compile_change_no_hash():
    """Settings that change how a job runs, not its result, leave its cache entry alone."""
    base = planned(spec(train(), sample()))
    same = planned(spec(train(train={"steps": 10, "keep_checkpoints": 1, "compile": True}),
                        sample(sample={"compile": True})))
    bf16 = planned(spec(train(train={"steps": 10, "precision": "bf16"}), sample()))
    for name in ("ddpm", "grid"):
        assert same.by_name[name].hash == base.by_name[name].hash
        assert bf16.by_name[name].hash != base.by_name[name].hash


def test_hash_changes_with_content_and_upstream_not_with_resources():
    base = planned(spec(train(), sample()))
    more_cpus = planned(spec(train(resources={"cpus": 2}), sample()))
    other_lr = planned(spec(train(train={"steps": 10, "lr": 1e-3}), sample()))
    assert base.by_name["ddpm"].hash == more_cpus.by_name["ddpm"].hash
    assert base.by_name["ddpm"].hash != other_lr.by_name["ddpm"].hash
    # the sample job did not change, but what it reads did
    assert base.by_name["grid"].hash != other_lr.by_name["grid"].hash
    job = base.by_name["ddpm"].job
    assert job_hash(job, {}, "v1", "k") != job_hash(job, {}, "v2", "k")
    # keeping fewer checkpoints does not change what a job computes
    fewer = planned(spec(train(train={"steps": 10, "keep_checkpoints": 1}), sample()))
    assert fewer.by_name["ddpm"].hash == base.by_name["ddpm"].hash
    # without its inputs resolved a plan has no hashes
    assert build_plan(parse_spec(spec(train(), sample()))).by_name["ddpm"].hash is None


def test_hash_covers_the_content_of_what_a_job_reads_not_its_name():
    """The data by its staged content key, whatever its path; a checkpoint URI by the digest
    of the exact checkpoint it resolved to; the code by its family's digest."""
    npz = {"dataset": "npz", "path": "s3://b/d.npz"}
    one = planned(spec(train(data=npz), sample()), {"npz": "datasets/aa/data.npz"})
    regenerated = planned(spec(train(data=npz), sample()), {"npz": "datasets/bb/data.npz"})
    moved = planned(spec(train(data={**npz, "path": "s3://c/elsewhere.npz"}), sample()),
                    {"npz": "datasets/aa/data.npz"})
    assert one.by_name["ddpm"].hash != regenerated.by_name["ddpm"].hash
    assert one.by_name["grid"].hash != regenerated.by_name["grid"].hash
    assert one.by_name["ddpm"].hash == moved.by_name["ddpm"].hash
    assert one.by_name["ddpm"].data_key == "datasets/aa/data.npz"

    meta = {"family": "ddpm", "kind": "train", "model": {"timesteps": 1000},
            "image_shape": [1, 16, 16]}
    reader = spec(sample("s", "s3://b/ddpm"))
    before = planned(reader, metas={"s3://b/ddpm": {**meta, "digest": "d1", "step": 10}})
    after = planned(reader, metas={"s3://b/ddpm": {**meta, "digest": "d2", "step": 20}})
    assert before.by_name["s"].hash != after.by_name["s"].hash
    # the job reads the exact checkpoint resolved at planning, not whatever LATEST says later
    assert before.by_name["s"].checkpoints == {"s3://b/ddpm": "s3://b/ddpm/checkpoints/step-000010"}

    gan = planned(spec(train("g", family="gan"), train()))
    assert gan.by_name["g"].code != gan.by_name["ddpm"].code
    scores = planned(spec(train("g", family="gan"), train(), evaluate("e", ["g"]),
                          evaluate("f", ["g", "ddpm"])))
    assert len({scores.by_name[n].code for n in ("e", "f", "g")}) == 3


@pytest.mark.parametrize("text, expected", [
    ("experiment: t\njobs: [\n", "invalid YAML"),
    ("a: 1\na: 2\n", "duplicate key 'a'"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("", "must be a mapping"),
    ("experiment: t\njobs:\n  - name: x\n   kind: train\n", "invalid YAML"),
])
def test_yaml_problems(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.lines[0].startswith(str(path)) and expected in info.value.lines[0]


def test_binary_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="not a UTF-8 text file"):
        load_spec(path)


def test_cli_validate_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(QUICKSTART)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "ddpm" in ok.stdout and "grid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec(train(model={"channels": "x"}))))
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"{bad}: job 'ddpm': model.channels: Input should be a valid "
                                  "integer, unable to parse string as an integer (got 'x')")
    missing = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", "nope.yaml"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "nope.yaml: cannot read the file" in missing.stderr
    assert "Traceback" not in out.stderr + missing.stderr


def test_checkpoint_uris_are_checked_before_anything_runs():
    metas = {"s3://b/vq": {"family": "vqgan", "model": {"channel_mult": [1, 2, 2]},
                           "image_shape": [1, 16, 16]},
             "s3://b/gan": {"family": "gan", "model": {}, "image_shape": [1, 16, 16]}}

    ok = planned(spec(ar(model={"tokenizer": "s3://b/vq"}), sample("s", "s3://b/gan", family="gan")),
                 metas=metas)
    check_uri_references(ok)
    assert ok.by_name["ar"].deps == ()  # a URI is not a job to wait for

    bad = planned(spec(
        ar(model={"tokenizer": "s3://b/gan"}),
        ar("ar2", model={"tokenizer": "s3://b/none"}),
        ar("ar3", model={"tokenizer": "s3://b/vq"}, data={"image_size": 28}),
        sample("s", "s3://b/vq", family="ldm"),
        evaluate("e", ["s3://b/gan"], data={"image_size": 28})), metas=metas)
    with pytest.raises(SpecError) as info:
        check_uri_references(bad)
    metas["s3://b/ddpm"] = {"family": "ddpm", "kind": "train", "image_shape": [1, 16, 16],
                            "model": {"timesteps": 1000, "prediction": "v"}}
    teachers = planned(spec(
        distill("a", "s3://b/ddpm", distill={"teacher_steps": 64}),
        distill("b", "s3://b/ddpm"), distill("c", "s3://b/gan")), metas=metas)
    with pytest.raises(SpecError) as distills:
        check_uri_references(teachers)
    assert [line.split(": ")[2] for line in distills.value.lines] == [
        "distill.student_steps", "teacher"]
    assert info.value.lines == [
        "s.yaml: job 'ar': model.tokenizer: s3://b/gan is a 'gan' train job; it must be a trained 'vqgan' model",
        "s.yaml: job 'ar2': model.tokenizer: cannot read a checkpoint at s3://b/none (no complete checkpoint under s3://b/none)",
        "s.yaml: job 'ar3': model.tokenizer: s3://b/vq works on 1x16x16 images, this job's data is 1x28x28 (channels x size x size)",
        "s.yaml: job 's': from: s3://b/vq is family 'vqgan', this job is 'ldm'",
        "s.yaml: job 'e': from: s3://b/gan makes 1x16x16 images, the evaluation data is 1x28x28 (channels x size x size)",
    ]


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data").exists(), reason="no ../shared/data")
def test_example_specs_validate():
    for name in ("quickstart", "gan", "vqgan-ar", "ldm", "evaluate", "distill-ddpm", "distill-ar",
                 "data-parallel"):
        plan = build_plan(load_spec(ROOT / "jobspecs" / f"{name}.yaml"))
        assert plan.jobs
    plan = build_plan(load_spec(ROOT / "jobspecs" / "vqgan-ar.yaml"))
    assert plan.by_name["transformer"].deps == ("vqgan",)
    assert plan.by_name["samples"].deps == ("transformer",)
