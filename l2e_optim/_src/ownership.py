"""Who owns what: the wrapper's arguments checked at construction (an optimizer that does not
train the model among them), its hooks on the model's modules, and a warning when two live
wrappers would inhibit the same modules."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import L2EConfig
from .site import SiteRuntime, SiteState, make_hook

# Site module -> the live wrappers hooking it. Weak both ways: a dropped model or wrapper leaves
# no entry behind, and this table keeps neither alive.
_HOOKED: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def check_arguments(
    optimizer: Any, model: Any, config: L2EConfig | None, explicit_sites: bool, tap: str
) -> L2EConfig:
    """The wrapper's arguments checked before anything is built; returns the config to use."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    config = L2EConfig() if config is None else config
    if not isinstance(config, L2EConfig):
        raise TypeError(f"config must be an L2EConfig, got {type(config).__name__}.")
    if tap not in ("input", "output"):
        raise ValueError(f"tap={tap!r} must be 'input' or 'output'.")
    if tap == "output" and not explicit_sites:
        raise ValueError("tap='output' needs explicit sites (e.g. the MLP up projections).")
    check_optimizer_trains(model, optimizer)
    return config


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


def attach_hooks(
    owner: Any, modules: Mapping[str, nn.Module], sites: Mapping[str, SiteState], runtime: SiteRuntime, tap: str
) -> list[RemovableHandle]:
    """Hook each site's module for ``owner`` (forward pre-hook for ``tap="input"``)."""
    handles: list[RemovableHandle] = []
    for name, site in sites.items():
        module = modules[name]
        hook = make_hook(module, site, runtime, tap)
        if tap == "input":
            handles.append(module.register_forward_pre_hook(hook))
        else:
            handles.append(module.register_forward_hook(hook))
    claim_sites(owner, {name: modules[name] for name in sites})
    # A dropped wrapper leaves nothing on the model: the hooks hold it weakly and its
    # finalizer removes them (the finalizer holds the handles, never the wrapper).
    weakref.finalize(owner, remove_handles, handles)
    return handles


def detach_hooks(owner: Any, handles: list[RemovableHandle]) -> None:
    """Remove ``owner``'s hooks from the model (idempotent)."""
    remove_handles(handles)
    release_sites(owner)


def release_sites(owner: Any) -> None:
    """Forget ``owner`` (its hooks were removed)."""
    for owners in list(_HOOKED.values()):
        owners.discard(owner)


def remove_handles(handles: list[RemovableHandle]) -> None:
    """Remove the hooks (also the wrapper's finalizer, which must not hold the wrapper)."""
    for handle in handles:
        handle.remove()
    handles.clear()
