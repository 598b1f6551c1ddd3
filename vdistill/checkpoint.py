"""Nested run state (tensors, optimizer states, RNG states, counters) to one safetensors object, no pickle.

A checkpoint read back from object storage must not be able to run code, so the structure is kept as
JSON in the safetensors metadata and every tensor is stored under its path in that structure.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from vdistill.storage import Storage

_TENSOR = "__tensor__"


def _split(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[path] = node
        return {_TENSOR: path}
    if isinstance(node, dict):
        if not all(isinstance(k, (str, int)) for k in node):
            raise TypeError(f"checkpoint keys must be str or int at {path or '<root>'}")
        keyed = {str(k): _split(v, f"{path}/{k}", tensors) for k, v in node.items()}
        return {"__dict__": keyed, "__intkeys__": [str(k) for k in node if isinstance(k, int)]}
    if isinstance(node, (list, tuple)):
        return {"__list__": [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot checkpoint {type(node).__name__} at {path or '<root>'}")


def _join(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if _TENSOR in node:
            return tensors[node[_TENSOR]]
        if "__list__" in node:
            return [_join(v, tensors) for v in node["__list__"]]
        ints = set(node["__intkeys__"])
        return {(int(k) if k in ints else k): _join(v, tensors) for k, v in node["__dict__"].items()}
    return node


def save_state(storage: Storage, uri: str, state: dict[str, Any]) -> None:
    """Atomically write `state` (nested dicts/lists of tensors and JSON scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(state, "", tensors)
    storage.write_tensors(uri, tensors, {"structure": json.dumps(structure)})


def load_state(storage: Storage, uri: str) -> dict[str, Any] | None:
    """The state written by save_state, or None when there is no checkpoint yet."""
    if not storage.is_file(uri):
        return None
    tensors = storage.read_tensors(uri)
    structure = json.loads(storage.read_tensor_metadata(uri)["structure"])
    return _join(structure, tensors)
