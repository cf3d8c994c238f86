"""Stepping the wrapped optimizer as part of the wrapper's own step.

``torch.optim.Optimizer`` wraps every subclass's ``step`` (``Optimizer.profile_hook_step``) so
that it runs the *global* step hooks (``register_optimizer_step_pre_hook`` / ``_post_hook``),
then the instance's own hooks. The wrapper's ``step`` is wrapped like that too, so calling the
base's hooked ``step`` from inside it would fire every global hook twice per step, the second
time with the base as argument: profilers and loggers would count two steps. This module steps
the base as its hooked ``step`` does, minus the global hooks.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


def init_hook_dicts(optimizer: torch.optim.Optimizer) -> None:
    """Give ``optimizer`` the hook tables ``Optimizer.__init__`` sets up (a wrapper, whose param
    groups are its base's, skips that ``__init__``; a copy gets fresh, empty tables)."""
    optimizer._optimizer_step_pre_hooks = OrderedDict()
    optimizer._optimizer_step_post_hooks = OrderedDict()
    optimizer._optimizer_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_state_dict_post_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_post_hooks = OrderedDict()


def requires_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` cannot run without a closure (LBFGS: it re-evaluates the loss)."""
    step = _unhooked(type(optimizer).step)
    try:
        parameter = inspect.signature(step).parameters.get("closure")
    except (TypeError, ValueError):  # a builtin or an odd callable: assume the common case
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def step_without_global_hooks(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> Any:
    """``optimizer.step(closure)`` with the optimizer's own step hooks but not the global ones."""
    instance_step = optimizer.__dict__.get("step")
    if instance_step is not None and not getattr(instance_step, "_wrapped_by_lr_sched", False):
        # Someone replaced this instance's step (accelerate, a user patch): theirs is the step.
        return instance_step() if closure is None else instance_step(closure)
    if instance_step is not None:
        # An LR scheduler attached to the base itself: its patched step only records the call.
        optimizer._opt_called = True  # type: ignore[attr-defined]
    args: tuple[Any, ...] = (optimizer,) if closure is None else (optimizer, closure)
    kwargs: dict[str, Any] = {}
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(optimizer).__name__}.step"):
        for pre_hook in list(optimizer._optimizer_step_pre_hooks.values()):
            result = pre_hook(optimizer, args, kwargs)
            if result is not None:
                args, kwargs = result
        out = _unhooked(type(optimizer).step)(*args, **kwargs)
        optimizer._optimizer_step_code()
        for post_hook in list(optimizer._optimizer_step_post_hooks.values()):
            post_hook(optimizer, args, kwargs)
    return out


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    # profile_hook_step marks its wrapper `hooked` and keeps the original in __wrapped__
    # (functools.wraps); unwrap that one layer only, never the optimizer's own decorators.
    if getattr(step, "hooked", False):
        return getattr(step, "__wrapped__", step)
    return step
