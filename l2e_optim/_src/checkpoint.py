"""save_checkpoint / load_checkpoint: model, optimizer (with L2E state) and scheduler in one
safetensors file. No pickle: loading a file never runs code.

Layout: tensors under flat dotted keys (``model.<name>``, ``optimizer.state.<id>.<key>``, the
L2E records among them as ``optimizer.state.<id>.l2e.sites.<site>.<key>``, ``scheduler...``);
the header metadata holds JSON strings (``optimizer.param_groups``, ``optimizer.state``,
``optimizer.l2e`` with the L2E config, ``scheduler``, ``model``, ``user``) and ``format`` /
``format_version``. Files of layout 1 (``optimizer.l2e.sites...``) load too. Loading validates the
whole file against the live objects first and only then mutates them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base_state import validate_base_state
from .checkpoint_io import read_file, write_atomically
from .flat_tree import flatten, unflatten
from .scheduler_state import validate_scheduler_state
from .state_dict import L2E_KEY, CheckpointError, pack_l2e_state, validate_l2e_state
from .state_layout import split_l2e_state
from .wrapper import L2EWrapper

FORMAT = "l2e_optim.checkpoint"
FORMAT_VERSION = 1
_OPTIMIZER = "optimizer"

Scheduler = Any  # torch.optim.lr_scheduler.LRScheduler or ReduceLROnPlateau: anything with state_dict()


class LoadedCheckpoint(dict[str, Any]):
    """What :func:`load_checkpoint` returns: the user metadata (this dict itself), and what matched.

    It *is* the ``metadata`` dict given to :func:`save_checkpoint` (JSON types; empty if none), so
    ``load_checkpoint(...)["step"]`` works; ``metadata`` returns the same content as a plain dict.

    Attributes:
        missing_keys: what this model / optimizer / scheduler has that the file lacks
            (only with ``strict=False``; those parts were left as they were).
        unexpected_keys: what the file holds that nothing here takes (only with ``strict=False``).
    """

    def __init__(
        self,
        metadata: Mapping[str, Any],
        missing_keys: tuple[str, ...] = (),
        unexpected_keys: tuple[str, ...] = (),
    ) -> None:
        super().__init__(metadata)
        self.missing_keys = missing_keys
        self.unexpected_keys = unexpected_keys

    @property
    def metadata(self) -> dict[str, Any]:
        """The user metadata as a plain dict."""
        return dict(self)


def save_checkpoint(
    path: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    *,
    model: nn.Module | None = None,
    scheduler: Scheduler | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``optimizer`` (an :class:`L2EWrapper` or any optimizer), and optionally ``model``,
    ``scheduler`` and JSON-able user ``metadata``, to one safetensors file at ``path``.

    The write is atomic: a temporary file in the same folder is written, fsynced and renamed
    over ``path``, so a crash mid-save leaves any earlier file at ``path`` intact.
    Raises :class:`CheckpointError` if some state cannot be stored (e.g. a non-JSON value).
    """
    path = os.fspath(path)
    tensors: dict[str, Tensor] = {}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    for key, value in optimizer.state_dict().items():
        header[f"{_OPTIMIZER}.{key}"] = _dumps(flatten(value, f"{_OPTIMIZER}.{key}", tensors), key)
    if model is not None:
        header["model"] = _dumps(flatten(dict(model.state_dict()), "model", tensors), "model")
    if scheduler is not None:
        header["scheduler"] = _dumps(flatten(scheduler.state_dict(), "scheduler", tensors), "scheduler")
    header["user"] = _dumps(_user_metadata(metadata), "metadata")
    write_atomically(path, tensors, header)


