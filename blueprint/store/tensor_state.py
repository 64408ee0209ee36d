"""Nested training state (optimizer, RNG, counters) as safetensors plus JSON: saved and loaded without pickle.

`torch.load` of a pickle runs whatever code the file names, so a state file in a shared bucket would let anyone
who can write to the bucket run code in the pod. Here the tensors go to a safetensors file (a JSON header and raw
bytes, nothing executable) and the structure around them to JSON; loading reads data only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blueprint.errors import UserError

TENSOR = "__tensor__"
ITEMS = "__items__"  # a dict whose keys are not all strings (optimizer state is keyed by parameter index)
TUPLE = "__tuple__"


class StateFileError(UserError, ValueError):
    """A state file is not a valid safetensors + JSON pair (damaged, or planted by someone else)."""


def split_tensors(obj: Any, tensors: dict[str, Any], path: str = "s") -> Any:
    """`obj` with every tensor replaced by a reference into `tensors` (filled in place); JSON-able."""
    import torch

    if isinstance(obj, torch.Tensor):
        name = f"{len(tensors)}:{path}"  # numbered: {"a.b": t} and {"a": {"b": t}} never share a name
        tensors[name] = obj.detach().cpu().contiguous()
        return {TENSOR: name}
    if isinstance(obj, dict):  # keys in sorted order: the same state gives the same bytes, however it was built
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, kv[0]))
        if all(isinstance(k, str) for k in obj):
            return {k: split_tensors(v, tensors, f"{path}.{k}") for k, v in items}
        return {ITEMS: [[k, split_tensors(v, tensors, f"{path}.{k}")] for k, v in items]}
    if isinstance(obj, tuple):
        return {TUPLE: [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} without pickle")


def join_tensors(obj: Any, tensors: dict[str, Any]) -> Any:
    """Inverse of `split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR}:
            return tensors[obj[TENSOR]]
        if set(obj) == {ITEMS}:
            return {k: join_tensors(v, tensors) for k, v in obj[ITEMS]}
        if set(obj) == {TUPLE}:
            return tuple(join_tensors(v, tensors) for v in obj[TUPLE])
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save_state(state: dict[str, Any], directory: Path, name: str) -> None:
    """Write `name.safetensors` and `name.json` under `directory`."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    structure = split_tensors(state, tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure, sort_keys=True))


def load_state(directory: Path, name: str) -> dict[str, Any]:
    """Read what `save_state` wrote; anything else (a pickle in its place, a damaged file) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_path, json_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    try:
        tensors = load_file(str(tensor_path))
        structure = json.loads(json_path.read_text())
    except (SafetensorError, OSError, ValueError) as exc:  # a pickle is not a safetensors header: refused unread
        raise StateFileError(f"{tensor_path.name}/{json_path.name} are not a valid training state: {exc}") from None
    try:
        return join_tensors(structure, tensors)
    except KeyError as exc:
        raise StateFileError(f"{json_path.name} refers to tensor {exc} that {tensor_path.name} does not hold") from None
    except (TypeError, ValueError) as exc:  # a JSON that is not what save_state writes
        raise StateFileError(f"{json_path.name} is not a training state written by BluePrint: {exc}") from None
