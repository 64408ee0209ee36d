"""BluePrint: round-trip PPO for a code summarizer and a code generator, LoRA adapters on one base model."""

from blueprint.version import __version__

__all__ = ["__version__", "BluePrint"]


def __getattr__(name: str):
    # The Python API pulls in torch/transformers; import it only when asked for.
    if name == "BluePrint":
        from blueprint.api import BluePrint

        return BluePrint
    raise AttributeError(name)
