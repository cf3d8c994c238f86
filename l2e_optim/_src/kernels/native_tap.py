"""The tap's backward as one C loop (the CPU fast path when a C compiler is present).

``native_tap.c`` does, for one site and micro-batch, what the blocked path does in seven torch
passes per block, in a single pass over the activation and the incoming gradient (fp32
arithmetic, no fused multiply-add, so its sums are bit-identical across instruction sets and
thread counts). It is compiled on first use with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``; about a second) into a per-user cache (``$L2E_OPTIM_CACHE_DIR``, else
``$XDG_CACHE_HOME/l2e_optim`` or ``~/.cache/l2e_optim``), keyed by a hash of the source, the
compiler and its flags, and loaded with :mod:`ctypes` (no Python headers, no torch headers, no
build tools beyond the compiler). ``L2EConfig(kernel="auto")`` uses it on CPU when it builds and
falls back to the blocked path when it does not (no compiler: nothing is needed from the user);
``kernel="native"`` asks for it and fails at construction, with the compiler's message, when it
cannot be built. fp32 and bf16 activations; other dtypes take the blocked path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..statistics import MIN_COUNT
from ..tap_site import TapSite
from .blocked_tap import BlockedTap

SOURCE = Path(__file__).with_name("native_tap.c")
#: Portable flags (the loop is cloned per x86 instruction set in the source, chosen at load
#: time), IEEE arithmetic kept: no ``-ffast-math``, no contraction into fused multiply-adds.
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")
#: The activation dtypes the C loop takes, with its codes for them.
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
#: Values per thread below which extra threads cost more than they save.
MIN_VALUES_PER_THREAD = 1 << 16

_log = logging.getLogger("l2e_optim")


class NativeUnavailable(RuntimeError):
    """The C tap could not be built or loaded here; the message says why."""


def compiler() -> str | None:
    """The C compiler command: ``$CC`` when set (``"ccache gcc"`` works), else the first of cc,
    gcc, clang on ``PATH``."""
    if os.environ.get("CC", "").strip():
        return os.environ["CC"].strip()
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("L2E_OPTIM_CACHE_DIR"):
        return Path(os.environ["L2E_OPTIM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "l2e_optim"


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The loaded C tap, built first if this source has not been built here; cached per process.

    Raises :class:`NativeUnavailable` (with the reason) when it cannot be had: no compiler,
    a failed build, a library that does not load. Builds are atomic (compiled to a private file,
    then renamed), so processes starting together (DDP ranks) never load a half-written file.
    """
    if os.name == "nt":
        raise NativeUnavailable("the C tap is built with a Unix C compiler; not on Windows")
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (set $CC, or install cc/gcc/clang)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(FLAGS).encode(), sys.platform.encode()]))
    name = f"native_tap_{key.hexdigest()[:16]}.so"
    path = cache_dir() / name
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            folder = path.parent
        except OSError:  # an unwritable cache: build for this process only
            folder = Path(tempfile.mkdtemp(prefix="l2e_optim_"))
            path = folder / name
        _build(cc, folder, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeUnavailable(f"the built C tap {path} does not load: {error}") from error
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.l2e_site_tap.restype = i32
    lib.l2e_site_tap.argtypes = [i32, p, p, p, p, p, p, f32, i32, f32, f32, p, p, p, i64, i64, f32, f32, f32, i32]
    return lib


def _build(cc: str, folder: Path, path: Path) -> None:
    descriptor, scratch = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(descriptor)
    command = [*shlex.split(cc), *FLAGS, "-o", scratch, str(SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        os.unlink(scratch)
        raise NativeUnavailable(f"{' '.join(command)} failed: {error}") from error
    if done.returncode != 0:
        os.unlink(scratch)
        raise NativeUnavailable(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    os.replace(scratch, path)
    _log.info("l2e_optim: built the C tap %s", path)


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether the C tap can be used in this process (builds it on the first call)."""
    try:
        library()
    except NativeUnavailable as error:
        _log.info("l2e_optim: the C tap is unavailable (%s); the blocked tap is used on CPU", error)
        return False
    return True


class NativeTap(BlockedTap):
    """The C tap (CPU tensors): ``_Tap`` calls :meth:`site_backward` for fp32/bf16 activations.

    A :class:`BlockedTap` otherwise: it reuses its output buffers (``_output``), and an
    activation the C loop does not take (fp16, fp64) runs the blocked path (``__call__``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._scratches: dict[int, Tensor] = {}

    def site_backward(
        self,
        z: Tensor,
        grad: Tensor,
        valid: Tensor | None,
        site: TapSite,
        options: tuple[Any, ...],
        loss_scale: Tensor | None,
    ) -> Tensor:
        """A whole tap backward in one C call (``_Tap``'s native branch; pooled, threshold).

        ``site`` and ``options`` as ``_Tap`` holds them. Computes the threshold bar and the
        penalty's scale as ``tap.py`` does (the same fp32 operations), runs the loop, and adds the
        micro-batch's sums to the site's accumulator (or counts it non-finite): what the eager
        tap does in some forty small torch ops, 0.8 ms a site on the Pythia-70M step, in one.
        Returns the outgoing gradient (``grad`` itself when no penalty is due).
        """
        eps, log_eps, coef, warmup = options[:4]
        n = z.shape[-1]
        z2 = z.reshape(-1, n).contiguous()
        active = coef != 0.0 and int(site.step) >= warmup  # sync-ok: CPU tensors (the C tap's device)
        out = self._output(grad) if active else None
        g = None if out is None else grad.reshape(-1, n).contiguous()
        scratch = self._scratch(n)
        status = library().l2e_site_tap(
            DTYPES[z.dtype],
            z2.data_ptr(),
            None if g is None else g.data_ptr(),
            None if out is None else out.data_ptr(),
            None if valid is None else valid.data_ptr(),
            site.mean.data_ptr(),
            site.var.data_ptr(),
            float(site.var.mean()),  # sync-ok: CPU; torch's mean, as score_denominator takes it
            int(site.token_count) >= MIN_COUNT,  # sync-ok: CPU
            float(site.threshold),  # sync-ok: CPU
            eps,
            site.accumulator.data_ptr(),
            scratch.data_ptr(),
            scratch[n:].data_ptr(),
            z2.shape[0],
            n,
            2.0 * coef,
            1.0 if loss_scale is None else float(loss_scale),  # sync-ok: CPU
            log_eps,
            self._threads(z2),
        )
        if status != 0:  # unreachable: the dispatcher passes the dtypes of DTYPES
            raise RuntimeError(f"the C tap refused {z.dtype}")
        return grad if out is None else out

    def _scratch(self, neurons: int) -> Tensor:
        """``[4N]`` fp32 scratch for the bar and the sums, one per width."""
        if neurons not in self._scratches:
            self._scratches[neurons] = torch.empty(4 * neurons, dtype=torch.float32)
        return self._scratches[neurons]

    @staticmethod
    def _threads(z: Tensor) -> int:
        return max(1, min(torch.get_num_threads(), z.numel() // MIN_VALUES_PER_THREAD))
