"""The command line KFP's launcher would run for one task of the compiled pipeline (tests only)."""

from __future__ import annotations

from pathlib import Path

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2


def launcher_command(
    component: str, arguments: dict, task_root: Path, image: str = "blueprint:test"
) -> tuple[list[str], dict]:
    """The executor's command + args from the compiled YAML, placeholders filled as KFP's launcher would, and
    the compiled container spec (image, env) they belong to."""
    from kfp.local import executor_input_utils, placeholder_utils

    from blueprint.pipelines import compile_pipeline

    path = compile_pipeline(
        str(task_root.parent / "pipeline.yaml"), epochs=1, image=image, artifact_root="file:///unused"
    )
    spec = json_format.ParseDict(next(yaml.safe_load_all(Path(path).read_text())), pipeline_spec_pb2.PipelineSpec())
    comp = spec.components[f"comp-{component}"]
    container = json_format.MessageToDict(spec.deployment_spec)["executors"][comp.executor_label]["container"]
    executor_input = executor_input_utils.construct_executor_input(
        comp, arguments, str(task_root), block_input_artifact=True
    )
    argv = placeholder_utils.replace_placeholders(
        container["command"] + container["args"],
        json_format.MessageToDict(executor_input),
        "blueprint-test",
        component,
        str(task_root.parent / "root"),
        "job-1",
    )
    return argv, container
