"""One module per pipeline stage. Each exposes a validated config (a pydantic
`blueprint.config.Settings`) and
`run(config, *inputs, artifact_root=|out_uri=, force=, progress=) -> artifacts.StageOutput`, so the CLI, the
Kubeflow components and the Python API all call the same function (see `registry` for the list)."""
