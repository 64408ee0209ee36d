"""KFP v2 components, one per stage: thin wrappers over `blueprint.runtime.task.run_stage_task`."""

from blueprint.components.stages import DEFAULT_IMAGE, build_components

__all__ = ["DEFAULT_IMAGE", "build_components"]