def load_checkpoint(
    path: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer,
    *,
    model: nn.Module | None = None,
    scheduler: Scheduler | None = None,
    strict: bool = True,
) -> LoadedCheckpoint:
    """Load a file written by :func:`save_checkpoint` into ``optimizer``, ``model``, ``scheduler``.

    Everything is validated first (header, format version, keys, shapes, dtypes, finiteness,
    parameter groups and counts, L2E sites); only then are the objects changed. Any problem
    raises :class:`CheckpointError` naming the file and the key, with every object exactly as
    it was. ``strict=False`` forgives a file that describes different things (model keys, L2E
    sites, an L2E entry, a scheduler present on one side only), loads what matches and lists
    the rest in the result; it never forgives a damaged file. Parts not passed (``model=None``)
    are not loaded. Never calls ``torch.load`` or ``pickle``.
    """
    path = os.fspath(path)
    try:
        plan = _plan(path, optimizer, model, scheduler, strict)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    except Exception as error:  # a file shaped to trip a check itself (planning changes nothing)
        raise CheckpointError(f"{path}: cannot be validated ({type(error).__name__}: {error})") from error
    # Nothing above changed any object; from here on nothing can fail on the file's account.
    if model is not None:
        with torch.no_grad():
            model.load_state_dict(plan.model, strict=False)
    if isinstance(optimizer, L2EWrapper):
        optimizer._load_validated(plan.optimizer, plan.l2e)  # validated once, in _plan_optimizer
    else:
        optimizer.load_state_dict(plan.optimizer)
    if scheduler is not None and plan.scheduler is not None:
        scheduler.load_state_dict(plan.scheduler)
    for message in plan.warnings:
        warnings.warn(message, stacklevel=2)
    return LoadedCheckpoint(plan.user, tuple(plan.missing), tuple(plan.extra))


def _plan(
    path: str, optimizer: torch.optim.Optimizer, model: nn.Module | None, scheduler: Scheduler | None, strict: bool
) -> _Plan:
    """Read and validate the whole file against the live objects; change nothing."""
    header, tensors = read_file(path)
    _check_format(header)
    plan = _Plan(strict)
    used: set[str] = set()
    plan.optimizer = _plan_optimizer(header, tensors, used, optimizer, plan)
    if model is not None:
        plan.model = _plan_model(header, tensors, used, model, plan)
    elif "model" in header:  # not asked for: its tensors are neither loaded nor unexpected
        unflatten(_loads(header, "model"), tensors, used, "model")
    if scheduler is not None:
        plan.scheduler = _plan_scheduler(header, tensors, used, scheduler, plan)
    elif "scheduler" in header:
        unflatten(_loads(header, "scheduler"), tensors, used, "scheduler")
    plan.user = _loads(header, "user")
    if not isinstance(plan.user, dict):
        raise CheckpointError(f"user: the metadata is a JSON {type(plan.user).__name__}, expected an object")
    for key in sorted(set(tensors) - used):
        plan.unexpected(key, "a tensor that no header entry refers to")
    return plan


