"""The wrapper's L2E state as one entry: packing, validation, loading into the live tensors.

The entry is ``{"config", "step", "sites"}``; where it sits in a state dict is
``state_layout``'s business. Plain types and tensors only, so ``torch.load(...,
weights_only=True)`` reads it. Validation runs to completion before anything is written, so a
bad entry leaves the wrapper untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, L2EConfig
from .selection import THRESHOLD_BOUNDS
from .site import SiteState
from .statistics import MEAN_LIMIT, VAR_LIMIT

L2E_KEY = "l2e"

#: Counters (tokens, steps, skipped micro-batches) beyond this are absurd (9e15: a thousand
#: times the largest pretraining runs) and near int64's end they would wrap negative.
COUNT_LIMIT = 2**53

#: Per-site tensors that are checkpointed: their dtype and the closed range of their values.
#: The ranges are what the library itself can produce (statistics.py saturates mean and var, the
#: threshold is clamped to THRESHOLD_BOUNDS), so every file it saves loads again.
SITE_TENSORS: dict[str, tuple[torch.dtype, tuple[float, float]]] = {
    "mean": (torch.float32, (-MEAN_LIMIT, MEAN_LIMIT)),
    "var": (torch.float32, (0.0, VAR_LIMIT)),
    "threshold": (torch.float32, THRESHOLD_BOUNDS),
    "count": (torch.int64, (0, COUNT_LIMIT)),
    "selected_fraction": (torch.float32, (0.0, 1.0)),
    "nonfinite": (torch.int64, (0, COUNT_LIMIT)),
}


class CheckpointError(ValueError):
    """A checkpoint or state dict cannot be saved or loaded; the message names the file and the key."""


def pack_l2e_state(config: L2EConfig, step: Tensor, sites: Mapping[str, SiteState]) -> dict[str, Any]:
    """The L2E state as nested plain dicts of cloned tensors."""
    return {
        "config": config.to_dict(),
        "step": step.detach().clone(),
        "sites": {name: {k: v.detach().clone() for k, v in site.tensors().items()} for name, site in sites.items()},
    }


def validate_l2e_state(entry: Any, config: L2EConfig, sites: Mapping[str, SiteState]) -> None:
    """Raise CheckpointError on the first problem; warn if the saved config differs.

    ``entry["config"]`` may be None (DCP keeps no top-level entry): the config is not compared,
    and the per-site shape checks stand in for the statistics-layout check.
    ``entry["paths"]`` and ``entry["step_path"]`` (optional) say where the records sat, for the
    error messages; ``entry["other_steps"]`` (optional) are more copies of the step, which must agree.
    """
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{L2E_KEY}: expected a dict, got {type(entry).__name__}")
    paths = entry.get("paths") or {}
    step_path = entry.get("step_path", f"{L2E_KEY}.step")
    _check_tensor(step_path, entry.get("step"), (), torch.int64, (0, COUNT_LIMIT))
    for path, other in entry.get("other_steps", ()):
        _check_tensor(path, other, (), torch.int64, (0, COUNT_LIMIT))
        if not torch.equal(other, entry["step"]):
            raise CheckpointError(
                f"{path}: {int(other)} differs from the step of the first record ({int(entry['step'])}); "
                "the records come from different checkpoints"
            )
    saved_config = entry.get("config")
    try:
        saved = L2EConfig.from_dict(saved_config) if isinstance(saved_config, Mapping) else None
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{L2E_KEY}.config: {error}") from error
    if saved is None and saved_config is not None:
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
    if saved is not None and saved.statistic_rows != config.statistic_rows:
        raise CheckpointError(
            f"{L2E_KEY}.config: saved with statistics={saved.statistics!r}, max_positions="
            f"{saved.max_positions}; this wrapper has statistics={config.statistics!r}, max_positions="
            f"{config.max_positions}: the statistics have other shapes. Build the wrapper with the "
            "saved settings to resume."
        )
    for name, site in sites.items():
        validate_site(paths.get(name, f"{L2E_KEY}.sites.{name}"), saved_sites[name], site)
    if saved is not None and saved != config:
        warnings.warn(
            f"the checkpoint's L2EConfig differs from this wrapper's ({_config_diff(saved, config)}); "
            "the wrapper keeps its own config and loads the saved statistics.",
            stacklevel=3,
        )


def validate_site(prefix: str, saved: Any, site: SiteState) -> None:
    """Check one site's saved tensors against the live ``site``: keys, shapes, dtypes, finiteness, signs."""
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{prefix}: expected a dict of tensors")
    extra = sorted(set(saved) - set(SITE_TENSORS))
    if extra:
        raise CheckpointError(f"{prefix}.{extra[0]}: unexpected key")
    for key, (dtype, bounds) in SITE_TENSORS.items():
        shape = tuple(site.tensors()[key].shape)
        _check_tensor(f"{prefix}.{key}", saved.get(key), shape, dtype, bounds)


def _check_tensor(
    key: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype, bounds: tuple[float, float]
) -> None:
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
    low, high = bounds
    if bool((value < low).any()):
        raise CheckpointError(f"{key}: contains negative values" if low == 0 else f"{key}: values below {low:g}")
    if bool((value > high).any()):
        raise CheckpointError(f"{key}: values above {high:g}, beyond anything training produces")


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
