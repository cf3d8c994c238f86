"""L2EConfig: the frozen, validated configuration of an L2EWrapper."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from .selection import THRESHOLD_BOUNDS, initial_threshold

Inhibition = Literal["l2e", "memel", "none"]
Statistics = Literal["pooled", "per-position"]
Retrieval = Literal["auto", "threshold", "sample-topk", "token-topk", "batch-topk", "random"]
LayerChoice = Union[Literal["mid-2", "mid-third", "all"], tuple[int, ...]]
Kernel = Literal["auto", "eager", "native", "blocked", "triton"]

_INHIBITIONS = ("l2e", "memel", "none")
_RETRIEVALS = ("auto", "threshold", "sample-topk", "token-topk", "batch-topk", "random")
_LAYER_NAMES = ("mid-2", "mid-third", "all")
_STATISTICS = ("pooled", "per-position")
_KERNELS = ("auto", "eager", "native", "blocked", "triton")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class L2EConfig:
    """How L2EWrapper selects and inhibits monosemantic neurons.

    Attributes:
        inhibition: ``"l2e"`` (moving threshold + log-MS regularizer in gradient space),
            ``"memel"`` (Reverse Deactivation of each sequence's top-``memel_topk`` scores) or
            ``"none"`` (statistics and threshold only, for monitoring).
        ratio: target fraction p of (token, neuron) values selected as monosemantic.
        strength: lambda, the weight of the L2E regularizer ``lambda * L_MS``.
        eps: variance compensation: scores divide by ``var + eps * mean(var)``.
        log_eps: delta inside ``log((z - mean)^2 + delta)``.
        forget_steps: n_f; after n_f steps' worth of tokens the history is capped, so the mean
            becomes an EMA with weight 1/(n_f+1) on each step. ``None`` keeps exact cumulative
            statistics.
        warmup_steps: optimizer steps before any inhibition (statistics and threshold still run).
        layers: which transformer blocks carry sites when they are discovered automatically:
            ``"mid-2"`` (the two middle blocks), ``"mid-third"``, ``"all"`` or block indices.
        memel_topk: k of the top-k retrievals (``"sample-topk"``: per sequence, MEmeL's; and
            ``"token-topk"``: per token).
        memel_scale: Delta of Reverse Deactivation.
        grad_accumulation_steps: micro-batches per optimizer step; the regularizer is divided by
            it, like a loss divided for gradient accumulation.
        threshold_lr: eta of the multiplicative threshold update
            ``tau <- tau * exp(eta * min((r - p) / p, 9))``, r the step's selected fraction.
        threshold_init: starting threshold; ``None`` uses the chi-square(1) quantile of ``ratio``
            (the exact threshold if activations were Gaussian).
        retrieval: which values are inhibited. ``"threshold"``: score >= the moving threshold
            (L2E); ``"sample-topk"``: each sequence's ``memel_topk`` highest scores over all its
            positions x neurons, padding excluded (MEmeL's official retrieval; the sequence is the
            activation's leading axis, and a 2-D ``[rows, N]`` activation counts each row as a
            sequence); ``"token-topk"``: each token's ``memel_topk`` highest scores (a per-token
            variant, T times as many values per sequence); ``"batch-topk"``: the exact top ``ratio`` of the micro-batch's scores (the in-batch
            ranking L2E replaces; for ablations, costs a top-k per micro-batch); ``"random"``: a
            random ``ratio`` of the values, blind to the scores (the control that tells inhibiting
            *monosemantic* values from generic noise on the activations; draws from torch's
            global RNG). ``"auto"``: threshold for "l2e", sample-topk for "memel".
        statistics: ``"pooled"``: one running mean and variance per neuron, pooled over batch and
            positions; ``"per-position"``: one per (position, neuron), as the official MEmeL code
            keeps them, for positions ``< max_positions``; every later position shares one more
            (tail) row, pooled over those positions. The position is the index along the
            activation's middle axes (a 2-D ``[rows, N]`` activation has only position 0).
        max_positions: per-position only: how many leading positions get their own statistics
            (set it to the training context length); the state is ``max_positions + 1`` rows.
        kernel: which implementation runs the tap's backward (statistics, selection count and
            L2E gradient). ``"eager"``: plain torch ops, the reference; ``"native"``: one C loop
            (CPU only; built on first use with the system's C compiler, refused at construction
            when that fails); ``"blocked"``: the eager math in token blocks over preallocated
            buffers (CPU only, no compiler); ``"triton"``: one fused Triton kernel (CUDA; needs
            the ``gpu`` extra). ``"auto"``: Triton on CUDA when installed, on CPU native when it
            builds and else blocked, eager otherwise. The fused
            kernels implement pooled statistics and the threshold retrieval (every retrieval for
            "memel" and "none", whose tap only gathers statistics); the rest runs eager under
            "auto". Under ``torch.compile`` the eager tap is traced and compiled whatever this
            says.
    """

    inhibition: Inhibition = "l2e"
    ratio: float = 0.02
    strength: float = 1e-3
    eps: float = 0.01
    log_eps: float = 1e-6
    forget_steps: int | None = 10
    warmup_steps: int = 10
    layers: LayerChoice = "mid-2"
    memel_topk: int = 1
    memel_scale: float = 1.0
    grad_accumulation_steps: int = 1
    threshold_lr: float = 0.05
    threshold_init: float | None = None
    retrieval: Retrieval = "auto"
    statistics: Statistics = "pooled"
    max_positions: int = 2048
    kernel: Kernel = "auto"

    def __post_init__(self) -> None:
        if self.inhibition not in _INHIBITIONS:
            raise ConfigError(
                f"inhibition={self.inhibition!r} is not one of {_INHIBITIONS}; "
                "use 'l2e' for the paper's method, 'memel' for the baseline, 'none' to monitor."
            )
        if self.retrieval not in _RETRIEVALS:
            raise ConfigError(f"retrieval={self.retrieval!r} is not one of {_RETRIEVALS}.")
        if self.statistics not in _STATISTICS:
            raise ConfigError(
                f"statistics={self.statistics!r} is not one of {_STATISTICS}; 'pooled' keeps one "
                "statistic per neuron, 'per-position' one per (position, neuron)."
            )
        _check_int_at_least("max_positions", self.max_positions, 1, "set it to the context length")
        _check_kernel(self)
        _check_open_unit("ratio", self.ratio, "the paper's best values are 0.01 to 0.03")
        _check_nonnegative("strength", self.strength)
        _check_nonnegative("eps", self.eps)
        _check_positive("log_eps", self.log_eps)
        _check_nonnegative("memel_scale", self.memel_scale)
        _check_positive("threshold_lr", self.threshold_lr)
        if self.threshold_init is not None:
            low, high = THRESHOLD_BOUNDS
            if not (isinstance(self.threshold_init, (int, float)) and low <= self.threshold_init <= high):
                raise ConfigError(
                    f"threshold_init={self.threshold_init!r} must lie in [{low:g}, {high:g}], the range the "
                    "moving threshold is kept in; or None for the Gaussian quantile of ratio."
                )
        if self.forget_steps is not None:
            _check_int_at_least("forget_steps", self.forget_steps, 1, "or None to never forget")
        _check_int_at_least("warmup_steps", self.warmup_steps, 0, "")
        _check_int_at_least("memel_topk", self.memel_topk, 1, "")
        _check_int_at_least("grad_accumulation_steps", self.grad_accumulation_steps, 1, "")
        object.__setattr__(self, "layers", _normalise_layers(self.layers))

    @property
    def resolved_retrieval(self) -> Literal["threshold", "sample-topk", "token-topk", "batch-topk", "random"]:
        """``retrieval`` with ``"auto"`` resolved for this inhibition mode."""
        if self.retrieval != "auto":
            return self.retrieval
        return "sample-topk" if self.inhibition == "memel" else "threshold"

    @property
    def fusable(self) -> bool:
        """Whether the fused kernels implement this configuration's tap (else it runs eager).

        They keep one statistic per neuron and compare scores with the moving threshold; a
        retrieval that ranks scores (top-k) or draws them (random) needs the eager path when it
        drives the L2E gradient, and so do per-position statistics.
        """
        selection_ok = self.inhibition != "l2e" or self.resolved_retrieval == "threshold"
        return selection_ok and self.statistics == "pooled"

    @property
    def statistic_rows(self) -> int | None:
        """Rows of per-position statistics (``max_positions + 1``, the last the tail); None if pooled."""
        return self.max_positions + 1 if self.statistics == "per-position" else None

    @property
    def starting_threshold(self) -> float:
        """``threshold_init``, or the chi-square(1) upper ``ratio``-quantile (within the threshold's
        bounds) when it is None."""
        if self.threshold_init is not None:
            return float(self.threshold_init)
        low, high = THRESHOLD_BOUNDS
        return min(max(initial_threshold(self.ratio), low), high)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for checkpoints and logs)."""
        out = dataclasses.asdict(self)
        if isinstance(self.layers, tuple):
            out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> L2EConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown L2EConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**dict(data))


