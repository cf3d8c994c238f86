"""Validation of an LR scheduler's saved state before it is loaded.

A scheduler's ``load_state_dict`` updates its ``__dict__`` first and checks afterwards, if at
all (``ReduceLROnPlateau`` with ``mode="bogus"`` raises after the update; ``LambdaLR`` with
``lr_lambdas=[5]`` raises half-way), and it takes NaN learning rates silently. So the saved
state must have the live state's structure and kinds of values, its learning rates must be
finite and >= 0, and it is first loaded into a deep copy of the scheduler (sharing only the
optimizer), whose errors are reported instead of the live scheduler's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .base_state import numbers_in
from .state_dict import CheckpointError


def validate_scheduler_state(saved: Any, scheduler: Any, path: str = "scheduler") -> None:
    """Raise :class:`CheckpointError` unless ``scheduler`` can take ``saved`` unchanged."""
    _same_structure(saved, scheduler.state_dict(), path)
    _check_values(saved, path, "")
    try:
        scratch = _scratch_copy(scheduler)
    except Exception:  # a scheduler that cannot be deep-copied: the checks above must do
        return
    try:
        scratch.load_state_dict(copy.copy(saved))
    except Exception as error:
        raise CheckpointError(
            f"{path}: {type(scheduler).__name__} refuses this state ({type(error).__name__}: {error})"
        ) from error


def _scratch_copy(scheduler: Any) -> Any:
    """A deep copy of ``scheduler`` that shares its optimizer (and the wrapped base optimizer)."""
    memo: dict[int, Any] = {}
    optimizer = getattr(scheduler, "optimizer", None)
    for shared in (optimizer, getattr(optimizer, "base_optimizer", None)):
        if shared is not None:
            memo[id(shared)] = shared
    return copy.deepcopy(scheduler, memo)


def _same_structure(saved: Any, live: Any, path: str) -> None:
    """Dict keys, list lengths and the kind of every leaf agree with the live state.

    (So e.g. SequentialLR's load cannot fail half-way, and LambdaLR never calls
    ``fn.__dict__.update`` on a plain function.)
    """
    if isinstance(live, Mapping):
        if not isinstance(saved, Mapping) or set(saved) != set(live):
            have = sorted(map(str, saved)) if isinstance(saved, Mapping) else type(saved).__name__
            raise CheckpointError(f"{path}: keys {have}, expected {sorted(map(str, live))}")
        for key in live:
            _same_structure(saved[key], live[key], f"{path}.{key}")
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            raise CheckpointError(f"{path}: expected a list of {len(live)} entries")
        for i, (a, b) in enumerate(zip(saved, live)):
            _same_structure(a, b, f"{path}.{i}")
    elif not _same_kind(saved, live):
        raise CheckpointError(f"{path}: a {type(saved).__name__}, the scheduler has a {type(live).__name__} here")


def _same_kind(saved: Any, live: Any) -> bool:
    """None, bool, str and int stay what they are (an epoch count stays an int); a float may
    come back as an int (JSON writes 1.0 as 1.0, but a scheduler may hold either)."""
    if isinstance(live, bool) or isinstance(saved, bool):
        return isinstance(live, bool) and isinstance(saved, bool)
    if isinstance(live, float):
        return isinstance(saved, (int, float))
    return type(saved) is type(live) or (isinstance(live, Tensor) and isinstance(saved, Tensor))


def _check_values(saved: Any, path: str, key: str) -> None:
    """No NaN anywhere; learning rates (keys naming ``lr``) finite and >= 0."""
    if isinstance(saved, Mapping):
        for k, v in saved.items():
            _check_values(v, f"{path}.{k}", str(k))
        return
    if isinstance(saved, (list, tuple)):
        for i, v in enumerate(saved):
            _check_values(v, f"{path}.{i}", key)
        return
    if isinstance(saved, Tensor) and saved.numel() != 1:
        return
    numbers = numbers_in(saved) or []
    is_lr = "lr" in key.lower() and "lambda" not in key.lower()
    for number in numbers:
        if math.isnan(number) or (is_lr and not (math.isfinite(number) and number >= 0)):
            raise CheckpointError(f"{path}: {number} is not a valid value" + (" for a learning rate" if is_lr else ""))
        if key in _COUNTERS and number < _COUNTERS[key]:
            raise CheckpointError(f"{path}: {number} is below {_COUNTERS[key]}")


#: Epoch and step counters of torch's schedulers, with their least valid value.
_COUNTERS = {"last_epoch": -1, "_step_count": 0, "num_bad_epochs": 0, "cooldown_counter": 0}
