"""Recurring retraining by name: `blueprint schedule` creates or replaces, `blueprint schedules` lists,
`blueprint unschedule` deletes.

Why a module of its own: KFP's API has no update or upsert of a recurring run, and creating one again under the
same name makes a second schedule that trains twice on every tick. Replacing is list by name -> create -> list
again and delete all but the newest: the order, what concurrent callers converge to, and what the user is told
when it stops half-way are what this module is about (`create_replacing`, `converge`).

What a schedule runs is what the user chose: a pipeline version already on the server (`--pipeline-id` with
`--pipeline-version-id`), a new version of a named pipeline (`--pipeline NAME`: the package is uploaded, the
pipeline created when missing), or, without either, the package itself, inline in the recurring run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import json
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from blueprint.config import ConfigError
from blueprint.errors import UserError
from blueprint.pipelines import kubeflow
from blueprint.pipelines.cron import kfp_cron
from blueprint.pipelines.kubeflow import KubeflowError, talking_to
from blueprint.pipelines.package import pipeline_parameters, read_package, warmup_cached

PAGE_SIZE = 100


class ScheduleNotFound(UserError, LookupError):
    """No recurring run, or no experiment, by the name or id the user gave."""


class ReplaceIncomplete(KubeflowError):
    """The new recurring run exists, but an old one of the same name could not be deleted: both are scheduled."""


class Target(NamedTuple):
    """The connected client, the checked run arguments, and what the recurring run starts: `package` sent inline,
    or the pinned (`pipeline_id`, `version_id`)."""

    client: Any
    arguments: dict[str, Any]
    package: str | None
    pipeline_id: str | None = None
    version_id: str | None = None

    def describe(self) -> str:
        return (
            f"pipeline version {self.version_id} (pipeline {self.pipeline_id})"
            if self.version_id
            else "the package inline"
        )


# ------------------------------------------------------------------------------------------------- look-ups


def _name_filter(name: str) -> str:
    """A KFP filter (filter.proto as JSON) on display_name, the v2beta1 key of a recurring run's and pipeline's name."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def recurring_runs(
    client, *, experiment_id: str | None = None, namespace: str | None = None, name: str | None = None
) -> list:
    """Every recurring run of the experiment (else of the namespace, else all), oldest first, every page read;
    with `name`, only those of that display name."""
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(
            page_token=token,
            page_size=PAGE_SIZE,
            sort_by="created_at",
            experiment_id=experiment_id,
            namespace=namespace,
            filter=_name_filter(name) if name else None,
        )
        found += page.recurring_runs or []
        token = page.next_page_token
        if not token:
            break
    # the server filters; checking the name here too means a server that ignored the filter never gets an
    # unrelated schedule deleted
    return [run for run in found if name is None or run.display_name == name]


def existing_experiment_id(client, host: str, name: str, namespace: str | None) -> str:
    """The id of experiment `name`, never creating it (listing and deleting must not leave one behind)."""
    try:
        return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
    except ValueError as exc:
        if "No experiment is found" not in str(exc):
            raise
        raise ScheduleNotFound(f"no experiment {name!r} on {host}, so no recurring run in it") from None


def trigger_of(run) -> str:
    """When it runs, as the API says it (v2beta1 gives the trigger, not the next run time)."""
    trigger = run.trigger
    if trigger and trigger.cron_schedule and trigger.cron_schedule.cron:
        return f"cron {trigger.cron_schedule.cron}"
    if trigger and trigger.periodic_schedule and trigger.periodic_schedule.interval_second:
        return f"every {trigger.periodic_schedule.interval_second}s"
    return "no trigger"


def state_of(run) -> str:
    """enabled | paused, from the status (else the requested mode)."""
    state = {"ENABLED": "enabled", "DISABLED": "paused", "ENABLE": "enabled", "DISABLE": "paused"}
    return state.get(str(run.status or ""), state.get(str(run.mode or ""), "unknown"))


