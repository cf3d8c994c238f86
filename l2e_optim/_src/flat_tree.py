"""Nested plain state <-> (JSON skeleton, flat dict of tensors), for safetensors files.

A state dict (optimizer, scheduler, model) is a tree of dicts, lists, tuples, scalars and
tensors. :func:`flatten` moves every tensor into a flat ``{key: tensor}`` dict, its key the dotted
path to it (``optimizer.state.0.exp_avg``), and leaves a JSON-able skeleton with a reference in
its place. Tuples and dicts with non-string keys (optimizer state is keyed by ints) are tagged so
that :func:`unflatten` gives back exactly the types that went in: no pickle, no code on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .state_dict import CheckpointError

TENSOR = "__tensor__"
TUPLE = "__tuple__"
ITEMS = "__items__"
_TAGS = (TENSOR, TUPLE, ITEMS)
_SCALARS = (type(None), bool, int, float, str)
#: Deeper skeletons are refused: no state dict nests this deep, and Python's recursion limit
#: would turn a file nested hundreds deep into a RecursionError.
MAX_DEPTH = 32


def flatten(tree: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """The JSON-able skeleton of ``tree``; its tensors go into ``tensors`` under their paths.

    Tensors are copied to contiguous CPU tensors of their own, so tied weights and views never
    share storage in the file (safetensors refuses shared storage).
    """
    if isinstance(tree, Tensor):
        if _is_dtensor(tree):
            raise CheckpointError(
                f"{path}: a sharded DTensor; gather full tensors first (or use "
                "torch.distributed.checkpoint): a checkpoint file holds plain tensors only"
            )
        if path in tensors:
            raise CheckpointError(f"{path}: two entries flatten to the same key")
        host = tree.detach().cpu()  # sync-ok: save time; the file is written from host memory
        tensors[path] = host.clone(memory_format=torch.contiguous_format)
        return {TENSOR: path}
    if isinstance(tree, _SCALARS):
        return tree
    if isinstance(tree, tuple):
        return {TUPLE: [flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(tree)]
    if isinstance(tree, Mapping):
        keys = list(tree)
        if all(isinstance(k, str) for k in keys) and not (len(keys) == 1 and keys[0] in _TAGS):
            return {k: flatten(v, f"{path}.{k}", tensors) for k, v in tree.items()}
        for k in keys:
            if not isinstance(k, _SCALARS):
                raise CheckpointError(f"{path}: a dict key of type {type(k).__name__} cannot be stored")
        return {ITEMS: [[k, flatten(v, f"{path}.{k}", tensors)] for k, v in tree.items()]}
    raise CheckpointError(
        f"{path}: a {type(tree).__name__} cannot be stored (only dicts, lists, tuples, "
        "None, bool, int, float, str and tensors)"
    )


def unflatten(skeleton: Any, tensors: Mapping[str, Tensor], used: set[str], path: str, depth: int = 0) -> Any:
    """Inverse of :func:`flatten`; records every tensor key it takes in ``used``."""
    if isinstance(skeleton, _SCALARS):
        return skeleton
    if depth >= MAX_DEPTH:
        raise CheckpointError(f"{path}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(skeleton, list):
        return [unflatten(v, tensors, used, f"{path}.{i}", depth + 1) for i, v in enumerate(skeleton)]
    if not isinstance(skeleton, dict):
        raise CheckpointError(f"{path}: unexpected JSON value of type {type(skeleton).__name__}")
    if len(skeleton) == 1 and next(iter(skeleton)) in _TAGS:
        (tag, value), = skeleton.items()
        return _untag(tag, value, tensors, used, path, depth)
    return {k: unflatten(v, tensors, used, f"{path}.{k}", depth + 1) for k, v in skeleton.items()}


def _untag(tag: str, value: Any, tensors: Mapping[str, Tensor], used: set[str], path: str, depth: int) -> Any:
    if tag == TENSOR:
        if not isinstance(value, str):
            raise CheckpointError(f"{path}: malformed tensor reference {value!r}")
        if value not in tensors:
            raise CheckpointError(f"{value}: missing (the header refers to it, the file lacks it)")
        if value in used:  # two entries sharing one tensor (exp_avg as exp_avg_sq) would alias
            raise CheckpointError(f"{value}: referred to twice in the header")
        used.add(value)
        return tensors[value]
    if not isinstance(value, list):
        raise CheckpointError(f"{path}: malformed {tag} entry")
    if tag == TUPLE:
        return tuple(unflatten(v, tensors, used, f"{path}.{i}", depth + 1) for i, v in enumerate(value))
    out: dict[Any, Any] = {}
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], _SCALARS)):
            raise CheckpointError(f"{path}: malformed dict item {pair!r}")
        out[pair[0]] = unflatten(pair[1], tensors, used, f"{path}.{pair[0]}", depth + 1)
    return out


def _is_dtensor(tensor: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
