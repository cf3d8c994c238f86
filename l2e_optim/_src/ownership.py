"""Who owns what: the wrapper's arguments checked at construction (an optimizer that does not
train the model among them), its hooks on the model's modules, a warning when two live
wrappers would inhibit the same modules, and one when compiled code would bypass the hooks."""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Iterable, Mapping
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


def warn_if_compiled_without_hooks(model: nn.Module, sites: Iterable[str]) -> None:
    """Warn when ``torch.compile`` already holds code traced without the hooks being attached.

    Dynamo does not guard on module hooks by default
    (``torch._dynamo.config.skip_nnmodule_hook_guards``): code it compiled for a module's class
    before the hooks existed (this model compiled and run before the wrapper was built, another
    model of the same class, or a previous wrapper's hooks) is reused, and L2E silently does
    nothing. Checked once, host-side, at construction: the ``forward`` of the model and of every
    module on the way down to a site (per-block compilation compiles the blocks' class), looked
    up in Dynamo's cache. Nothing to check when Dynamo was never imported (nothing compiled),
    nor when hooks are guarded now (taken as set before the first compile, as documented: code
    compiled while the flag was True keeps matching, which this cannot tell from the cache).
    """
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None or not dynamo.config.skip_nnmodule_hook_guards:
        return
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # a torch without this (private) lookup: nothing to check with
        return
    paths = {""}  # the model, then each site and every module above it
    for name in sites:
        parts = name.split(".")
        paths |= {".".join(parts[:depth]) for depth in range(1, len(parts) + 1)}
    classes = {type(model.get_submodule(path)) for path in paths}
    for cls in sorted(classes, key=lambda c: c.__qualname__):
        function = getattr(cls, "forward", None)
        while function is not None:
            code = getattr(function, "__code__", None)
            if code is not None and _debug_get_cache_entry_list(code):
                warnings.warn(
                    f"torch.compile already holds code for {cls.__qualname__}.forward traced without "
                    "these L2E hooks (the model was compiled and run before the L2EWrapper was built, "
                    f"another {cls.__qualname__} was, or an earlier wrapper hooked it). Dynamo does not "
                    "guard on module hooks by default, so if this model runs compiled, that code is "
                    "reused and L2E silently does nothing. Call torch._dynamo.reset() before the model's "
                    "first compiled call; with several models of a class compiled in one process, set "
                    "torch._dynamo.config.skip_nnmodule_hook_guards = False before the first compile "
                    "(code compiled while it is True keeps matching).",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return
            function = getattr(function, "__wrapped__", None)


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