def version_of(run) -> str:
    """The pinned pipeline version's id, or "inline" when the recurring run carries its own spec."""
    reference = run.pipeline_version_reference
    if reference and reference.pipeline_version_id:
        return reference.pipeline_version_id
    return run.pipeline_version_id or "inline"


# --------------------------------------------------------------------------------------- what gets scheduled


def _check_pipeline_flags(args: argparse.Namespace) -> None:
    """--pipeline-id and --pipeline-version-id go together, and a pinned version takes no package to send."""
    if bool(args.pipeline_id) != bool(args.pipeline_version_id):
        raise ConfigError("--pipeline-id and --pipeline-version-id go together: KFP pins a version by both")
    if args.pipeline_version_id:
        given = (
            kubeflow.compile_flags_given(args)
            + (["--package"] if args.package else [])
            + (["--pipeline"] if args.pipeline else [])
        )
        if given:
            raise ConfigError(
                f"--pipeline-version-id pins a version already on the server; {', '.join(given)} "
                "would be ignored: drop them, or drop --pipeline-id/--pipeline-version-id"
            )
    if args.pipeline is not None and not args.pipeline.strip():
        raise ConfigError("--pipeline: give the pipeline's name")


def _warm_start(args: argparse.Namespace, spec: dict[str, Any], source: str) -> dict[str, Any]:
    """{"warm_start": True} for `--warm-start`, once the pipeline takes it with its warmup task uncached."""
    if not args.warm_start:
        return {}
    if "warm_start" not in pipeline_parameters(spec):
        raise ConfigError(
            "--warm-start: this pipeline has no warm_start parameter (wire "
            "blueprint.runtime.warm_start.warmup_task into the warmup component)"
        )
    if warmup_cached(spec):
        raise ConfigError(
            f"--warm-start: {source} KFP-caches its warmup task, so every run would get the first "
            "run's warmup back; let schedule compile it (drop the pinned version)"
        )
    return {"warm_start": True}


