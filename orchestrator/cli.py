"""genforge: up | down | env | validate | run | compare."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from orchestrator import stack
from orchestrator.spec import SpecError, load_spec

EXIT_FAILED, EXIT_INVALID = 1, 2


def _err(message: str) -> None:
    print(f"genforge: {message}", file=sys.stderr)


def cmd_up(args: argparse.Namespace) -> int:
    state = stack.up(num_cpus=args.num_cpus, num_gpus=args.num_gpus, echo=print)
    print(f"stack up in {state.home}; MLflow UI: {state.tracking_uri}  "
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
    print(f"{args.spec}: experiment '{plan.spec.experiment}', {len(plan.jobs)} jobs, "
          f"code {plan.code_version}")
    print(f"  {'#':<3} {'job':<18} {'kind':<9} {'family':<15} {'reads':<20} "
          f"{'gpus':>5} {'cpus':>5}  hash")
    for i, p in enumerate(plan.jobs, 1):
        r = p.job.resources
        reads = ",".join(p.job.sources) or "-"
        print(f"  {i:<3} {p.name:<18} {p.job.kind:<9} {p.job.family or '-':<15} {reads:<20.20} "
              f"{r.gpus:>5g} {r.cpus:>5g}  {p.hash}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # Ctrl-C (SIGINT) cancels the pipeline even where it arrives ignored: a shell starts
    # background jobs of scripts with SIGINT ignored, and Python then keeps it that way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from orchestrator import settings as settings_mod
    from orchestrator.driver import Driver, ServiceError, check_services
    from orchestrator.plan import build_plan

    plan = build_plan(load_spec(args.spec))
    settings = settings_mod.resolve(start_stack=True, echo=lambda m: print(m, file=sys.stderr))
    if settings is None:
        _err("no services configured; set RAY_ADDRESS, MLFLOW_TRACKING_URI and "
             "GENFORGE_STORAGE, or run 'genforge up'")
        return EXIT_INVALID
    try:
        check_services(settings)
    except ServiceError as exc:
        _err(f"{args.spec}: {exc}")
        return EXIT_INVALID
    force: bool | set[str] = False
    if args.force is not None:
        force = True if args.force == [] else set(args.force)
        unknown = sorted(set(force) - set(plan.by_name)) if isinstance(force, set) else []
        if unknown:
            _err(f"{args.spec}: --force: no job named {', '.join(unknown)}")
            return EXIT_INVALID
    driver = Driver(plan, settings, force=force)
    driver.stage_data()
    driver.check_references()
    print(f"MLflow UI: {settings.tracking_uri}  (experiment '{plan.spec.experiment}')",
          file=sys.stderr)
    try:
        return driver.run()
    except ServiceError as exc:
        _err(f"{args.spec}: {exc}")
        return EXIT_FAILED


def cmd_compare(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator import compare
    from orchestrator import settings as settings_mod
    from orchestrator.storage import open_storage

    settings = settings_mod.resolve()
    if settings is None:
        _err("no services configured; set MLFLOW_TRACKING_URI and GENFORGE_STORAGE, or run "
             "'genforge up'")
        return EXIT_INVALID
    client = MlflowClient(settings.tracking_uri)
    try:
        rows, parent = compare.collect(client, open_storage(settings.storage, settings.s3),
                                       args.experiment)
    except compare.CompareError as exc:
        _err(str(exc))
        return EXIT_FAILED
    print(compare.render(rows, args.format))
    if parent:  # the table beside the pipeline that produced it, in MLflow
        client.log_text(parent, compare.render(rows, "markdown"), "comparison.md")
        client.log_text(parent, compare.render(rows, "json"), "comparison.json")
    if args.plot:
        compare.plot(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("spec")
    p.add_argument("--force", nargs="*", metavar="JOB",
                   help="rerun cached jobs (all, or the named ones)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="a table of every evaluated model of an experiment")
    p.add_argument("experiment")
    p.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    p.add_argument("--plot", metavar="FILE.png", help="also plot quality against sampling time")
    p.set_defaults(func=cmd_compare)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    except stack.StackError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
