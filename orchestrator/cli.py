"""genforge: up | down | env | validate | run | submit | jobs | logs | cancel | compare | sweep |
data | register | sample."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator import signals, stack
from orchestrator.spec import SpecError, load_spec
from orchestrator.submit import SubmitError

EXIT_FAILED, EXIT_INVALID = 1, 2


def _err(message: str) -> None:
    print(f"genforge: {message}", file=sys.stderr)


def cmd_up(args: argparse.Namespace) -> int:
    from orchestrator.tracking import ui_url

    state = stack.up(num_cpus=args.num_cpus, num_gpus=args.num_gpus, echo=print)
    print(f"stack up in {state.home}; MLflow UI: {ui_url(state.tracking_uri)}  "
          f"Ray dashboard: {state.dashboard_url}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack.down(echo=print)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    state = stack.status()
    if state is None:
        _err(f"no running stack in {stack.stack_home()}; start one with 'genforge up'")
        return EXIT_FAILED
    print("\n".join(stack.env_lines(state, stack.credentials(Path(state.home)))))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.plan import build_plan

    plan = build_plan(load_spec(args.spec))
    plan, missing = _resolved_offline(plan)
    print(f"{args.spec}: experiment '{plan.spec.experiment}', {len(plan.jobs)} jobs, "
          f"genforge {plan.code_version}")
    print(f"  {'#':<3} {'job':<18} {'kind':<9} {'family':<15} {'reads':<20} "
          f"{'gpus':>5} {'cpus':>5}  {'code':<12}  hash")
    for i, p in enumerate(plan.jobs, 1):
        r = p.job.resources
        reads = ",".join(p.job.sources) or "-"
        print(f"  {i:<3} {p.name:<18} {p.job.kind:<9} {p.job.family or '-':<15} {reads:<20.20} "
              f"{r.gpus:>5g} {r.cpus:>5g}  {p.code or '-':<12}  {p.hash or '-'}")
    if missing:
        print(f"  (hash '-': {missing})")
    return 0


def _resolved_offline(plan):
    """The plan with what can be read from here without staging anything: local data's
    content keys, and checkpoint URIs when storage is configured. Returns it and what could
    not be read (None if nothing)."""
    from orchestrator import datasets
    from orchestrator import settings as settings_mod
    from orchestrator.plan import (build_plan, check_uri_references, is_uri, resolve_checkpoint,
                                   resolve_inputs)

    settings = settings_mod.resolve()
    creds = settings.s3 if settings else None
    base = Path(plan.spec.source).parent
    unread: dict[str, str] = {}

    def key(job) -> str | None:
        try:
            return datasets.content_key(job.data, creds, base)
        except datasets.DataError as exc:
            if not is_uri(job.data.path or ""):
                raise SpecError([f"{plan.spec.source}: job '{job.name}': data: {exc}"]) from None
            unread[job.data.path] = str(exc)
            return None

    def checkpoint(uri: str):
        if settings is None:
            raise RuntimeError("no storage configured")
        return resolve_checkpoint(uri, creds, settings.tracking_uri)

    inputs = resolve_inputs(plan.spec, key, checkpoint)
    plan = build_plan(plan.spec, inputs)
    if settings is not None:
        check_uri_references(plan)  # what each checkpoint holds fits the job that reads it
    unread.update(inputs.unreadable)
    return plan, "; ".join(f"{uri}: {why}" for uri, why in unread.items())[:300] or None


class CliExit(Exception):
    """Stop the command with this exit code and one-line message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _services(spec: str, *, start_stack: bool, missing: str):
    """The service settings, checked reachable (storage, tracking) before anything starts."""
    from orchestrator import settings as settings_mod
    from orchestrator.settings import ServiceError, check_services

    settings = settings_mod.resolve(start_stack=start_stack,
                                    echo=lambda m: print(m, file=sys.stderr))
    if settings is None:
        raise CliExit(EXIT_INVALID, f"no services configured; {missing}, or run 'genforge up'")
    try:
        check_services(settings)
    except ServiceError as exc:
        raise CliExit(EXIT_INVALID, f"{spec}: {exc}") from None
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    # Ctrl-C and a scheduler's SIGTERM cancel gracefully from here on (the driver sets its
    # handlers again once Ray has started, which installs handlers of its own)
    signals.handle()
    from orchestrator.plan import build_plan

    plan = build_plan(load_spec(args.spec))
    force: bool | set[str] = False
    if args.force is not None:
        named = {name for names in args.force for name in names}
        force = True if [] in args.force else named
        unknown = sorted(named - set(plan.by_name))
        if unknown:
            _err(f"{args.spec}: --force: no job named {', '.join(unknown)}")
            return EXIT_INVALID
    settings = _services(args.spec, start_stack=True,
                         missing="set RAY_ADDRESS, MLFLOW_TRACKING_URI and GENFORGE_STORAGE")
    settings.use_ray()  # before Ray is imported: it reads its authentication settings then
    from orchestrator.driver import Driver
    from orchestrator.settings import ServiceError
    from orchestrator.tracking import ui_url

    driver = Driver(plan, settings, force=force)
    try:
        driver.prepare()
        print(f"MLflow UI: {ui_url(settings.tracking_uri)}  (experiment "
              f"'{plan.spec.experiment}')", file=sys.stderr)
        return driver.run()
    except ServiceError as exc:  # nothing ran: the environment is wrong, as for bad input
        _err(f"{args.spec}: {exc}")
        return EXIT_INVALID
    finally:  # every run is closed: a stop that comes now, while Ray shuts down, has no work
        signals.handle(signal.SIG_IGN)


