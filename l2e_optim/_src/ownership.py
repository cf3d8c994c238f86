"""Mistakes in who owns what, caught at construction: an optimizer that does not train the
model, and two live wrappers inhibiting the same modules."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Site module -> the live wrappers hooking it. Weak both ways: a dropped model or wrapper leaves
# no entry behind, and this table keeps neither alive.
_HOOKED: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def check_optimizer_trains(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError if none of the optimizer's parameters belongs to ``model``.

    Such a pair gathers statistics and adds the L2E gradient, but never moves the model: almost
    always an optimizer built on another model (or on a copy) by mistake.
    """
    own = {id(p) for p in model.parameters()}
    listed = [p for group in optimizer.param_groups for p in group["params"]]
    if own and not any(id(p) in own for p in listed):
        raise ValueError(
            f"none of the {len(listed)} parameters of the {type(optimizer).__name__} belongs to the "
            f"model ({type(model).__name__}): the model would never train. Build the optimizer on "
            "this model's parameters, e.g. AdamW(model.parameters())."
        )


def claim_sites(owner: Any, modules: Mapping[str, nn.Module]) -> None:
    """Record ``owner`` as hooking ``modules``; warn if another live wrapper hooks one of them."""
    for name, module in modules.items():
        others = _HOOKED.setdefault(module, weakref.WeakSet())
        if any(other is not owner for other in others):
            warnings.warn(
                f"module {name!r} is already hooked by another live L2EWrapper: both would gather "
                "statistics and inhibit it (twice the strength). Call remove_hooks() on the old "
                "wrapper (or drop it) before building a new one on the same model.",
                stacklevel=3,
            )
        others.add(owner)


def release_sites(owner: Any) -> None:
    """Forget ``owner`` (its hooks were removed)."""
    for owners in list(_HOOKED.values()):
        owners.discard(owner)
