"""The delivery layer: the DAG and its compile entry point, and what runs it (kfp.local here, Kubeflow there),
the cluster settings, cron and the command line. It imports `components` and `blueprint`, never the reverse."""

from blueprint.pipelines.blueprint_pipeline import build_pipeline, compile_pipeline

__all__ = ["build_pipeline", "compile_pipeline"]
