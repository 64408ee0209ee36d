"""The BluePrint pipeline DAG and its compile entry point."""
from pipelines.blueprint_pipeline import build_pipeline, compile_pipeline

__all__ = ["build_pipeline", "compile_pipeline"]
