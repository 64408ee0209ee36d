"""The `blueprint` command: shard, run single stages from cached artifacts, list the cache, run the pipeline.

Errors a user can fix (bad settings, missing inputs, unreachable storage) print one line naming the input and
exit 2; nothing half-written is left behind because every stage commits through the manifest protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from blueprint import __version__
from blueprint.config import ConfigError, describe, load_file, parse, parse_assignments
from blueprint.data.sources import resolve_source
from blueprint.errors import USER_ERRORS, TaskFailed
from blueprint.models.bases import resolve_input
from blueprint.runtime import launch
from blueprint.stages import profiles, registry
from blueprint.store import artifacts, storage


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = load_file(args.config) if getattr(args, "config", None) else {}
    values.update(parse_assignments(getattr(args, "set", None)))
    return values


def _resolved(uri: str | None) -> str | None:
    """A path or URI flag as typed (./art, ~/x, file://, s3://) -> absolute, once, here at the edge."""
    return None if uri is None else storage.normalize(uri)


def _print_output(out: artifacts.StageOutput, stage: str) -> None:
    status = "cache hit" if out.cached else "done"
    print(f"{stage}: {status} -> {out.uri}")
    print(json.dumps(out.metrics, sort_keys=True, default=str))


def cmd_shard(args: argparse.Namespace) -> int:
    from blueprint.stages import shard

    values = _settings(args)
    for flag in ("source", "num_shards", "eval_fraction", "max_pairs", "workers"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if "source" in values:
        values["source"] = resolve_source(str(values["source"]))
    cfg = parse(shard.ShardConfig, values)
    out = shard.run(
        cfg,
        out_uri=_resolved(args.out),
        artifact_root=None if args.out else _resolved(args.artifact_root),
        force=args.force,
        progress=not args.quiet,
    )
    print(shard.summary_line(out))
    print(f"shards: {out.uri}")
    return 0


def _stage_help(args: argparse.Namespace) -> None:
    """`blueprint stage NAME --help [--profile P]`: the flags, then every setting of the stage with its type, default,
    the value profile P gives it and help (read from the stage's config class only when asked, so the command starts
    without importing every stage; after every flag is read, so `--profile` counts wherever it stands)."""
    spec = registry.get(args.name)
    given = profiles.stage_settings(args.profile, spec.name)
    args.parser.epilog = (
        f"settings (--set KEY=VALUE, or --config FILE, over the {args.profile} profile's):\n"
        f"{describe(spec.config_type(), given, args.profile)}"
    )
    args.parser.print_help()
    args.parser.exit()


def cmd_stage(args: argparse.Namespace) -> int:
    if args.help:
        _stage_help(args)
    spec = registry.get(args.name)
    cfg = parse(spec.config_type(), {**profiles.stage_settings(args.profile, spec.name), **_settings(args)})
    inputs = {name: resolve_input(name, str(uri)) for name, uri in parse_assignments(args.input).items()}
    missing = [name for name in spec.inputs if name not in inputs]
    unknown = sorted(set(inputs) - set(spec.inputs) - set(spec.optional_inputs))
    if missing or unknown:
        raise ConfigError(
            f"stage {spec.name} takes inputs {', '.join(spec.inputs) or '(none)'}: "
            f"missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    if args.out is None and args.artifact_root is None:
        raise ConfigError("give --artifact-root (content-addressed output) or --out URI")
    out = launch.run_stage(
        spec.name,
        cfg,
        inputs,
        artifact_root=None if args.out else _resolved(args.artifact_root),
        out_uri=_resolved(args.out),
        force=args.force,
        progress=not args.quiet,
    )
    _print_output(out, spec.name)
    return 0


def _key_metrics(metrics: dict[str, Any], limit: int = 3) -> str:
    picked = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in picked[:limit])


def cmd_ls(args: argparse.Namespace) -> int:
    rows = artifacts.cached_outputs(args.artifact_root)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"nothing committed under {args.artifact_root}")
        return 0
    print(f"{'stage':<10} {'key':<16} {'created':<25} {'size':>10}  metrics")
    for r in rows:
        print(
            f"{r['stage']:<10} {r['key']:<16} {r['created']:<25} {r['bytes'] / 1e6:>8.2f}MB  "
            f"{_key_metrics(r['metrics'])}"
        )
    return 0


def _stage_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """`--set warmup.steps=20` and config-file mappings {stage: {key: value}} -> {stage: {key: value}}."""
    from blueprint.pipelines.local_run import PIPELINE_STAGES

    nested: dict[str, dict[str, Any]] = {}
    if args.config:
        for stage, values in load_file(args.config).items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"config file {args.config}: {stage!r} must map settings, e.g. {stage}: {{steps: 10}}"
                )
            nested.setdefault(stage.replace("_", "-"), {}).update(values)
    for key, value in parse_assignments(args.set).items():
        stage, dot, name = key.partition(".")
        if not dot:
            raise ConfigError(
                f"--set {key}=...: name the stage, e.g. --set warmup.steps=20 (stages: {', '.join(PIPELINE_STAGES)})"
            )
        nested.setdefault(stage.replace("_", "-"), {})[name] = value
    return nested


