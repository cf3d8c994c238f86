"""The ``"l2e"`` entry of the wrapper's state dict: packing, validation, loading.

Plain types and tensors only, so ``torch.load(..., weights_only=True)`` reads it. Validation
runs to completion before anything is written, so a bad entry leaves the wrapper untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, L2EConfig
from .site import SiteState

L2E_KEY = "l2e"
FORMAT_VERSION = 1

#: Per-site tensors that are checkpointed, with their dtype and whether they must be >= 0.
SITE_TENSORS: dict[str, tuple[torch.dtype, bool]] = {
    "mean": (torch.float32, False),
    "var": (torch.float32, True),
    "threshold": (torch.float32, True),
    "count": (torch.int64, True),
    "selected_fraction": (torch.float32, True),
    "nonfinite": (torch.int64, True),
}


class CheckpointError(ValueError):
    """A checkpoint or state dict cannot be saved or loaded; the message names the file and the key."""


def pack_l2e_state(config: L2EConfig, step: Tensor, sites: Mapping[str, SiteState]) -> dict[str, Any]:
    """The L2E state as nested plain dicts of cloned tensors."""
    return {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "step": step.detach().clone(),
        "sites": {name: {k: v.detach().clone() for k, v in site.tensors().items()} for name, site in sites.items()},
    }


def validate_l2e_state(entry: Any, config: L2EConfig, sites: Mapping[str, SiteState]) -> None:
    """Raise CheckpointError on the first problem; warn if the saved config differs."""
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{L2E_KEY}: expected a dict, got {type(entry).__name__}")
    version = entry.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{L2E_KEY}.format_version: {version!r} is not the supported version {FORMAT_VERSION}"
        )
    _check_tensor(f"{L2E_KEY}.step", entry.get("step"), (), torch.int64, nonnegative=True)
    saved_config = entry.get("config")
    try:
        saved = L2EConfig.from_dict(saved_config) if isinstance(saved_config, Mapping) else None
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{L2E_KEY}.config: {error}") from error
    if saved is None:
        raise CheckpointError(f"{L2E_KEY}.config: expected a dict of L2EConfig fields")
    saved_sites = entry.get("sites")
    if not isinstance(saved_sites, Mapping):
        raise CheckpointError(f"{L2E_KEY}.sites: expected a dict of sites")
    missing = sorted(set(sites) - set(saved_sites))
    unexpected = sorted(set(saved_sites) - set(sites))
    if missing or unexpected:
        raise CheckpointError(
            f"{L2E_KEY}.sites: the checkpoint's sites do not match this model's "
            f"(missing {missing}, unexpected {unexpected}); was it saved from another model?"
        )
    for name, site in sites.items():
        validate_site(f"{L2E_KEY}.sites.{name}", saved_sites[name], site.neurons)
    if saved != config:
        warnings.warn(
            f"the checkpoint's L2EConfig differs from this wrapper's ({_config_diff(saved, config)}); "
            "the wrapper keeps its own config and loads the saved statistics.",
            stacklevel=3,
        )


def validate_site(prefix: str, saved: Any, neurons: int) -> None:
    """Check one site's saved tensors: keys, shapes, dtypes, finiteness, signs."""
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{prefix}: expected a dict of tensors")
    extra = sorted(set(saved) - set(SITE_TENSORS))
    if extra:
        raise CheckpointError(f"{prefix}.{extra[0]}: unexpected key")
    for key, (dtype, nonnegative) in SITE_TENSORS.items():
        shape = (neurons,) if key in ("mean", "var") else ()
        _check_tensor(f"{prefix}.{key}", saved.get(key), shape, dtype, nonnegative)


def validate_base_state(state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer, prefix: str = "") -> None:
    """Check a base optimizer state dict against ``optimizer`` before it is loaded.

    ``Optimizer.load_state_dict`` checks group sizes only and accepts state of any shape (the
    next ``step()`` fails, or worse, broadcasts); this checks the groups and, for each state
    entry of a saved parameter, its tensors' finiteness and shape. Entries not keyed by a
    parameter pass through unchecked, as torch keeps them.
    """
    groups = state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise CheckpointError(f"{prefix}param_groups: missing or not a list of dicts")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{prefix}state: missing or not a dict")
    live = optimizer.param_groups
    if len(groups) != len(live):
        raise CheckpointError(f"{prefix}param_groups: {len(groups)} groups saved, the optimizer has {len(live)}")
    params: dict[Any, Tensor] = {}
    for index, (saved, group) in enumerate(zip(groups, live)):
        ids = saved.get("params")
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            count = len(ids) if isinstance(ids, list) else ids
            raise CheckpointError(
                f"{prefix}param_groups.{index}.params: {count} parameters saved, the optimizer's "
                f"group has {len(group['params'])}; was it saved from another model?"
            )
        params.update(zip(ids, group["params"]))
    elementwise = isinstance(optimizer, _ELEMENTWISE)
    for pid, entry in state.items():
        if pid not in params:
            # Optimizer.load_state_dict keeps state not keyed by a parameter as it is (state-dict
            # hooks and subclasses keep their own entries there): so does the wrapper.
            continue
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{prefix}state.{pid}: expected a dict, got {type(entry).__name__}")
        live_state = optimizer.state.get(params[pid])
        _check_param_state(f"{prefix}state.{pid}", entry, params[pid], live_state, elementwise)


# torch.optim classes whose per-parameter state tensors are all 0-dim or shaped like the parameter.
_ELEMENTWISE = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")
)


def _check_param_state(prefix: str, entry: Mapping[str, Any], param: Tensor, live: Any, elementwise: bool) -> None:
    for key, value in entry.items():
        if not isinstance(value, Tensor):
            continue
        name = f"{prefix}.{key}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{name}: contains NaN or inf")
        # The live state, where the optimizer has stepped, is the best witness of the shape.
        known = live.get(key) if isinstance(live, Mapping) else None
        if isinstance(known, Tensor):
            expected: tuple[int, ...] | None = tuple(known.shape)
        else:
            expected = tuple(param.shape) if elementwise and value.dim() > 0 else None
        if expected is not None and tuple(value.shape) != expected:
            raise CheckpointError(f"{name}: shape {tuple(value.shape)}, expected {expected}")


def _check_tensor(key: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype, nonnegative: bool) -> None:
    if value is None:
        raise CheckpointError(f"{key}: missing")
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{key}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise CheckpointError(f"{key}: shape {tuple(value.shape)}, expected {shape}")
    if value.dtype != dtype:
        raise CheckpointError(f"{key}: dtype {value.dtype}, expected {dtype}")
    # Load-time validation: host syncs here are deliberate (never on the training path).
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{key}: contains NaN or inf")
    if nonnegative and bool((value < 0).any()):
        raise CheckpointError(f"{key}: contains negative values")


def load_l2e_state(entry: Mapping[str, Any], step: Tensor, sites: Mapping[str, SiteState]) -> None:
    """Copy a validated entry into the live tensors (storage, dtype and device are kept)."""
    step.copy_(entry["step"])
    for name, site in sites.items():
        saved = entry["sites"][name]
        for key, tensor in site.tensors().items():
            tensor.copy_(saved[key])
        site.accumulator.zero_()


def _config_diff(a: L2EConfig, b: L2EConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: saved {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k])
