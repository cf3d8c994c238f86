"""L2EWrapper: a torch.optim.Optimizer that wraps another and adds L2E to its model."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .amp_forwarding import AmpForwarding
from .base_step import init_hook_dicts, requires_closure, step_without_global_hooks
from .commit import commit_sites, lr_known_nonzero, step_increment
from .config import L2EConfig
from .discovery import SiteSelector, resolve_sites
from .distributed import PendingReduce, start_all_reduce
from .kernels.dispatch import check_kernel
from .layout import accumulator_offsets, build_sites, module_device, relink_accumulators
from .ownership import attach_hooks, check_arguments, detach_hooks
from .site import SiteRuntime, SiteState
from .state_layout import record_name
from .wrapper_state import StateDictMethods

Tap = Literal["input", "output"]


class L2EWrapper(StateDictMethods, AmpForwarding, torch.optim.Optimizer):
    """Wrap ``base_optimizer`` so that training ``model`` inhibits its monosemantic neurons.

    The wrapper is the optimizer the loop (and any LR scheduler) talks to. ``param_groups``,
    ``state`` and ``defaults`` are the base optimizer's own objects. Forward hooks on the sites
    tap the MLP hidden activations; the backward pass gathers each site's statistics and adds
    ``strength * dL_MS/dz`` to the activation's gradient (mode ``"l2e"``); ``step()`` steps the
    base optimizer, then commits statistics and thresholds with no host synchronisation.

    Args:
        base_optimizer: the optimizer to wrap (AdamW, SGD, ...), already built on the params.
        model: the module to hook (wrapped in DDP / compiled or not).
        config: an :class:`L2EConfig`.
        sites: ``None`` discovers the MLP down projections of the blocks chosen by
            ``config.layers``; or the qualified names of the modules to tap; or a callable
            ``(name, module) -> bool``.
        tap: ``"input"`` taps each site module's input (the default sites' hidden activation);
            ``"output"`` taps its output (e.g. an up projection, for pre-activation values).
        process_group: group to all-reduce statistics over (default: the world, when a process
            group is initialised); e.g. the data-parallel group under hybrid sharding.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        config: L2EConfig | None = None,
        sites: Sequence[str] | SiteSelector | None = None,
        tap: Tap = "input",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if isinstance(base_optimizer, L2EWrapper):
            raise TypeError("base_optimizer is already an L2EWrapper; wrap the plain optimizer once.")
        config = check_arguments(base_optimizer, model, config, sites is not None, tap)
        names = resolve_sites(model, sites, config.layers)
        modules = dict(model.named_modules())
        device = module_device(model)
        check_kernel(config, device)

        self._base = base_optimizer
        self._closure_required = requires_closure(base_optimizer)
        init_hook_dicts(self)
        self._patch_step_function()
        self.config = config
        self.process_group = process_group
        self._step_count = torch.zeros((), dtype=torch.int64, device=device)
        self._runtime = SiteRuntime(config, self._step_count)
        self._sites, self._buffers = build_sites(
            modules, names, tap, config.starting_threshold, device, config.statistic_rows
        )
        # Parameters that may carry each site's record in the state dict (state_layout).
        self._site_params = {name: list(modules[name].parameters()) for name in names}
        self._record_names = {name: record_name(model, name) for name in names}
        self._reset_requested = False
        self._handles = attach_hooks(self, modules, self._sites, self._runtime, tap)
        self._last_seen: tuple[float, float] | None = None  # metrics(): (step, tokens seen)
        self._hooks_checked = False  # whether _check_hooks_ran has had its step

    # -- the base optimizer's objects, live (load_state_dict replaces them on the base) --------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's ``param_groups`` (the same list object)."""
        return self._base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._base.param_groups = value

    @property
    def state(self) -> Any:
        """The base optimizer's ``state`` (the same dict object; L2E never writes into it)."""
        return self._base.state

    @state.setter
    def state(self, value: Any) -> None:
        self._base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The base optimizer's ``defaults``."""
        return self._base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._base.defaults = value

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._base

    @property
    def sites(self) -> Mapping[str, SiteState]:
        """Read-only mapping from site name to its live :class:`SiteState`."""
        return MappingProxyType(self._sites)

    @property
    def step_count(self) -> Tensor:
        """0-dim int64 device tensor: optimizer steps committed so far."""
        return self._step_count

    # -- the training step ----------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step the base optimizer, then commit this step's statistics and thresholds.

        ``closure`` (if given) is called once, with grad enabled, before any gradient change;
        its value is returned. A base whose ``step`` requires a closure (LBFGS) gets it and calls
        it as often as it likes; the statistics committed are those gathered since the last
        ``zero_grad()`` (with the usual closure, which starts with ``zero_grad()``, its last
        evaluation's). With a process group, the step's sums are all-reduced (one collective).
        Global optimizer step hooks fire once, with this wrapper as the optimizer.
        """
        # GradScaler's fused path steps every time and tells the base to skip through found_inf;
        # a skipped step must commit nothing (read before the base step, which may consume it).
        found_inf = getattr(self._base, "found_inf", None)
        if self._closure_required:
            if closure is None:
                raise TypeError(f"{type(self._base).__name__}.step needs a closure: call step(closure).")
            loss = step_without_global_hooks(self._base, closure)
            self._commit(start_all_reduce(list(self._buffers.values()), self.process_group), found_inf)
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = start_all_reduce(list(self._buffers.values()), self.process_group)
        step_without_global_hooks(self._base, None)
        self._commit(pending, found_inf)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the base optimizer's gradients and drop this step's gathered statistics with them.

        Statistics live exactly as long as the gradients they came with: a step skipped by
        ``GradScaler`` (``step()`` not called) leaves nothing behind once grads are zeroed.
        """
        self._base.zero_grad(set_to_none=set_to_none)
        with torch.no_grad():
            for buffer in self._buffers.values():
                buffer.zero_()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the base optimizer."""
        self._base.add_param_group(param_group)

    def _commit(self, pending: PendingReduce | None = None, found_inf: Tensor | None = None) -> None:
        if pending is not None:
            pending.wait()
        stepped = None if found_inf is None else found_inf == 0
        if stepped is not None:
            with torch.no_grad():  # zero sums commit nothing: no token, no threshold move
                for buffer in self._buffers.values():
                    buffer.mul_(stepped.to(buffer.device, buffer.dtype))
        increment = step_increment(self._sites.values(), self.param_groups)  # 0: DCP's lr-0 step
        commit_sites(self._sites.values(), self.config)
        if stepped is not None:
            increment = stepped.to(self._step_count.device, torch.int64) * increment
        self._step_count.add_(increment)
        if not self._hooks_checked:
            self._check_hooks_ran()

    def _check_hooks_ran(self) -> None:
        """At the first step with a learning rate: warn if no site's hook was ever called.

        Host-side (a Python flag the hooks set, also while Dynamo traces them), so no device
        sync. Only a step with a learning rate known on the host to be nonzero is judged (as in
        ``step_increment``): ``torch.distributed.checkpoint`` and torchtitan step a fresh
        optimizer at learning rate 0 without any forward to create its state, and a warm-up may
        start at 0. With tensor learning rates only (capturable optimizers) it never judges.
        """
        if not lr_known_nonzero(self.param_groups):
            return
        self._hooks_checked = True
        if self._runtime.hooks_ran or not self._handles:
            return
        warnings.warn(
            f"L2E: an optimizer step was taken, but the hook of none of the {len(self._sites)} sites has "
            "run since the L2EWrapper was built, so nothing is measured or inhibited. Most likely "
            "the model runs code torch.compile traced without these hooks (the model, or another of "
            "its class, was compiled and run before the wrapper was built, or an earlier wrapper's "
            "hooks were traced; Dynamo does not guard on module hooks by default): call "
            "torch._dynamo.reset() before the model's next compiled call, and with several models of "
            "a class compiled in one process set torch._dynamo.config.skip_nnmodule_hook_guards = "
            "False before the first compile (code compiled while it is True keeps matching). Or the "
            "model that is trained is not the one given to the L2EWrapper.",
            RuntimeWarning,
            stacklevel=5,  # the caller of step() (through torch's step-hook wrapper)
        )

    # -- controls -------------------------------------------------------------------------------
    def set_token_mask(self, mask: Tensor | None) -> None:
        """Exclude padded tokens: a ``[batch, seq]`` mask (1 = real token) for the next forwards.

        The mask stays in force (for every micro-batch's forward and its backward) until it is
        replaced or cleared with ``set_token_mask(None)``; pass the batch's ``attention_mask``
        before each forward.
        """
        self._runtime.set_token_mask(mask)

    def set_grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Register the ``torch.amp.GradScaler`` that scales the loss (``None`` unregisters it).

        The L2E gradient is added in backward, next to the loss's gradient, which the scaler has
        multiplied by its scale S; ``unscale_`` then divides every gradient by S. Registered, the
        L2E gradient is multiplied by S too, so it survives ``unscale_`` intact; unregistered, it
        would arrive divided by S. Pass this very wrapper to ``unscale_`` and ``step``.
        """
        if scaler is not None and scaler.is_enabled():
            # scale() creates the scaler's scale tensor on first use; do it now, so that the
            # very first forward already sees it.
            scaler.scale(torch.ones((), device=self._step_count.device))
        self._runtime.grad_scaler = scaler

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within this context the hooks do nothing: no statistics, no inhibition."""
        before = self._runtime.paused
        self._runtime.paused = True
        try:
            yield
        finally:
            self._runtime.paused = before

    def remove_hooks(self) -> None:
        """Detach every hook from the model (idempotent). The state stays readable."""
        detach_hooks(self, self._handles)

    def metrics(self) -> dict[str, float]:
        """Scalars for logging (this is the one method that synchronises with the device).

        Also a check that the hooks run: if optimizer steps were taken since the previous call
        and no site saw a single token, it warns (``RuntimeWarning``) with the likely causes.
        """
        out: dict[str, float] = {"l2e/step": float(self._step_count)}
        for name, site in self._sites.items():
            out[f"l2e/{name}/threshold"] = float(site.threshold)
            out[f"l2e/{name}/selected_fraction"] = float(site.selected_fraction)
            out[f"l2e/{name}/nonfinite_microbatches"] = float(site.nonfinite)
            out[f"l2e/{name}/mean_var"] = float(site.var.mean())
        self._warn_if_blind(out["l2e/step"])
        return out

    def _warn_if_blind(self, step: float) -> None:
        """Warn when steps were taken since the last ``metrics()`` but no site saw a token."""
        seen = sum(float(site.count.sum()) + float(site.nonfinite) for site in self._sites.values())
        last, self._last_seen = self._last_seen, (step, seen)
        if last is None or step <= last[0] or seen != last[1] or self._runtime.paused or not self._handles:
            return
        warnings.warn(
            f"L2E: {step - last[0]:.0f} optimizer steps since the last metrics() call, and none of "
            f"the {len(self._sites)} hooked sites saw a token, so nothing was measured or inhibited. "
            "The hooks did not run: a torch.compile'd model whose graph was traced without them "
            "(build the L2EWrapper before the model's first compiled call, or call "
            "torch._dynamo.reset() before it; with several models of a class compiled, set "
            "torch._dynamo.config.skip_nnmodule_hook_guards = False before the first), a model in "
            "eval() mode or under no_grad while training, steps taken inside opt.paused(), or a "
            "different model than the wrapped one.",
            RuntimeWarning,
            stacklevel=3,
        )

    # -- plumbing -------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """What a deep copy or a pickle holds: the base optimizer and the L2E state, detached.

        Like ``Optimizer.__getstate__``, instance attributes others installed (an LR scheduler's
        patched ``step``, which points back at this very wrapper) and step / state-dict hooks are
        left out. So are the model's hooks, the token mask, the GradScaler and the process group:
        a copy is *detached*: it steps its own copy of the base optimizer and keeps the committed
        statistics (not a step's pending sums: copied parameters carry no gradients either), but
        observes and inhibits nothing. To continue L2E on a copied model, build
        a new wrapper on it and ``load_state_dict(old.state_dict())``.
        """
        return {
            "_base": self._base,
            "config": self.config,
            "_step_count": self._step_count,
            "_sites": self._sites,
            "_buffers": self._buffers,
            "_accumulator_offsets": accumulator_offsets(self._sites, self._buffers),
            "_site_params": self._site_params,
            "_record_names": self._record_names,
            "_reset_requested": self._reset_requested,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        offsets = state.pop("_accumulator_offsets")
        self.__dict__.update(state)
        # Plain pickle does not keep the accumulators as views into the shared buffers. A step's
        # pending sums live as long as its gradients, which copies of parameters do not carry.
        relink_accumulators(self._sites, self._buffers, offsets)
        for buffer in self._buffers.values():
            buffer.zero_()
        init_hook_dicts(self)
        self._patch_step_function()
        self.process_group = None
        self._runtime = SiteRuntime(self.config, self._step_count)
        self._handles = []
        self._last_seen = None
        self._hooks_checked = False
        self._closure_required = requires_closure(self._base)

    def __repr__(self) -> str:
        sites = ", ".join(self._sites)
        base = "\n".join("    " + line for line in repr(self._base).splitlines())
        return (
            f"L2EWrapper(inhibition={self.config.inhibition!r}, ratio={self.config.ratio}, "
            f"strength={self.config.strength}, sites=[{sites}],\n  base=\n{base}\n)"
        )