def cmd_run(args: argparse.Namespace) -> int:
    from blueprint.pipelines import local_run

    plan = local_run.plan(
        profile=args.profile,
        epochs=args.epochs,
        artifact_root=args.artifact_root,
        source=args.source,
        base=args.base,
        coder_base=args.coder_base,
        overrides=_stage_overrides(args),
        force=args.force,
    )
    print(
        f"blueprint run: profile {plan.profile}, {plan.epochs} epoch(s), artifacts in {plan.arguments['artifact_root']}"
    )
    result = local_run.run(plan, runner=args.runner, image=args.image, verbose=args.verbose)
    print(local_run.summary(plan, result), end="")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from blueprint.components import DEFAULT_IMAGE
    from blueprint.pipelines import kubeflow

    args.image = DEFAULT_IMAGE if args.image is None else args.image
    # cluster flags / --cluster-config -> validated ClusterSettings -> the pipeline's configure_task hook
    kubeflow.compile_package(
        args.out,
        epochs=args.epochs,
        profile=args.profile,
        image=args.image,
        artifact_root=args.artifact_root,
        settings=kubeflow.cluster_settings(args),
    )
    print(f"compiled {args.epochs}-epoch pipeline ({args.profile} profile, image {args.image}) -> {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from blueprint.stages.evaluate import compare

    print(compare(args.uris))
    return 0


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--artifact-root",
        default=profiles.ARTIFACT_ROOT,
        help="root of the content-addressed stage cache (file:// path or s3://bucket/prefix)",
    )
    p.add_argument("--out", default=None, help="explicit output URI instead of the content-addressed one")
    p.add_argument("--force", action="store_true", help="recompute even when a committed output exists")
    p.add_argument("--config", default=None, help="YAML/JSON file of settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="one setting (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_run_command(sub) -> None:
    r = sub.add_parser("run", help="run the whole pipeline locally through kfp.local (the embedded default)")
    r.add_argument(
        "--profile",
        default=profiles.DEFAULT_PROFILE,
        help=f"named set of settings over the stages' defaults: {' | '.join(profiles.PROFILE_NAMES)}",
    )
    r.add_argument("--epochs", type=int, default=profiles.EPOCHS, help="PPO rounds")
    r.add_argument("--source", default=None, help="corpus (default: the profile's, stdlib)")
    r.add_argument(
        "--base",
        default=profiles.DEFAULT_BASE,
        help="the summarizer's base (and the coder's): tiny | hub id | local dir | s3:// dir",
    )
    r.add_argument("--coder-base", default="", help="the coder's own base, when it is another model (default: --base)")
    r.add_argument("--artifact-root", default=profiles.ARTIFACT_ROOT)
    r.add_argument("--runner", default="subprocess", choices=["subprocess", "docker"])
    r.add_argument(
        "--image",
        default=None,
        help="component image for --runner docker (default: blueprint:VERSION, what `make image-cpu` builds)",
    )
    r.add_argument("--config", default=None, help="YAML/JSON file: {stage: {setting: value}}")
    r.add_argument("--set", action="append", metavar="STAGE.KEY=VALUE", help="one stage setting (repeatable)")
    r.add_argument("--force", action="store_true", help="recompute every stage")
    r.add_argument(
        "--verbose",
        action="store_true",
        help="show kfp.local's own output (executor input, task outputs) instead of a line per task",
    )
    r.set_defaults(func=cmd_run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blueprint", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"blueprint {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(registry.SHARD, help="extract (code, summary) pairs into Parquet shards")
    s.add_argument("--source", default=None, help="stdlib | dir:PATH | hf:ID[:CONFIG] | jsonl:/parquet:/csv:PATH")
    s.add_argument("--num-shards", type=int, default=None)
    s.add_argument("--eval-fraction", type=float, default=None)
    s.add_argument("--max-pairs", type=int, default=None)
    s.add_argument("--workers", type=int, default=None)
    _add_output_flags(s)
    s.set_defaults(func=cmd_shard)

    st = sub.add_parser("stage", help="run one stage from input URIs (cache hit when its output exists)")
    names = st.add_subparsers(
        dest="name",
        required=True,
        metavar="STAGE",
        help=f"{' | '.join(registry.STAGES)} (blueprint stage STAGE --help: its settings)",
    )
    for spec in registry.STAGES.values():
        one = names.add_parser(
            spec.name,
            add_help=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            help=f"inputs: {', '.join(spec.inputs) or '(none)'}",
        )
        one.add_argument(
            "-h",
            "--help",
            action="store_true",
            help="show this stage's settings (with --profile: the values it gives) and exit",
        )
        one.add_argument(
            "--profile",
            default=profiles.DEFAULT_PROFILE,
            help=f"named set of settings under --config/--set: {' | '.join(profiles.PROFILE_NAMES)}",
        )
        one.add_argument(
            "--input",
            action="append",
            metavar="NAME=URI",
            help=f"an input ({', '.join(spec.inputs) or 'none'}), e.g. shards=s3://b/shard/KEY",
        )
        _add_output_flags(one)
        one.set_defaults(func=cmd_stage, parser=one)

    _add_run_command(sub)

    c = sub.add_parser("compile", help="write the pipeline's KFP IR YAML")
    c.add_argument("--out", default="pipeline.yaml")
    c.add_argument("--epochs", type=int, default=profiles.EPOCHS, help="PPO rounds (unrolled at compile time)")
    c.add_argument("--profile", default=profiles.DEFAULT_PROFILE, help=" | ".join(profiles.PROFILE_NAMES))
    c.add_argument("--image", default=None, help="component image (default: $BLUEPRINT_IMAGE or the release tag)")
    c.add_argument("--artifact-root", default="s3://blueprint/artifacts", help="default of the artifact_root parameter")
    c.set_defaults(func=cmd_compile)

    cmp = sub.add_parser("compare", help="compare the metrics of several evaluate outputs")
    cmp.add_argument("uris", nargs="+")
    cmp.set_defaults(func=cmd_compare)

    # submit, the cluster flags of compile, and the schedule commands
    from blueprint.pipelines import kubeflow, schedules

    kubeflow.add_commands(sub, c)
    schedules.add_commands(sub)
    from blueprint.pipelines import store_commands  # promoted / gc: the artifact root only

    store_commands.add_commands(sub)

    ls = sub.add_parser("ls", help="list committed stage outputs under an artifact root")
    ls.add_argument("artifact_root", nargs="?", default=profiles.ARTIFACT_ROOT)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    return p


CLOSED_PIPE_STATUS = 141  # what a shell reports for a command that SIGPIPE ended (128 + 13)


def main(argv: list[str] | None = None) -> int:
    """The command line; a reader that stops early (`blueprint promoted --json | head -1`) ends it quietly."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not as a traceback at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's own flush at exit
        return CLOSED_PIPE_STATUS


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"blueprint {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TaskFailed as exc:
        print(f"blueprint {args.command}: error: {exc}", file=sys.stderr)
        return 2 if exc.user else 1
    except KeyboardInterrupt:
        print(
            f"blueprint {args.command}: interrupted; committed outputs are intact, partial ones will be redone",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
