"""One neuron site: its state tensors, and the forward hook that places the autograd tap (tap.py).

Statistics are gathered in the *backward* pass, by an identity autograd function placed on the
site's activation. Backward runs exactly once for every micro-batch that trains, whatever the
forward did: activation checkpointing's recomputed forward (reentrant or not) is counted once,
and eval passes, ``no_grad`` and ``inference_mode`` build no graph, so they count nothing. It
also puts the L2E gradient where it belongs: added to the gradient flowing into the activation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from einops import rearrange
from torch import Tensor, nn

from .accumulator import Pending, accumulator_size, pending
from .config import L2EConfig
from .inhibition import reverse_deactivation
from .kernels.dispatch import KernelChooser
from .position import as_sequences
from .selection import retrieve, sample_count, token_statistics
from .tap import _Tap
from .tap_site import TapSite


class SiteState:
    """Live state of one site; its tensors are updated in place at ``step()`` (storage is kept).

    Attributes:
        name: qualified module name, as in ``model.named_modules()``.
        mean: ``[N]`` fp32 running mean of each neuron; per-position statistics: ``[R, N]``, row t
            for position t < R - 1 and the tail row R - 1 for all later positions.
        var: fp32 running unbiased variance, shaped like ``mean``.
        threshold: 0-dim fp32 moving threshold tau on the monosemanticity score.
        count: int64 tokens merged into the statistics so far: 0-dim, or ``[R]`` (per row).
        selected_fraction: 0-dim fp32 fraction of values with score >= tau in the last step.
        nonfinite: 0-dim int64 micro-batches skipped for NaN/inf activations.
    """

    def __init__(
        self,
        name: str,
        neurons: int,
        threshold: float,
        device: torch.device,
        accumulator: Tensor | None = None,
        rows: int | None = None,
    ) -> None:
        self.name = name
        f32, i64 = torch.float32, torch.int64
        stat_shape = (neurons,) if rows is None else (rows, neurons)
        self.mean = torch.empty(stat_shape, dtype=f32, device=device)
        self.var = torch.empty(stat_shape, dtype=f32, device=device)
        self.threshold = torch.empty((), dtype=f32, device=device)
        self.count = torch.empty(stat_shape[:-1], dtype=i64, device=device)
        self.selected_fraction = torch.empty((), dtype=f32, device=device)
        self.nonfinite = torch.empty((), dtype=i64, device=device)
        # Step accumulator: not state (it never outlives a step), so not checkpointed. The wrapper
        # passes a view into one buffer shared by all sites, so the step's all-reduce is one call
        # on that buffer, with no packing or copying back.
        self.accumulator = (
            torch.empty(accumulator_size(neurons, rows), dtype=f32, device=device)
            if accumulator is None
            else accumulator
        )
        # GradScaler's scale when the pending sums were gathered (see drop_stale_sums_); not state.
        self.scale_tag = torch.zeros((), dtype=f32, device=device)
        # The latest compiled forward's sums, in the accumulator's layout; not state, and read by
        # nothing: writing them makes the sums a forward output, which Inductor's partitioner must
        # compute in the forward (see tap._Tap.forward).
        self.forward_sums = torch.zeros_like(self.accumulator)
        self.reset_(threshold)

    @torch.no_grad()
    def reset_(self, threshold: float) -> None:
        """Back to the fresh state, in place: no statistics, threshold ``threshold``, no pending sums."""
        for tensor in self.tensors().values():
            tensor.zero_()
        self.threshold.fill_(threshold)
        self.accumulator.zero_()

    @property
    def neurons(self) -> int:
        """N, the number of neurons of the site."""
        return int(self.mean.shape[-1])

    @property
    def rows(self) -> int | None:
        """R, the number of per-position statistic rows; None for pooled statistics."""
        return None if self.mean.ndim == 1 else int(self.mean.shape[0])

    def pending(self) -> Pending:
        """Named views into this step's accumulator."""
        return pending(self.accumulator, self.neurons, self.rows)

    def tap_site(self, step: Tensor) -> TapSite:
        """The tensors the tap reads and writes, with the wrapper's step count ``step``."""
        return TapSite(self.mean, self.var, self.threshold, self.count, step, self.accumulator, self.forward_sums)

    def tensors(self) -> dict[str, Tensor]:
        """The checkpointed tensors by name."""
        return {
            "mean": self.mean,
            "var": self.var,
            "threshold": self.threshold,
            "count": self.count,
            "selected_fraction": self.selected_fraction,
            "nonfinite": self.nonfinite,
        }

    def __repr__(self) -> str:
        return f"SiteState(name={self.name!r}, neurons={self.neurons})"


