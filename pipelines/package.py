"""A compiled pipeline package: its documents, its parameters, and `--param` values checked against them.

`blueprint submit` and `blueprint schedule` read the package they send, so a parameter that does not exist or a
stage setting that would fail in the pod is refused here, naming the parameter, before any request is made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from blueprint.config import ConfigError
from blueprint.stages import registry


def read_package(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, platform spec) documents of a compiled pipeline YAML."""
    if not path.endswith((".yaml", ".yml")):
        raise ConfigError(f"pipeline package {path}: expected the compiled .yaml (`blueprint compile`)")
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"pipeline package {path} cannot be read: {exc}") from None
    if not docs or "root" not in docs[0]:
        raise ConfigError(f"pipeline package {path} is not a compiled KFP pipeline (no root)")
    return docs[0], (docs[1] if len(docs) > 1 else {})


def pipeline_parameters(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: {"parameterType": ..., "defaultValue": ...}} of the pipeline's own inputs."""
    return dict(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def _typed(name: str, text: str, kind: str) -> Any:
    """`text` read as the KFP parameter type `kind`; a mismatch names the parameter."""
    try:
        if kind == "NUMBER_INTEGER":
            return int(text)
        if kind == "NUMBER_DOUBLE":
            return float(text)
        if kind == "BOOLEAN":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "STRUCT":
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
        if kind == "LIST":
            value = json.loads(text)
            if not isinstance(value, list):
                raise ValueError
            return value
        return text
    except ValueError:
        example = {"STRUCT": '{"steps": 40}', "LIST": "[1, 2]", "BOOLEAN": "true"}.get(kind, "")
        raise ConfigError(
            f"--param {name}: {text!r} is not a {kind.lower()}" + (f" (e.g. {example})" if example else "")
        ) from None


def parse_params(items: list[str] | None, spec: dict[str, Any]) -> dict[str, Any]:
    """`--param k=v` strings -> typed run arguments, checked against the compiled pipeline's parameters.

    A dict parameter (`warmup_settings`) takes JSON merged onto its compiled default, or one key at a time:
    `--param warmup_settings.steps=40`. Passing a partial dict that replaced the default would silently drop
    the profile's other settings, hence the merge.
    """
    params = pipeline_parameters(spec)
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        name, dot, sub = key.partition(".")
        if not sep or not name:
            raise ConfigError(f"--param expects NAME=VALUE or NAME.KEY=VALUE, got {item!r}")
        if name not in params:
            raise ConfigError(f"--param {name}: the pipeline has no such parameter; it has {', '.join(sorted(params))}")
        kind = params[name].get("parameterType", "STRING")
        if dot:
            if kind != "STRUCT":
                raise ConfigError(f"--param {key}: only dict parameters take NAME.KEY=VALUE")
            try:
                value: Any = json.loads(text)
            except ValueError:
                value = text
            out.setdefault(name, dict(params[name].get("defaultValue") or {}))[sub] = value
        elif kind == "STRUCT":
            out.setdefault(name, dict(params[name].get("defaultValue") or {})).update(_typed(name, text, kind))
        else:
            out[name] = _typed(name, text, kind)
    _check_stage_settings(out, spec)
    return out


def _check_stage_settings(arguments: dict[str, Any], spec: dict[str, Any]) -> None:
    """Build every stage config the run will get, so a bad setting fails here, naming its parameter."""
    params, param_of = pipeline_parameters(spec), registry.param_of_stage()
    settings = {stage: dict(arguments[param]) for stage, param in param_of.items() if param in arguments}
    if registry.SHARD in settings:
        settings[registry.SHARD].setdefault(
            "source", arguments.get("source", params.get("source", {}).get("defaultValue"))
        )
    registry.stage_configs(settings, lambda stage: f"--param {param_of[stage]}")


def warmup_cached(spec: dict[str, Any]) -> bool:
    """Whether the compiled pipeline `spec` KFP-caches its warmup task (a warm start would get the first run's)."""
    task = spec["root"].get("dag", {}).get("tasks", {}).get(registry.WARMUP, {})
    return bool(task.get("cachingOptions", {}).get("enableCache"))


def s3_secret_names(platform: dict[str, Any]) -> set[str]:
    """Names of the secrets a compiled pipeline maps into its pods' environment."""
    names = set()
    for cfg in (
        platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {}).values()
    ):
        for entry in cfg.get("secretAsEnv", []):
            names.add(
                entry.get("secretName")
                or entry.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant", "")
            )
    return names - {""}


# ---------------------------------------------------------------------------------------------------- client