def _job_server(args: argparse.Namespace) -> str | None:
    """The Ray job server: --address, else the environment (as `ray job` reads it), else the
    local stack's dashboard, which is asked with the stack's token. Called before Ray is
    imported: Ray reads its authentication settings once, when it is."""
    address = args.address or next(
        (os.environ[name] for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
         if os.environ.get(name, "").startswith(("http://", "https://"))), None)
    state = stack.status()
    if state is not None and (address is None or address.rstrip("/") == state.dashboard_url):
        stack.use_ray_auth(Path(state.home))
        return state.dashboard_url
    return address


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator import submit
    from orchestrator.plan import build_plan

    plan = build_plan(load_spec(args.spec))
    settings = _services(args.spec, start_stack=False,
                         missing="set MLFLOW_TRACKING_URI, GENFORGE_STORAGE and the AWS_* "
                                 "variables of the storage the cluster uses")
    address = _job_server(args)  # before Ray is imported (see _job_server)
    from orchestrator.driver import Driver

    from orchestrator.settings import ServiceError

    driver = Driver(plan, settings)
    try:
        driver.prepare()  # from here: the cluster reads the data from storage
    except ServiceError as exc:
        _err(f"{args.spec}: {exc}")
        return EXIT_INVALID
    try:
        submission = submit.submit(driver.plan, settings, address,
                                   send_credentials=args.send_credentials)
    except submit.SubmitError as exc:
        _err(f"{args.spec}: {exc}")
        return EXIT_FAILED
    print(submission)
    print(f"follow it with: genforge logs {submission} --follow", file=sys.stderr)
    if not args.wait:
        return 0
    status = submit.wait(address, submission, timeout=float("inf"))
    print(f"{submission}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


def _pipeline_runs(submission: str, experiment: str):
    """The MLflow runs of a submission (pipeline run first), if the tracking server is known."""
    from mlflow.tracking import MlflowClient

    from orchestrator import settings as settings_mod

    settings = settings_mod.resolve()
    if settings is None:
        return []
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`genforge.submission` = '{submission}'")
    return sorted(runs, key=lambda r: "genforge.job" in r.data.tags)


def cmd_jobs(args: argparse.Namespace) -> int:
    from orchestrator import submit

    rows = []
    for job in submit.submissions(_job_server(args)):
        experiment = job.metadata[submit.METADATA_KEY]
        runs = _pipeline_runs(job.submission_id, experiment)
        progress = runs[0].data.tags.get("genforge.progress", "-") if runs else "-"
        started = time.strftime("%Y-%m-%d %H:%M:%S",
                                time.localtime((job.start_time or 0) / 1000))
        rows.append((job.submission_id, str(job.status.value), experiment, started, progress))
    print(f"{'submission':<36} {'status':<10} {'experiment':<18} {'started':<20} progress")
    for row in rows:
        print(f"{row[0]:<36} {row[1]:<10} {row[2]:<18.18} {row[3]:<20} {row[4]}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from orchestrator import submit

    for chunk in submit.logs(_job_server(args), args.submission, args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator import settings as settings_mod
    from orchestrator import submit

    address = _job_server(args)
    job = submit.info(address, args.submission)
    status = submit.cancel(address, args.submission)
    # runs the driver had no time to close: cancelled all the same
    leftover = [r for r in _pipeline_runs(args.submission, job.metadata[submit.METADATA_KEY])
                if r.info.status in ("RUNNING", "SCHEDULED")]
    if leftover:
        client = MlflowClient(settings_mod.resolve().tracking_uri)
        for run in leftover:
            client.set_terminated(run.info.run_id, "KILLED")
    print(f"{args.submission}: {status}")
    return 0 if status in submit.TERMINAL else EXIT_FAILED


def cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from orchestrator import compare
    from orchestrator import settings as settings_mod
    from orchestrator.storage import open_storage

    settings = settings_mod.resolve()
    if settings is None:
        _err("no services configured; set MLFLOW_TRACKING_URI and GENFORGE_STORAGE, or run "
             "'genforge up'")
        return EXIT_INVALID
    client = MlflowClient(settings.tracking_uri)
    root = open_storage(settings.storage, settings.s3)
    try:
        rows, parent = compare.collect(client, root, args.experiment)
        if args.grids:
            compare.grids(rows, root, args.grids)
    except compare.CompareError as exc:
        _err(str(exc))
        return EXIT_FAILED
    print(compare.render(rows, args.format))
    if parent:  # the table beside the pipeline that produced it, in MLflow
        client.log_text(parent, compare.render(rows, "markdown"), "comparison.md")
        client.log_text(parent, compare.render(rows, "json"), "comparison.json")
        if args.grids:
            client.log_image(parent, np.asarray(Image.open(args.grids)), "comparison.png")
    if args.plot:
        compare.plot(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.grids:
        print(f"grids: {args.grids}", file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A swept job's trials ranked (its study, read from storage), and its plot."""
    from orchestrator.plan import build_plan
    from orchestrator.runs import job_prefix
    from orchestrator.storage import NotFound, open_storage
    from orchestrator.sweep import JOURNAL, Study, plot, render

    plan = build_plan(load_spec(args.spec))
    if args.job not in plan.by_name or plan.by_name[args.job].job.sweep is None:
        swept = [p.name for p in plan.jobs if p.job.sweep is not None]
        _err(f"{args.spec}: no swept job named '{args.job}' (swept: {', '.join(swept) or 'none'})")
        return EXIT_INVALID
    settings = _services(args.spec, start_stack=False,
                         missing="set MLFLOW_TRACKING_URI and GENFORGE_STORAGE")
    plan, missing = _resolved_offline(plan)
    planned = plan.by_name[args.job]
    if planned.hash is None:
        _err(f"{args.spec}: job '{args.job}': cannot find its sweep ({missing})")
        return EXIT_FAILED
    storage = open_storage(settings.storage, settings.s3).child(
        job_prefix(plan.spec.experiment, args.job, planned.hash))
    try:
        storage.get_bytes(JOURNAL)
    except NotFound:
        _err(f"{args.spec}: job '{args.job}': its sweep has not started ({storage.uri()})")
        return EXIT_FAILED
    study = Study(planned.job, storage)
    print(render(study))
    if args.plot:
        plot(study, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Staged data sets: stage a spec's ahead of a run, list them, remove one."""
    from orchestrator import datasets
    from orchestrator.lease import LEASE_KEY
    from orchestrator.storage import StorageError, open_storage

    settings = _services(getattr(args, "spec", None) or "data", start_stack=False,
                         missing="set GENFORGE_STORAGE (and the S3 endpoint and keys)")
    root = open_storage(settings.storage, settings.s3)
    try:
        if args.action == "stage":
            spec = load_spec(args.spec)
            base = Path(spec.source).parent
            for job in spec.jobs:
                if job.kind in ("train", "distill", "evaluate") and job.data is not None:
                    try:
                        key = datasets.stage(job.data, root, settings.s3, base=base)
                    except datasets.DataError as exc:
                        raise SpecError([f"{spec.source}: job '{job.name}': data: {exc}"]) from None
                    index = datasets.read_index(root, key)
                    print(f"{job.name}: {root.uri(key)}  {index['count']} images "
                          f"{'x'.join(map(str, index['shape']))} in {len(index['shards'])} shards")
        elif args.action == "ls":
            print(f"{'data set':<14} {'images':>9} {'shape':<10} {'shards':>6} {'MB':>8}  read by")
            for d in datasets.staged(root):
                index = d["index"]
                readers = ", ".join(r.split("/")[0] + "/" + r.split("/")[1] for r in d["readers"])
                print(f"{d['digest'][:12]:<14} {index['count']:>9} "
                      f"{'x'.join(map(str, index['shape'])):<10} {len(index['shards']):>6} "
                      f"{d['pixel_bytes'] / 2**20:>8.1f}  {readers or '-'}")
        else:  # rm
            def running(prefix: str) -> bool:
                return root.exists(f"{prefix}/{LEASE_KEY}")

            gone = datasets.remove(root, args.digest, running)
            print(f"removed {len(gone)} objects of {gone[0].rsplit('/', 1)[0]}")
    except datasets.DataError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except StorageError as exc:
        _err(f"storage {settings.storage}: {exc}")
        return EXIT_INVALID
    return 0


def _registry_services() -> tuple[str, Any]:
    """The tracking server of the model registry commands, and the storage's credentials: the
    services' settings (environment, else the stack) or, on a machine that only samples
    registered models, MLFLOW_TRACKING_URI alone (with the AWS_* variables, if any)."""
    from orchestrator import settings as settings_mod
    from orchestrator.storage import S3Credentials

    settings = settings_mod.resolve()
    if settings is not None:
        return settings.tracking_uri, settings.s3
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], S3Credentials.from_env()
    raise CliExit(EXIT_INVALID, "no tracking server configured; set MLFLOW_TRACKING_URI (and the "
                                "AWS_* variables of the storage), or run 'genforge up'")


def cmd_register(args: argparse.Namespace) -> int:
    """A finished job's model (its run, or a checkpoint URI) as a new registered model version."""
    from orchestrator import models

    tracking, s3 = _registry_services()
    try:
        if "://" in args.source or args.source.startswith("/"):  # a checkpoint URI or path
            uri, run_id, metrics = args.source, None, None
        else:
            (uri, metrics), run_id = models.run_source(args.source, tracking), args.source
        made = models.register(tracking, uri, args.name, alias=args.alias, run_id=run_id, s3=s3,
                               metrics=metrics)
    except models.ModelError as exc:
        raise CliExit(EXIT_INVALID, str(exc)) from None
    named = f"@{args.alias}" if args.alias else f"/{made.version}"
    print(f"models:/{args.name}{named}: version {made.version} of '{args.name}', from "
          f"{made.tags[models.TAG + 'checkpoint']}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """A grid of a registered model's images, made on this machine."""
    import numpy as np
    from mlflow.exceptions import MlflowException

    from orchestrator import models
    from workers import images as imageio

    tracking, _ = _registry_services()
    request = {"num_images": args.n, "seed": args.seed, "steps": args.steps,
               "label": args.label, "guidance": args.guidance}
    try:
        model, found = models.load(args.model, tracking)
        made = model.predict({k: v for k, v in request.items() if v is not None})
    except models.ModelError as exc:
        raise CliExit(EXIT_INVALID, str(exc)) from None
    except MlflowException as exc:  # a setting the model cannot take
        raise CliExit(EXIT_INVALID, f"{args.model}: {exc.message.strip().splitlines()[0][:300]}"
                      ) from None
    images = np.stack([m["image"] for m in made])
    picture = imageio.grid(images, scale=imageio.display_scale(images.shape[1]))
    Path(args.out).write_bytes(imageio.png_bytes(picture))
    print(f"{args.out}: {len(images)} images of {args.model} (version {found.version}), "
          f"seed {args.seed}")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: `args.func` runs the command."""
    parser = argparse.ArgumentParser(prog="genforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the local stack (S3, MLflow, Ray head)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs for Ray; logical ones where the machine has none (default 2)")
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=cmd_down)
    sub.add_parser("env", help="print export lines for the local stack").set_defaults(func=cmd_env)

    p = sub.add_parser("validate", help="check a spec and print its plan")
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a spec's jobs on Ray")
    p.add_argument("spec", nargs="?")
    p.add_argument("--force", nargs="*", action="append", metavar="JOB",
                   help="run jobs afresh from step 0 though cached: all of them, or the named "
                        "ones and every job that reads them (repeatable)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="run a spec's driver on a Ray cluster as a Ray job")
    p.add_argument("spec")
    p.add_argument("--address", help="the Ray job server, e.g. http://HEAD:8265 "
                                     "(default: RAY_API_SERVER_ADDRESS, or the local stack's)")
    p.add_argument("--wait", action="store_true", help="wait for the submission to end")
    p.add_argument("--send-credentials", action="store_true",
                   help="send this shell's S3 key pair with the job, for a cluster whose nodes "
                        "have none (Ray writes it into its logs on every node)")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("jobs", help="list submissions with their state and progress")
    p.add_argument("--address")
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("logs", help="a submission's driver output")
    p.add_argument("submission")
    p.add_argument("--follow", action="store_true", help="stream until the submission ends")
    p.add_argument("--address")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("cancel", help="stop a submission: its jobs stop, their runs are KILLED")
    p.add_argument("submission")
    p.add_argument("--address")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("compare", help="a table of every evaluated model of an experiment")
    p.add_argument("experiment")
    p.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    p.add_argument("--plot", metavar="FILE.png", help="also plot quality against sampling time")
    p.add_argument("--grids", metavar="FILE.png",
                   help="also lay every model's samples side by side under its name and scores "
                        "(logged to the pipeline run as comparison.png)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="a swept job's trials ranked, with parameter importance")
    p.add_argument("spec")
    p.add_argument("job")
    p.add_argument("--plot", metavar="FILE.png", help="draw the objective over steps of each trial")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("data", help="staged data sets: stage ahead, list, remove")
    data = p.add_subparsers(dest="action", required=True)
    q = data.add_parser("stage", help="stage every data set of a spec now")
    q.add_argument("spec")
    data.add_parser("ls", help="staged data sets: images, shape, shards, size, read by")
    q = data.add_parser("rm", help="remove a staged data set (refused while a job reads it)")
    q.add_argument("digest", help="its digest, or the start of it, as 'data ls' shows")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("register", help="register a finished job's model in the MLflow Model "
                                         "Registry, as a new version")
    p.add_argument("source", metavar="RUN-OR-CHECKPOINT",
                   help="a training or distillation job's MLflow run id, or a checkpoint URI")
    p.add_argument("name", help="the registered model")
    p.add_argument("--alias", help="point this alias of the model at the new version")
    p.set_defaults(func=cmd_register)
    p = sub.add_parser("sample", help="a PNG grid of a registered model's images, made here")
    p.add_argument("model", metavar="models:/NAME@ALIAS", help="or models:/NAME/VERSION")
    p.add_argument("--n", type=int, default=16, help="images (default 16)")
    p.add_argument("--out", default="grid.png", help="the PNG file (default grid.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--label", type=int, help="the class of every image (class-conditional "
                                             "models; default: the classes in turn)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.set_defaults(func=cmd_sample)

    args = parser.parse_args(argv)
    if args.command == "run" and args.spec is None:
        _spec_from_force(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    except stack.StackError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except SubmitError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except CliExit as exc:
        _err(str(exc))
        return exc.code
    except KeyboardInterrupt as exc:  # before the driver's loop: nothing ran
        return signals.exit_code(exc)


def _spec_from_force(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`genforge run --force spec.yaml` (or `--force a spec.yaml`): `--force` takes any number
    of job names, and the spec came after them; job names never have a '.' or a '/'."""
    for names in reversed(args.force or []):
        for i in range(len(names) - 1, -1, -1):
            if "." in names[i] or "/" in names[i] or Path(names[i]).is_file():
                args.spec = names.pop(i)
                return
    parser.error("run: the following arguments are required: spec")


if __name__ == "__main__":
    sys.exit(main())