class SiteRuntime:
    """What a site's hook reads besides the site: the wrapper's switches and shared tensors."""

    def __init__(self, config: L2EConfig, step: Tensor) -> None:
        self.config = config
        self.step = step
        self.paused = False
        # Set when a site's hook is called on its module, eager or while Dynamo traces it:
        # whether the hooks run at all (see L2EWrapper._check_hooks_ran).
        self.hooks_ran = False
        self.token_mask: Tensor | None = None
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.kernels = KernelChooser(config, step.device)
        # The config is frozen, so the tap's static options are built once, not on every forward.
        coef = config.strength / config.grad_accumulation_steps if config.inhibition == "l2e" else 0.0
        self.tap_options = (
            config.eps,
            config.log_eps,
            coef,
            config.warmup_steps,
            config.resolved_retrieval,
            config.ratio,
            config.memel_topk,
        )

    def set_token_mask(self, mask: Tensor | None) -> None:
        """Check and set the ``[batch, seq]`` token mask (1 = real token) the taps read."""
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}.")
        # Checked where it costs no device sync (a CPU mask, as data loaders make them); on an
        # accelerator the tap reads mask > 0, so a stray value never counts a token twice.
        if mask is not None and mask.device.type == "cpu" and mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):  # sync-ok: a CPU tensor, no device to wait for
                found = sorted(set(mask.flatten().tolist()))[:5]  # sync-ok: the error path of a CPU mask
                raise ValueError(
                    f"token mask values must be 0 (padding) or 1 (real token); got {found}; pass the "
                    "batch's attention_mask."
                )
        self.token_mask = mask

    def loss_scale(self) -> Tensor | None:
        """The registered GradScaler's scale tensor (None without an enabled scaler)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        # The private `_scale` is GradScaler's device tensor, updated in place by update() and
        # load_state_dict(); get_scale() would copy it to the host (a sync) on every forward.
        return scaler._scale


def make_hook(
    module: nn.Module, site: SiteState, runtime: SiteRuntime, tap: str
) -> Callable[..., Any]:
    """The forward (pre-)hook of one site; a closure, so deep copies of the model share it.

    A deep copy of the model (EMA, SWA) carries this very function; it checks module identity
    and does nothing on the copy, so copies never write into the live statistics. The hook holds
    the site and the wrapper's runtime weakly: once the wrapper is gone (its finalizer removes
    the hooks), a hook still reachable (e.g. on a model copy) does nothing and keeps nothing alive.
    """
    owner = weakref.ref(module)
    site_ref, runtime_ref = weakref.ref(site), weakref.ref(runtime)
    name = site.name

    def set_hooks_ran() -> bool:
        live_runtime = runtime_ref()
        if live_runtime is not None:
            live_runtime.hooks_ran = True
        return True

    # Dynamo runs this while tracing and puts its result in the graph as a constant: the flag is
    # set also when the hook is compiled, with no side effect in the traced code (a side effect
    # there made Dynamo give up compiling activation checkpointing around the hook).
    constant = torch.compiler.assume_constant_result  # untyped in torch
    note_call = cast(Callable[[], bool], constant(set_hooks_ran))  # type: ignore[no-untyped-call]

    def live(mod: nn.Module) -> tuple[SiteState, SiteRuntime] | None:
        live_site, live_runtime = site_ref(), runtime_ref()
        if live_site is None or live_runtime is None or mod is not owner():
            return None
        note_call()
        if live_runtime.paused or not mod.training:
            return None
        return live_site, live_runtime

    if tap == "input":

        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            found = live(mod)
            if found is None:
                return None
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(
                    f"L2E site {name!r} expects its activation as the first positional "
                    "argument of the module's forward; pass sites whose input is the activation."
                )
            return (_observe(args[0], *found),) + tuple(args[1:])

        return pre_hook

    def post_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor | None:
        found = live(mod)
        if found is None:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(f"L2E site {name!r} (tap='output') must return a single tensor.")
        return _observe(output, *found)

    return post_hook


def _observe(z: Tensor, site: SiteState, runtime: SiteRuntime) -> Tensor:
    if z.is_complex():
        raise TypeError(
            f"L2E site {site.name!r} got a complex activation ({z.dtype}); monosemanticity "
            "scores are defined for real activations. Point sites at real-valued modules."
        )
    if z.device != site.mean.device:
        raise RuntimeError(
            f"L2E site {site.name!r} keeps its state on {site.mean.device} but its activation "
            f"is on {z.device}: move the model to its device before building the optimizer "
            "and the L2EWrapper (as torch.optim requires too)."
        )
    config = runtime.config
    valid = _flat_mask(runtime.token_mask, z, site.name)
    out = z
    if torch.is_grad_enabled():
        loss_scale = runtime.loss_scale()
        if loss_scale is not None:
            drop_stale_sums_(site.accumulator, site.scale_tag, loss_scale)
        fused = runtime.kernels.choose(z)
        out = _Tap.apply(z, valid, site.tap_site(runtime.step), runtime.tap_options, loss_scale, fused)  # type: ignore[no-untyped-call]
    if config.inhibition == "memel":
        out = _memel(out, valid, site, runtime)
    return out


def drop_stale_sums_(acc: Tensor, tag: Tensor, loss_scale: Tensor) -> None:
    """Zero the pending sums if GradScaler's scale changed since they were gathered; then retag.

    A step GradScaler skips never reaches ``step()``, and a loop that then clears gradients with
    ``model.zero_grad()`` (HF Trainer) never reaches ``opt.zero_grad()`` either: the skipped
    step's sums would be committed with the next step's. The scaler's ``update()`` halves the
    scale after every skipped step and changes it at no other time within a step, so a changed
    scale at a forward means the pending sums belong to discarded gradients. Device-side (a
    masked fill), so no host sync; after a committed step the sums are zero anyway.
    """
    acc.masked_fill_(tag != loss_scale, 0.0)
    tag.copy_(loss_scale)


def _memel(z: Tensor, valid: Tensor | None, site: SiteState, runtime: SiteRuntime) -> Tensor:
    """Reverse Deactivation of the retrieved values (after warm-up, once statistics exist)."""
    config = runtime.config
    z3 = as_sequences(z)  # [sequences, positions, N]
    stats = token_statistics(site.mean, site.var, site.count, config.eps, z3.shape[1])
    d = z3.detach().float() - stats.shift
    phi = (d * d / stats.denom).view(-1, z3.shape[-1])  # [tokens, N]
    selected = retrieve(
        phi, config.resolved_retrieval, site.threshold, config.ratio, config.memel_topk, sample_count(z.shape), valid
    ).view(z3.shape)
    selected = selected & stats.seen & (runtime.step >= config.warmup_steps)
    out = reverse_deactivation(z3, selected, stats.shift, config.memel_scale)
    return out.reshape(z.shape)


def _flat_mask(mask: Tensor | None, z: Tensor, name: str) -> Tensor | None:
    if mask is None:
        return None
    tokens = z.numel() // z.shape[-1]
    if mask.numel() != tokens:
        raise ValueError(
            f"token mask has {mask.numel()} entries but site {name!r} sees {tokens} tokens "
            f"(activation {tuple(z.shape)}); call set_token_mask with this micro-batch's "
            "[batch, seq] attention mask, or set_token_mask(None)."
        )
    # mask > 0: a value other than 0/1 on an accelerator (refused on the CPU by set_token_mask,
    # where checking costs no sync) counts a token once or not at all, never twice or negatively.
    flat = rearrange(mask, "... -> (...)").to(device=z.device)
    return (flat > 0).to(torch.float32)
