"""Validation of a base optimizer's state dict (AdamW's, SGD's, ...) before it is loaded.

``Optimizer.load_state_dict`` checks group sizes only: it takes NaN learning rates, negative
second moments, integer bits relabelled as floats and another optimizer's state (then fails at
the next ``step()``, or half-way through its own ``__setstate__``). Everything a file can carry
is checked here against the live optimizer, and finally the state is loaded into a scratch copy
of the optimizer, so that whatever the optimizer itself refuses is refused before anything
live changes. Load-time only: host syncs here are deliberate.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .state_dict import CheckpointError

# torch.optim classes whose per-parameter state tensors are all 0-dim or shaped like the parameter.
_ELEMENTWISE = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")
)
#: The per-parameter state keys torch's optimizers always create (a stepped entry lacking one
#: fails at the next step() with a KeyError).
REQUIRED_STATE: dict[type[torch.optim.Optimizer], frozenset[str]] = {
    torch.optim.Adam: frozenset({"step", "exp_avg", "exp_avg_sq"}),
    torch.optim.AdamW: frozenset({"step", "exp_avg", "exp_avg_sq"}),
    torch.optim.RAdam: frozenset({"step", "exp_avg", "exp_avg_sq"}),
    torch.optim.NAdam: frozenset({"step", "mu_product", "exp_avg", "exp_avg_sq"}),
    torch.optim.Adamax: frozenset({"step", "exp_avg", "exp_inf"}),
    torch.optim.Adagrad: frozenset({"step", "sum"}),
    torch.optim.Adadelta: frozenset({"step", "square_avg", "acc_delta"}),
    torch.optim.RMSprop: frozenset({"step", "square_avg"}),
    torch.optim.ASGD: frozenset({"step", "eta", "mu", "ax"}),
    torch.optim.Rprop: frozenset({"step", "prev", "step_size"}),
}
#: State entries that hold squares, sums of squares, counts or sizes: never negative.
NONNEGATIVE_STATE = frozenset(
    {"step", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf", "eta", "step_size"}
)
#: Group hyperparameters that must be finite and >= 0; ``betas`` entries must lie in [0, 1).
NONNEGATIVE_HYPER = frozenset({"lr", "initial_lr", "weight_decay", "eps", "momentum", "alpha", "lr_decay"})
#: Group keys that are implementation switches, not the algorithm: torch adds such keys across
#: versions, so a file need not carry them (the optimizer fills them in on load).
_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable", "maximize", "decoupled_weight_decay"})
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HOOK_DICTS = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def validate_base_state(state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer, prefix: str = "") -> None:
    """Raise :class:`CheckpointError` (naming the key) unless ``optimizer`` can take ``state_dict``.

    Checks the groups (count, parameter ids and counts, hyperparameters of this optimizer's kind,
    finite and in range), each state entry of a saved parameter (dtype, finiteness, sign, shape),
    then loads the state into a scratch copy of ``optimizer``. Entries not keyed by a parameter
    pass through unchecked, as torch keeps them.
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
    params: dict[int | str, Tensor] = {}
    saved_group: dict[int | str, Mapping[str, Any]] = {}
    for index, (saved, group) in enumerate(zip(groups, live)):
        where = f"{prefix}param_groups.{index}"
        for pid, param in zip(_param_ids(where, saved, group), group["params"]):
            if pid in params:
                raise CheckpointError(f"{where}.params: parameter id {pid} is listed twice")
            params[pid], saved_group[pid] = param, saved
        _check_group(where, saved, group, type(optimizer).__name__)
    elementwise = isinstance(optimizer, _ELEMENTWISE)
    for pid, entry in state.items():
        if pid not in params:
            if isinstance(pid, int):  # a parameter's entry whose parameter no group lists
                raise CheckpointError(f"{prefix}state.{pid}: state for a parameter id that no group lists")
            continue  # Optimizer.load_state_dict keeps entries not keyed by a parameter as they are
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{prefix}state.{pid}: expected a dict, got {type(entry).__name__}")
        live_state = optimizer.state.get(params[pid])
        where = f"{prefix}state.{pid}"
        required = REQUIRED_STATE.get(type(optimizer), frozenset())
        _check_state_keys(where, entry, live_state, required)
        _check_param_state(where, entry, params[pid], live_state, elementwise, required)
        if isinstance(optimizer, torch.optim.Adam):
            check_adam_moments(where, entry, saved_group[pid].get("betas"))
    trial_load(optimizer, state_dict, prefix)


