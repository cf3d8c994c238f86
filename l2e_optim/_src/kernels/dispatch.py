"""The one place that picks the tap's backward implementation, by config, device and mode.

``L2EConfig.kernel`` asks; this module answers per call, in the site's forward hook (so a
``torch.compile`` trace, a device or an unsupported configuration is seen before the backward
runs). ``None`` means the eager tap in ``site.py``, the reference and the fallback.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch
from torch import Tensor

from ..config import L2EConfig
from . import FusedTap
from . import native_tap
from .blocked_tap import BlockedTap


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported (the ``gpu`` extra); does not import it."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel(config: L2EConfig, device: torch.device) -> None:
    """Refuse, at construction, a ``kernel`` that cannot run on ``device``; the error says why."""
    if config.kernel in ("native", "blocked") and device.type != "cpu":
        raise RuntimeError(
            f"L2EConfig(kernel={config.kernel!r}) is a CPU path (it reads scalars on the host) but "
            f"the model is on {device}; use kernel='auto' (Triton on CUDA when installed, else eager)."
        )
    if config.kernel == "native":
        try:
            native_tap.library()
        except native_tap.NativeUnavailable as error:
            raise RuntimeError(
                f"L2EConfig(kernel='native') needs the C tap, which cannot be built here: {error}. "
                "Use kernel='auto' (falls back to 'blocked', which needs no compiler)."
            ) from error
    if config.kernel != "triton":
        return
    if not triton_installed():
        raise RuntimeError(
            "L2EConfig(kernel='triton') needs the triton package: pip install 'l2e_optim[gpu]', "
            "or use kernel='auto'."
        )
    if device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f"L2EConfig(kernel='triton') runs on CUDA tensors but the model is on {device}; use "
            "kernel='auto' (picks 'blocked' on CPU), or set TRITON_INTERPRET=1 to test the kernel."
        )


class KernelChooser:
    """Picks a site's tap implementation for one activation; one per wrapper (it owns buffers)."""

    def __init__(self, config: L2EConfig, device: torch.device | None = None) -> None:
        self.requested = config.kernel
        self.fusable = config.fusable
        # Built (or found unbuildable) here, at the wrapper's construction, once.
        self.native_ok = (
            device is not None
            and device.type == "cpu"
            and config.kernel in ("auto", "native")
            and config.fusable
            and native_tap.available()
        )
        self._blocked: BlockedTap | None = None
        self._native: native_tap.NativeTap | None = None

    def choose(self, z: Tensor) -> FusedTap | None:
        """The fused tap for activation ``z``, or ``None`` for the eager tap."""
        name = self.name(z)
        if name == "native":
            if self._native is None:
                self._native = native_tap.NativeTap()
            return self._native
        if name == "blocked":
            if self._blocked is None:
                self._blocked = BlockedTap()
            return self._blocked
        if name == "triton":
            from .triton_tap import triton_tap  # imports triton, so only once it is chosen

            return triton_tap
        return None

    def name(self, z: Tensor) -> str:
        """``"eager"``, ``"native"``, ``"blocked"`` or ``"triton"``: what :meth:`choose` runs for ``z``."""
        if torch.compiler.is_compiling():  # first: nothing else needs tracing then
            return pick_kernel(
                self.requested, fusable=self.fusable, device_type="", compiling=True, triton_ok=False, native_ok=False
            )
        return pick_kernel(
            self.requested,
            fusable=self.fusable and z.numel() > 0,
            device_type="cuda" if z.is_cuda else z.device.type,
            compiling=False,
            triton_ok=triton_installed(),
            native_ok=self.native_ok and z.dtype in native_tap.DTYPES,
        )


def pick_kernel(
    requested: str, *, fusable: bool, device_type: str, compiling: bool, triton_ok: bool, native_ok: bool
) -> str:
    """The dispatch table: ``requested`` (``L2EConfig.kernel``) resolved for one call.

    Eager when asked, when the configuration is not fusable, and under ``torch.compile`` (the
    eager tap is traced and Inductor fuses it; the C tap called as an opaque operator measured
    no better, 1.023x against 1.024x a compiled AdamW step at Pythia-70M widths, all layers, in
    one paired run: docs/benchmarks.md); an explicit kernel otherwise
    (``check_kernel`` has vetted it); ``"auto"``: Triton on CUDA when installed, on CPU the C tap
    when it builds (``native_ok``) and else blocked, else eager.
    """
    if requested == "eager" or not fusable or compiling:
        return "eager"
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "triton" if triton_ok else "eager"
    if device_type == "cpu":
        return "native" if native_ok else "blocked"
    return "eager"
