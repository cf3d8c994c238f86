"""GradScaler's fused path through the wrapper: the base's flag and its two step attributes.

``GradScaler.step(optimizer)`` takes the fused path (unscale and skip inside the optimizer's
kernel, no separate ``unscale_``) when ``optimizer._step_supports_amp_scaling`` is true; it then
sets ``optimizer.grad_scale`` and ``optimizer.found_inf`` for the step and deletes them after.
The scaler sees the wrapper, the kernel runs in the base: forward all three.
"""

from __future__ import annotations

import torch
from torch import Tensor


class AmpForwarding:
    """Mixin for a wrapper whose wrapped optimizer is ``self._base``."""

    _base: torch.optim.Optimizer

    @property
    def _step_supports_amp_scaling(self) -> bool:
        return bool(getattr(self._base, "_step_supports_amp_scaling", False))

    @property
    def grad_scale(self) -> Tensor | None:
        """The base's ``grad_scale`` (set by ``GradScaler.step`` for fused optimizers)."""
        return self._base.grad_scale  # type: ignore[attr-defined,no-any-return]

    @grad_scale.setter
    def grad_scale(self, value: Tensor | None) -> None:
        self._base.grad_scale = value  # type: ignore[attr-defined]

    @grad_scale.deleter
    def grad_scale(self) -> None:
        del self._base.grad_scale  # type: ignore[attr-defined]

    @property
    def found_inf(self) -> Tensor:
        """The base's ``found_inf`` (set by ``GradScaler.step`` for fused optimizers)."""
        return self._base.found_inf  # type: ignore[attr-defined,no-any-return]

    @found_inf.setter
    def found_inf(self, value: Tensor) -> None:
        self._base.found_inf = value  # type: ignore[attr-defined]

    @found_inf.deleter
    def found_inf(self) -> None:
        del self._base.found_inf  # type: ignore[attr-defined]
