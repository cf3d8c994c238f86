"""The wrapper's state-dict methods: ``state_dict``, ``load_state_dict`` and the L2E resets.

A mixin of :class:`L2EWrapper`, apart so that the wrapper stays readable. Where the L2E state
sits in the dict is ``state_layout``'s business; what is valid is ``state_dict``'s.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base_state import validate_base_state
from .config import L2EConfig
from .site import SiteState
from .state_dict import CheckpointError, load_l2e_state, pack_l2e_state, validate_l2e_state
from .state_layout import MISSING_L2E, attach_l2e_state, flat_l2e_entry, split_l2e_state


class StateDictMethods:
    """``state_dict`` / ``load_state_dict`` of the wrapper (what it needs is declared below)."""

    _base: torch.optim.Optimizer
    config: L2EConfig
    _step_count: Tensor
    _sites: dict[str, SiteState]
    _site_params: dict[str, list[Tensor]]  # site -> its module's parameters (record carriers)
    _record_names: dict[str, str]  # site -> the name its record is saved under
    _reset_requested: bool
    _optimizer_state_dict_pre_hooks: OrderedDict[int, Any]
    _optimizer_state_dict_post_hooks: OrderedDict[int, Any]
    _optimizer_load_state_dict_pre_hooks: OrderedDict[int, Any]
    _optimizer_load_state_dict_post_hooks: OrderedDict[int, Any]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, each site's L2E tensors in a parameter's state entry.

        The records ride where ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``
        keeps them (docs/checkpointing.md); plain types and tensors only.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        entry = pack_l2e_state(self.config, self._step_count, self._sites)
        groups = self._base.param_groups
        out = attach_l2e_state(self._base.state_dict(), entry, groups, self._site_params, self._record_names)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any], *, reset_l2e: bool = False) -> None:
        """Load a state dict from :meth:`state_dict` (this or the older layout, also via DCP).

        Validated in full before anything changes (docs/checkpointing.md lists the checks, the
        last a trial load into a scratch copy of the base optimizer); on error
        (:class:`CheckpointError`) the wrapper and the base optimizer are left as they were. A
        state dict without L2E records (a plain optimizer's) is an error, unless
        ``reset_l2e=True`` (or :meth:`reset_l2e_state` was called since the last load): then
        the base state loads and L2E starts afresh.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = dict(pre_hook(self, state_dict) or state_dict)
        self._load_validated(*self._validate_load(state_dict, reset_l2e or self._reset_requested))

    def _validate_load(self, state_dict: Mapping[str, Any], reset: bool) -> tuple[dict[str, Any], Any]:
        """The base part and the L2E entry (None: reset) of ``state_dict``, validated once."""
        try:
            base_state, l2e = split_l2e_state(state_dict, self._record_names)
            validate_base_state(base_state, self._base)
            if reset:
                return base_state, None
            if l2e is None:
                raise CheckpointError(MISSING_L2E)
            validate_l2e_state(l2e, self.config, self._sites)
        except CheckpointError:
            raise
        except Exception as error:  # a state shaped to trip a check itself; nothing has changed
            raise CheckpointError(f"cannot be validated ({type(error).__name__}: {error})") from error
        return base_state, l2e

    def _load_validated(self, base_state: dict[str, Any], l2e: Any) -> None:
        """Apply what :meth:`_validate_load` passed (load_checkpoint's path too): no checks again."""
        self._base.load_state_dict(base_state)
        with torch.no_grad():
            if l2e is not None:
                load_l2e_state(l2e, self._step_count, self._sites)
            else:
                self._reset_state()
        self._reset_requested = False
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def load_flat_l2e_state(self, flat_state_dict: Mapping[str, Any]) -> None:
        """Load the L2E records of a flat, FQN-keyed optimizer state dict (torchtitan's format).

        Unflattening such a dict (torch's ``flatten_optimizer_state_dict=True``, torchtitan's
        ``load_flat_optim_state_dict``) keeps only the keys the base optimizer's live state has,
        so the records are found by name here: load the base part into ``base_optimizer``, then
        call this. Validated first; raises :class:`CheckpointError` if the dict holds none.
        """
        entry = flat_l2e_entry(flat_state_dict, self._record_names)
        if entry is None:
            raise CheckpointError(MISSING_L2E)
        validate_l2e_state(entry, self.config, self._sites)
        with torch.no_grad():
            load_l2e_state(entry, self._step_count, self._sites)
        self._reset_requested = False

    def reset_l2e_state(self) -> None:
        """Restart L2E: no statistics, the starting threshold, step 0 (the base is untouched).

        The next ``load_state_dict`` then accepts a state dict without L2E records, for loaders
        that call it for you (``set_optimizer_state_dict``, HF Trainer, accelerate).
        """
        with torch.no_grad():
            self._reset_state()
        self._reset_requested = True

    def _reset_state(self) -> None:
        self._step_count.zero_()
        for site in self._sites.values():
            site.reset_(self.config.starting_threshold)