def trial_load(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Load ``state_dict`` into a shallow scratch copy of ``optimizer``; its errors become ours.

    ``Optimizer.load_state_dict`` builds new ``state`` and ``param_groups`` objects and assigns
    them to the optimizer it is called on, so the copy's load leaves the live optimizer alone;
    the copy runs no load hooks (they belong to the live one and may have side effects).
    """
    scratch = object.__new__(type(optimizer))
    scratch.__dict__.update(optimizer.__dict__)
    for name in _HOOK_DICTS:
        setattr(scratch, name, OrderedDict())
    try:
        scratch.load_state_dict(dict(state_dict))
    except Exception as error:  # whatever the optimizer refuses, it refuses before any live change
        raise CheckpointError(
            f"{prefix}state: {type(optimizer).__name__} refuses this state ({type(error).__name__}: "
            f"{error}); was it saved from another optimizer?"
        ) from error


def _param_ids(where: str, saved: Mapping[str, Any], group: Mapping[str, Any]) -> list[int | str]:
    ids = saved.get("params")
    if not isinstance(ids, list) or len(ids) != len(group["params"]):
        count = len(ids) if isinstance(ids, list) else ids
        raise CheckpointError(
            f"{where}.params: {count!r} parameters saved, the optimizer's group has "
            f"{len(group['params'])}; was it saved from another model?"
        )
    for pid in ids:
        # torch numbers parameters 0, 1, ...; torch.distributed.checkpoint passes their FQNs.
        if not (isinstance(pid, str) or (isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0)):
            raise CheckpointError(f"{where}.params: parameter ids must be integers >= 0 or names, got {pid!r}")
    return ids


def _check_group(where: str, saved: Mapping[str, Any], live: Mapping[str, Any], kind: str) -> None:
    # param_names: present when the optimizer was built on named_parameters(); optional both
    # ways (torch loads named into plain and plain into named), and names, not numbers.
    needed = set(live) - _FLAGS - {"params", "initial_lr", "param_names"}
    missing = sorted(needed - set(saved))
    if missing:
        raise CheckpointError(
            f"{where}: lacks {missing}, which this {kind} needs (the file has {sorted(set(saved) - {'params'})}); "
            "was it saved from another optimizer?"
        )
    for key, value in saved.items():
        if key == "param_names":
            if not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
                raise CheckpointError(f"{where}.param_names: expected a list of names, got {value!r}")
            continue
        if key == "params":
            continue
        _check_hyper(f"{where}.{key}", key, value, live.get(key))


def _check_hyper(name: str, key: str, value: Any, live: Any) -> None:
    if isinstance(live, bool) and not isinstance(value, bool):
        raise CheckpointError(f"{name}: expected a bool, got {value!r}")
    numbers = numbers_in(value)
    if numbers is None:
        if numbers_in(live) is not None:
            raise CheckpointError(f"{name}: expected a number, got {type(value).__name__}")
        return
    expected = numbers_in(live) if isinstance(live, (tuple, list)) else None
    if expected is not None and len(numbers) != len(expected):
        raise CheckpointError(f"{name}: expected {len(expected)} numbers, got {len(numbers)}")
    for number in numbers:
        if not math.isfinite(number):
            raise CheckpointError(f"{name}: {number} is not finite")
        if key in NONNEGATIVE_HYPER and number < 0:
            raise CheckpointError(f"{name}: {number} is negative")
        if key == "betas" and not 0.0 <= number < 1.0:
            raise CheckpointError(f"{name}: {number} is not in [0, 1)")


def numbers_in(value: Any) -> list[float] | None:
    """The numbers in a hyperparameter (a number, a 0-dim tensor, a tuple of them); None if not numeric."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype not in _FLOATS + (torch.int64, torch.int32):
            return [math.nan]
        return [float(value)]
    if isinstance(value, (tuple, list)) and value:
        # None stands for "derive it" inside some tuples (Adafactor's eps=(None, 1e-3)).
        out = [numbers_in(v) for v in value if v is not None]
        if any(o is None for o in out):
            return [math.nan]
        return [n for o in out if o is not None for n in o]
    return None


def _check_state_keys(where: str, entry: Mapping[str, Any], live: Any, required: frozenset[str]) -> None:
    """A saved entry holds every key the optimizer's own entry for that parameter holds."""
    needed = set(live) if isinstance(live, Mapping) and live else set(required) if entry else set()
    missing = sorted(needed - set(entry))
    if missing:
        raise CheckpointError(
            f"{where}: lacks {missing} (it has {sorted(map(str, entry))}); was it saved from another "
            "optimizer, or with other options?"
        )


def check_adam_moments(where: str, entry: Mapping[str, Any], betas: Any) -> None:
    """Adam's first moment is bounded by its second: ``|m| <= c * sqrt(v)`` for every gradient
    sequence, ``c = (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2))`` (Cauchy-Schwarz on the two EMAs,
    when b1^2 < b2). A file breaking it (say v = 0 under m = 1e-3) would make the next update
    m / (sqrt(v) + eps) explode; such a state cannot come from training.
    """
    m, v = entry.get("exp_avg"), entry.get("exp_avg_sq")
    numbers = numbers_in(betas)
    if not (isinstance(m, Tensor) and isinstance(v, Tensor) and m.shape == v.shape and numbers and len(numbers) == 2):
        return
    b1, b2 = numbers
    if not 0.0 < b2 < 1.0 or b1 * b1 >= b2:
        return
    c = (1.0 - b1) / math.sqrt((1.0 - b2) * (1.0 - b1 * b1 / b2))
    # A factor 4 of slack: for rounding (bf16 state, whose EMA can stall), for betas changed by
    # a schedule since the moments were gathered, and an absolute term for second moments that
    # underflowed to 0. Corrupt moments (v = 0 under m = 1e-3, m = 1e30) are far beyond it.
    bound = 4.0 * c * v.double().clamp_min(0.0).sqrt() + 1e-20
    if bool((m.double().abs() > bound).any()):
        raise CheckpointError(
            f"{where}.exp_avg: exceeds 4 * {c:.3g} * sqrt(exp_avg_sq) somewhere, far beyond what "
            f"any gradient sequence produces (at most {c:.3g}); the moments are corrupt"
        )


def _check_param_state(
    prefix: str, entry: Mapping[str, Any], param: Tensor, live: Any, elementwise: bool, required: frozenset[str]
) -> None:
    known_state = live if isinstance(live, Mapping) else {}
    for key, value in entry.items():
        name = f"{prefix}.{key}"
        known = known_state.get(key)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
            # LBFGS keeps histories as lists of flat tensors (old_dirs, old_stps): finite, that is all.
            if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in value):
                raise CheckpointError(f"{name}: contains NaN or inf")
            continue
        if not isinstance(value, Tensor):
            # A tensor the optimizer keeps (its live entry, or torch's own keys) must stay one;
            # only `step` may be a number (older torch saved it so, and load converts it).
            if key != "step" and (isinstance(known, Tensor) or key in required):
                raise CheckpointError(f"{name}: expected a tensor, got {type(value).__name__}")
            numbers = numbers_in(value)
            if numbers is not None and not all(math.isfinite(n) and (n >= 0 or key not in NONNEGATIVE_STATE) for n in numbers):
                raise CheckpointError(f"{name}: {value!r} is not a finite value in range")
            continue
        _check_state_dtype(name, value, param, known, elementwise)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{name}: contains NaN or inf")
        if key in NONNEGATIVE_STATE and bool((value < 0).any()):
            raise CheckpointError(f"{name}: contains negative values (it holds squares or counts)")
        # The live state, where the optimizer has stepped, is the best witness of the shape.
        if isinstance(known, Tensor):
            expected: tuple[int, ...] | None = tuple(known.shape)
        else:
            expected = tuple(param.shape) if elementwise and value.dim() > 0 else None
        if expected is not None and tuple(value.shape) != expected:
            raise CheckpointError(f"{name}: shape {tuple(value.shape)}, expected {expected}")


def _check_state_dtype(name: str, value: Tensor, param: Tensor, known: Any, elementwise: bool) -> None:
    """A float8, complex or integer tensor where the optimizer keeps floats is refused.

    (An fp32 tensor's bytes relabelled as int32 would otherwise be cast to floats on load.)
    """
    if isinstance(known, Tensor):
        if value.dtype != known.dtype:
            raise CheckpointError(f"{name}: dtype {value.dtype}, the optimizer's state has {known.dtype}")
        return
    if value.is_complex() and not param.is_complex():
        raise CheckpointError(f"{name}: dtype {value.dtype}, a complex tensor for a real parameter")
    if value.is_floating_point() and value.dtype not in _FLOATS:
        raise CheckpointError(f"{name}: dtype {value.dtype} is not supported in optimizer state")
    if elementwise and not (value.is_floating_point() or value.is_complex()):
        raise CheckpointError(f"{name}: dtype {value.dtype}, {type(param).__name__} state is floating point")