class _Plan:
    """The validated state to load, and what strict=False let through."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.missing: list[str] = []
        self.extra: list[str] = []
        self.optimizer: dict[str, Any] = {}
        self.l2e: Any = None
        self.model: dict[str, Tensor] = {}
        self.scheduler: dict[str, Any] | None = None
        self.user: dict[str, Any] = {}
        self.warnings: list[str] = []

    def missing_key(self, key: str, why: str) -> None:
        if self.strict:
            raise CheckpointError(f"{key}: missing ({why}); strict=False loads the rest")
        self.missing.append(key)

    def unexpected(self, key: str, why: str) -> None:
        if self.strict:
            raise CheckpointError(f"{key}: unexpected ({why}); strict=False ignores it")
        self.extra.append(key)


def _plan_optimizer(
    header: Mapping[str, str], tensors: Mapping[str, Tensor], used: set[str],
    optimizer: torch.optim.Optimizer, plan: _Plan,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for meta_key in header:
        if meta_key.startswith(f"{_OPTIMIZER}."):
            state[meta_key[len(_OPTIMIZER) + 1 :]] = unflatten(_loads(header, meta_key), tensors, used, meta_key)
    if isinstance(optimizer, L2EWrapper):
        for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
            state = dict(pre_hook(optimizer, state) or state)
        base_state, entry = _split(state, optimizer._record_names)
        plan.l2e = _plan_l2e(entry, optimizer, plan)
        base = optimizer.base_optimizer
    else:
        base_state, entry = _split(state, {})
        if entry is not None or L2E_KEY in state:
            plan.unexpected(f"{_OPTIMIZER}.{L2E_KEY}", "L2E state, and the optimizer is not an L2EWrapper")
        base = optimizer
    validate_base_state(base_state, base, prefix=f"{_OPTIMIZER}.")
    return base_state


def _split(state: Mapping[str, Any], names: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    try:
        return split_l2e_state(state, names)
    except CheckpointError as error:
        raise CheckpointError(f"{_OPTIMIZER}.{error}") from error


def _plan_l2e(entry: dict[str, Any] | None, wrapper: L2EWrapper, plan: _Plan) -> dict[str, Any]:
    """Validate the L2E entry; with strict=False, fill what it lacks from the live state."""
    live = pack_l2e_state(wrapper.config, wrapper.step_count, wrapper.sites)
    prefix = f"{_OPTIMIZER}.{L2E_KEY}"
    if entry is None:
        plan.missing_key(prefix, "saved from a plain optimizer")
        entry = live
    saved_sites = entry.get("sites")
    if not plan.strict and isinstance(saved_sites, dict):
        for name in sorted(set(live["sites"]) - set(saved_sites)):
            plan.missing_key(f"{prefix}.sites.{name}", "a site of this model the file lacks")
            saved_sites[name] = live["sites"][name]
        for name in sorted(set(saved_sites) - set(live["sites"])):
            plan.unexpected(f"{prefix}.sites.{name}", "a site this model lacks")
            del saved_sites[name]
    with warnings.catch_warnings(record=True) as caught:
        # A differing config is worth a warning only if the load goes ahead: kept for then.
        warnings.simplefilter("always")
        try:
            validate_l2e_state(entry, wrapper.config, wrapper.sites)
        except CheckpointError as error:
            raise CheckpointError(f"{_OPTIMIZER}.{error}") from error
    plan.warnings = [str(w.message) for w in caught]
    return entry


def _plan_model(
    header: Mapping[str, str], tensors: Mapping[str, Tensor], used: set[str], model: nn.Module, plan: _Plan
) -> dict[str, Tensor]:
    if "model" not in header:
        plan.missing_key("model", "the file holds no model")
        return {}
    saved = unflatten(_loads(header, "model"), tensors, used, "model")
    if not isinstance(saved, dict) or not all(isinstance(v, Tensor) for v in saved.values()):
        raise CheckpointError("model: expected a flat dict of tensors")
    live = model.state_dict()
    for name in live:
        if name not in saved:
            plan.missing_key(f"model.{name}", "a model entry the file lacks")
    for name in saved:
        if name not in live:
            plan.unexpected(f"model.{name}", "the model has no such entry")
    out = {name: value for name, value in saved.items() if name in live}
    for name, value in out.items():
        target = live[name]
        if value.shape != target.shape:
            raise CheckpointError(
                f"model.{name}: shape {tuple(value.shape)}, the model has {tuple(target.shape)}; "
                "was it saved from another model?"
            )
        if value.dtype != target.dtype:
            raise CheckpointError(
                f"model.{name}: dtype {value.dtype}, the model has {target.dtype}; load into a "
                "model of the saved dtype, then cast"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"model.{name}: contains NaN or inf")
    return out


def _plan_scheduler(
    header: Mapping[str, str], tensors: Mapping[str, Tensor], used: set[str], scheduler: Scheduler, plan: _Plan
) -> dict[str, Any] | None:
    if "scheduler" not in header:
        plan.missing_key("scheduler", "the file holds no scheduler state")
        return None
    saved = unflatten(_loads(header, "scheduler"), tensors, used, "scheduler")
    validate_scheduler_state(saved, scheduler)
    return saved  # type: ignore[no-any-return]


def _user_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON would turn ``{1: "a"}`` into ``{"1": "a"}`` without a word: refuse non-string keys."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"metadata: expected a dict, got {type(metadata).__name__}")
    _string_keys(metadata, "metadata")
    return dict(metadata)


def _string_keys(tree: Any, path: str) -> None:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{path}: keys must be strings (JSON object keys), got {key!r}; use str(key)")
            _string_keys(value, f"{path}.{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            _string_keys(value, f"{path}.{i}")


def _loads(header: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(header[key])
    except KeyError:
        raise CheckpointError(f"{key}: missing from the header metadata") from None
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{key}: invalid JSON in the header metadata ({error})") from error


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{what}: cannot be stored as JSON ({error})") from error


def _check_format(header: Mapping[str, str]) -> None:
    if header.get("format") != FORMAT:
        raise CheckpointError(f"header.format: not an l2e_optim checkpoint (format {header.get('format')!r})")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"format_version: {header.get('format_version')!r} is not the supported version "
            f"{FORMAT_VERSION}; use the l2e_optim release that wrote the file"
        )