def _version_documents(client, pipeline_id: str, version_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, platform spec) of a version on the server; KFP stores both as {pipeline_spec,
    platform_spec} when the package has a platform spec, else the pipeline spec alone."""
    stored = client.get_pipeline_version(pipeline_id=pipeline_id, pipeline_version_id=version_id).pipeline_spec or {}
    if "pipeline_spec" in stored:
        stored, platform = stored["pipeline_spec"], stored.get("platform_spec") or {}
    else:
        platform = {}
    if "root" not in stored:
        raise ConfigError(f"pipeline version {version_id} holds no compiled pipeline to check --param against")
    return stored, platform


def _upload_version(client, args: argparse.Namespace, package: str) -> tuple[str, str]:
    """Upload `package` as a new version of the pipeline named --pipeline (created when missing, the package its
    first version); (pipeline id, version id)."""
    found = client.list_pipelines(filter=_name_filter(args.pipeline), namespace=args.namespace, page_size=2)
    pipelines = [p for p in found.pipelines or [] if p.display_name == args.pipeline]
    if len(pipelines) > 1:
        raise ConfigError(
            f"--pipeline {args.pipeline!r}: several pipelines have that name; pin one with "
            "--pipeline-id and --pipeline-version-id"
        )
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]
    described = f"uploaded by `blueprint schedule --name {args.name}`, package sha256 {digest}"
    if not pipelines:
        pipeline = client.upload_pipeline(
            package, pipeline_name=args.pipeline, description=described, namespace=args.namespace
        )
        versions = client.list_pipeline_versions(
            pipeline.pipeline_id, page_size=1, sort_by="created_at desc"
        ).pipeline_versions
        if not versions:
            raise KubeflowError(f"pipeline {args.pipeline!r} ({pipeline.pipeline_id}) was created without a version")
        version = versions[0]
    else:  # version names are unique within a pipeline: the time and the content make this one's
        name = f"{args.name} {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} {digest}"
        version = client.upload_pipeline_version(
            package, name, pipeline_id=pipelines[0].pipeline_id, description=described
        )
    return version.pipeline_id, version.pipeline_version_id


@contextlib.contextmanager
def _target(args: argparse.Namespace, host: str) -> Iterator[Target]:
    """What to schedule, every check that needs no server done before the first request."""
    if args.pipeline_version_id:  # its spec is on the server: read it to check --param and --warm-start
        client = kubeflow.connect(host, args.namespace)
        with talking_to(host):
            spec, platform = _version_documents(client, args.pipeline_id, args.pipeline_version_id)
        extra = _warm_start(args, spec, f"pipeline version {args.pipeline_version_id}")
        arguments = kubeflow.run_arguments(args, spec, platform, extra, compiled_elsewhere=True)
        yield Target(client, arguments, None, args.pipeline_id, args.pipeline_version_id)
        return
    with kubeflow.pipeline_package(args, warm_start=args.warm_start) as package:
        spec, platform = read_package(package)
        extra = _warm_start(args, spec, f"package {package}")
        arguments = kubeflow.run_arguments(args, spec, platform, extra, compiled_elsewhere=bool(args.package))
        client = kubeflow.connect(host, args.namespace)
        if not args.pipeline:
            yield Target(client, arguments, package)
            return
        with talking_to(host):
            pipeline_id, version_id = _upload_version(client, args, package)
        yield Target(client, arguments, None, pipeline_id, version_id)


# ---------------------------------------------------------------------------------------------- the replace


def _listing(runs: list) -> str:
    return ", ".join(f"{run.recurring_run_id} ({run.display_name!r})" for run in runs)


def create_replacing(host: str, old: list, create: Callable[[], Any], uploaded: str | None = None) -> Any:
    """Create the new recurring run while `old` (those of its name) stay scheduled; `converge` then deletes them.

    Create first, delete second: a create that fails (a refused request, a bad pipeline version, a lost connection)
    then changes nothing, and the error says so, where deleting first would leave no schedule at all, noticed only
    when the model stops improving. The price is a moment with two schedules (one extra run if both fire in it).
    `uploaded`: the pipeline version uploaded for the new one, if any (it stays when the create fails).
    """
    try:
        with talking_to(host):
            return create()
    except KubeflowError as exc:
        if not old:
            raise
        kept = f"recurring run {_listing(old)} is" if len(old) == 1 else f"recurring runs {_listing(old)} are"
        extra = f" (pipeline version {uploaded}, uploaded for it, stays unused)" if uploaded else ""
        raise KubeflowError(
            f"creating the new recurring run failed, so nothing was changed: {kept} still "
            f"scheduled as before{extra}. The cause: {exc}"
        ) from None


def newest(runs: list):
    """The run every caller keeps: the latest created, ties broken by id, so concurrent callers pick the same one."""

    def created(run) -> dt.datetime:  # a time without a zone is UTC, as the API means it
        when = run.created_at or dt.datetime.min
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)

    return max(runs, key=lambda run: (created(run), run.recurring_run_id))


def converge(
    host: str, list_named: Callable[[], list], delete: Callable[[str], Any]
) -> tuple[Any, list, list[tuple[str, str]]]:
    """Leave one recurring run of the name: (kept, deleted, [(id, why) a delete failed for]).

    Listed again after the create, as other `schedule` calls may have created theirs meanwhile: each caller keeps
    the newest and deletes the rest, so all converge to one. One already gone (another caller's delete) is deleted.
    """
    import kfp_server_api

    with talking_to(host):
        keep = newest(runs := list_named())
    deleted, failed = [], []
    for run in (r for r in runs if r.recurring_run_id != keep.recurring_run_id):
        try:
            with talking_to(host):
                try:
                    delete(run.recurring_run_id)
                except kfp_server_api.ApiException as exc:
                    if exc.status != 404:
                        raise
            deleted.append(run)
        except KubeflowError as exc:
            failed.append((run.recurring_run_id, str(exc)))
    return keep, deleted, failed


def _unschedule_command(run_id: str, host: str, namespace: str | None) -> str:
    return shlex.join(
        ["blueprint", "unschedule", "--id", run_id, "--host", host] + (["--namespace", namespace] if namespace else [])
    )


def cmd_schedule(args: argparse.Namespace) -> int:
    cron = kfp_cron(args.cron)  # before anything else: a bad expression never reaches the server
    if not 1 <= args.max_concurrency <= 10:
        raise ConfigError(f"--max-concurrency {args.max_concurrency}: KFP accepts 1 to 10")
    _check_pipeline_flags(args)
    host = kubeflow.host_of(args)
    with _target(args, host) as target:
        client, account = target.client, kubeflow.service_account(args)
        with talking_to(host):
            experiment = client.create_experiment(name=args.experiment, namespace=args.namespace)
            old = recurring_runs(client, experiment_id=experiment.experiment_id, name=args.name)
        create = functools.partial(
            client.create_recurring_run,
            experiment_id=experiment.experiment_id,
            job_name=args.name,
            description=f"BluePrint retraining, cron {cron!r}" + (", warm start" if args.warm_start else ""),
            cron_expression=cron,
            max_concurrency=args.max_concurrency,
            no_catchup=args.no_catchup,
            params=target.arguments,
            pipeline_package_path=target.package,
            pipeline_id=target.pipeline_id,
            version_id=target.version_id,
            enabled=not args.paused,
            service_account=account,
        )
        job = create_replacing(host, old, create, uploaded=target.version_id if args.pipeline else None)
        named = functools.partial(recurring_runs, client, experiment_id=experiment.experiment_id, name=args.name)
        keep, deleted, failed = converge(host, named, client.delete_recurring_run)
        with talking_to(host):
            remaining = [run.recurring_run_id for run in named()]
    replaced = [run for run in deleted if run.recurring_run_id != job.recurring_run_id]
    print(
        f"scheduled recurring run {job.recurring_run_id} ({args.name!r}, {'paused' if args.paused else 'enabled'}) "
        f"on {host}: cron {cron!r}, "
        f"max concurrency {args.max_concurrency}, catchup {'off' if args.no_catchup else 'on'}"
        + (", warm start" if args.warm_start else "")
        + f", runs {target.describe()}"
        + (f"; replaced {_listing(replaced)}" if replaced else "")
    )
    if keep.recurring_run_id != job.recurring_run_id:
        print(f"recurring run {keep.recurring_run_id}, made by a concurrent schedule call, is newer and replaces it")
    print(f"recurring runs named {args.name!r} now: {', '.join(remaining) or 'none'}")
    stale = [(run_id, why) for run_id, why in failed if run_id in remaining]  # another caller may have got it
    if stale:
        raise ReplaceIncomplete(
            "; ".join(
                f"recurring run {keep.recurring_run_id} replaces {run_id} ({args.name!r}), "
                f"but deleting {run_id} failed, so both are scheduled now: remove the stale one with "
                f"`{_unschedule_command(run_id, host, args.namespace)}` (the cause: {why})"
                for run_id, why in stale
            )
        )
    return 0


# ---------------------------------------------------------------------------------------- list and delete


def cmd_schedules(args: argparse.Namespace) -> int:
    host = kubeflow.host_of(args)
    client = kubeflow.connect(host, args.namespace)
    with talking_to(host):
        experiment_id = (
            existing_experiment_id(client, host, args.experiment, args.namespace) if args.experiment else None
        )
        runs = recurring_runs(client, experiment_id=experiment_id, namespace=args.namespace)
    where = f"experiment {args.experiment!r}" if args.experiment else "any experiment"
    if not runs:
        print(f"no recurring runs in {where} on {host}")
        return 0
    rows = [("name", "id", "schedule (UTC)", "state", "pipeline version", "experiment")]
    rows += [
        (
            run.display_name or "",
            run.recurring_run_id,
            trigger_of(run),
            state_of(run),
            version_of(run),
            run.experiment_id or "",
        )
        for run in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _by_id(client, host: str, run_id: str):
    import kfp_server_api

    try:
        return client.get_recurring_run(run_id)
    except kfp_server_api.ApiException as exc:
        if exc.status != 404:
            raise
        raise ScheduleNotFound(
            f"no recurring run with id {run_id!r} on {host} (`blueprint schedules --host {host}` lists them)"
        ) from None


def cmd_unschedule(args: argparse.Namespace) -> int:
    if args.id and args.experiment:
        raise ConfigError("--experiment scopes --name; --id already names one recurring run: drop --experiment")
    host = kubeflow.host_of(args)
    client = kubeflow.connect(host, args.namespace)
    with talking_to(host):
        if args.id:
            runs = [_by_id(client, host, args.id)]
        else:
            experiment = args.experiment or kubeflow.DEFAULT_EXPERIMENT
            runs = recurring_runs(
                client, name=args.name, experiment_id=existing_experiment_id(client, host, experiment, args.namespace)
            )
            if not runs:
                raise ScheduleNotFound(
                    f"no recurring run named {args.name!r} in experiment {experiment!r} on "
                    f"{host} (`blueprint schedules --host {host}` lists them)"
                )
        for run in runs:
            client.delete_recurring_run(run.recurring_run_id)
            print(f"deleted recurring run {run.recurring_run_id} ({run.display_name!r}) on {host}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `schedule`, `schedules` and `unschedule` on the CLI."""
    r = sub.add_parser(
        "schedule",
        help="create a recurring (cron) retraining run on Kubeflow Pipelines, or replace "
        "the one(s) of the same --name in the experiment",
    )
    kubeflow.add_run_flags(r)
    r.add_argument(
        "--cron",
        required=True,
        help='"MIN HOUR DOM MON DOW" (seconds 0 added) or 6 fields, e.g. "0 3 * * 1" = Mondays 03:00',
    )
    r.add_argument(
        "--name", default="blueprint-retrain", help="recurring run name; one of this name in the experiment is replaced"
    )
    r.add_argument("--max-concurrency", type=int, default=1, help="runs allowed at once (1-10)")
    r.add_argument("--no-catchup", action="store_true", help="after a pause, run once instead of backfilling")
    r.add_argument("--paused", action="store_true", help="create the schedule disabled")
    r.add_argument(
        "--warm-start", action="store_true", help="continue from the promoted model's adapters under the artifact root"
    )
    g = r.add_argument_group("what the schedule runs (default: the package, inline in the recurring run)")
    g.add_argument(
        "--pipeline",
        default=None,
        metavar="NAME",
        help="upload the package as a new version of this pipeline (created when missing), pin it",
    )
    g.add_argument("--pipeline-id", default=None, metavar="ID", help="with --pipeline-version-id: pin this version")
    g.add_argument("--pipeline-version-id", default=None, metavar="ID", help="a pipeline version on the server")
    r.set_defaults(func=cmd_schedule)

    ls = sub.add_parser("schedules", help="list recurring runs: name, id, cron, enabled/paused, pipeline version")
    kubeflow.add_host_flags(ls)
    ls.add_argument("--experiment", default=None, help="only this experiment's (default: every experiment)")
    ls.set_defaults(func=cmd_schedules)

    un = sub.add_parser("unschedule", help="delete the recurring run(s) of a name (or one by --id)")
    kubeflow.add_host_flags(un)
    which = un.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", default=None, help="delete every recurring run of this name in the experiment")
    which.add_argument("--id", default=None, help="delete this one recurring run")
    un.add_argument(
        "--experiment", default=None, help=f"with --name (default {kubeflow.DEFAULT_EXPERIMENT!r}, as schedule's)"
    )
    un.set_defaults(func=cmd_unschedule)