def _normalise_layers(layers: object) -> LayerChoice:
    if isinstance(layers, str):
        if layers not in _LAYER_NAMES:
            raise ConfigError(
                f"layers={layers!r} is not one of {_LAYER_NAMES}; or pass block indices, e.g. (2, 3)."
            )
        return layers  # type: ignore[return-value]
    if isinstance(layers, Sequence) and layers and all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        if len(set(layers)) != len(layers):
            raise ConfigError(f"layers={tuple(layers)} repeats a block index; list each once.")
        return tuple(layers)
    raise ConfigError(
        f"layers={layers!r} must be one of {_LAYER_NAMES} or a non-empty sequence of block indices."
    )


def _check_kernel(config: L2EConfig) -> None:
    if config.kernel not in _KERNELS:
        raise ConfigError(
            f"kernel={config.kernel!r} is not one of {_KERNELS}; 'auto' picks the fastest available."
        )
    if config.kernel in ("native", "blocked", "triton") and not config.fusable:
        raise ConfigError(
            f"kernel={config.kernel!r} fuses pooled statistics and the threshold retrieval only, "
            f"but this config has statistics={config.statistics!r}, inhibition="
            f"{config.inhibition!r} and retrieval={config.resolved_retrieval!r} (a ranking or a "
            "random draw); use kernel='auto' (runs it eager) or kernel='eager'."
        )


def _check_open_unit(name: str, value: float, hint: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ConfigError(f"{name}={value!r} must lie in (0, 1); {hint}.")


def _check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0.")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{name}={value!r} must be a finite number > 0.")


def _check_int_at_least(name: str, value: int, low: int, extra: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        tail = f" ({extra})" if extra else ""
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}{tail}.")
