"""Where the L2E state sits in the wrapper's state dict (layout 2), and how it comes back out.

``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only ``state`` and
``param_groups`` of ``optimizer.state_dict()`` and re-keys every state entry by its parameter's
FQN; any other top-level key is dropped. So each site's tensors ride in the state entry of a
parameter the site owns (its module's first trainable parameter in the optimizer; else the
optimizer's first), under the key ``"l2e"``::

    state[pid]["l2e"] = {"format_version": 2, "sites": {site: {"mean": ..., ..., "step": ...}}}

They are plain tensors, replicated like AdamW's ``step`` under FSDP2: every rank holds the same
values after each step's all-reduce, DCP writes one copy and every rank reads it back whole, on
any number of ranks. Only the *output* carries them: :func:`split_l2e_state` strips them before
the base optimizer sees the entry, so ``base.state[p]`` never holds an L2E key (AdamW's lazy
init tests ``len(state) == 0``). The top-level ``"l2e"`` entry keeps only the format version and
the config (for the differing-config warning); DCP drops it and loses nothing else.

Layout 1 (before this module) kept everything in the top-level ``"l2e"`` entry; such state
dicts and checkpoint files still load. Everything here is plain dict work: validating the
tensors is ``state_dict.validate_l2e_state``'s job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .state_dict import L2E_KEY, SITE_TENSORS, CheckpointError

LAYOUT_VERSION = 2
LEGACY_VERSION = 1  # everything in the top-level entry; still loadable
STEP = "step"  # the wrapper's step count, repeated in every site's record

MISSING_L2E = (
    "the optimizer state dict has no L2E entries (saved from a plain optimizer, or through a path "
    "that drops per-parameter state keys, such as flatten_optimizer_state_dict=True); loading it "
    "would restart every site's statistics and threshold. To load the base state and restart L2E "
    "on purpose, pass reset_l2e=True to load_state_dict, or call reset_l2e_state() first (for "
    "loaders that call load_state_dict for you: set_optimizer_state_dict, Trainer, accelerate); "
    "for a flat (torchtitan-style) state dict, load its L2E part with load_flat_l2e_state."
)


# Attributes through which wrappers hold the module they wrap (torch.compile, FSDP1, activation
# checkpointing); DCP leaves them out of FQNs, and so do the record names.
_WRAPPER_ATTRIBUTES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def record_name(model: nn.Module, name: str) -> str:
    """The name a site's record is saved under: its module name without wrapper prefixes.

    DDP's ``module.``, torch.compile's ``_orig_mod.``, FSDP1's and activation checkpointing's
    prefixes are dropped, as DCP drops them from parameter FQNs, so a record saved under DDP
    loads into the bare model (and the other way round).
    """
    parts: list[str] = []
    current: nn.Module | None = model
    for part in name.split("."):
        wrapped = isinstance(current, DistributedDataParallel) and part == "module"
        if not wrapped and part not in _WRAPPER_ATTRIBUTES:
            parts.append(part)
        current = getattr(current, part, None)
    return ".".join(parts)


def param_ids(param_groups: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """``id(param) -> index`` as ``Optimizer.state_dict`` numbers them (first occurrence wins)."""
    ids: dict[int, int] = {}
    start = 0
    for group in param_groups:
        for offset, param in enumerate(group["params"]):
            ids.setdefault(id(param), start + offset)
        start += len(group["params"])
    return ids


def site_owners(
    param_groups: Sequence[Mapping[str, Any]], candidates: Mapping[str, Sequence[Tensor]]
) -> dict[str, int]:
    """For each site, the state-dict id of the parameter whose entry carries its tensors.

    The site module's first trainable parameter in the optimizer (so the record travels with its
    layer when a checkpoint is resharded over pipeline stages); else the optimizer's first
    trainable parameter. DCP re-keys only entries of parameters that require grad.
    """
    ids = param_ids(param_groups)
    trainable = [p for group in param_groups for p in group["params"] if p.requires_grad]
    if not trainable:
        raise CheckpointError("state: the optimizer has no trainable parameter to carry the L2E state")
    fallback = ids[id(trainable[0])]
    owners = {}
    for name, params in candidates.items():
        own = [ids[id(p)] for p in params if p.requires_grad and id(p) in ids]
        owners[name] = own[0] if own else fallback
    return owners


def attach_l2e_state(
    base: Mapping[str, Any],
    entry: Mapping[str, Any],
    param_groups: Sequence[Mapping[str, Any]],
    candidates: Mapping[str, Sequence[Tensor]],
    names: Mapping[str, str],
) -> dict[str, Any]:
    """The wrapper's state dict: ``base`` plus each site's record in its owner's state entry.

    ``entry`` is ``pack_l2e_state``'s ``{"config", "step", "sites"}``; ``candidates`` are each
    site's parameters (:func:`site_owners`), ``names`` its :func:`record_name`. Entries are copied
    before a key is added: ``Optimizer.state_dict()`` hands out the live ``base.state[p]`` dicts.
    """
    owners = site_owners(param_groups, candidates)
    out = dict(base)
    state = dict(out.get("state", {}))
    if not state:
        # A stateless base (SGD without momentum): DCP's set_optimizer_state_dict wants an entry
        # for every trainable parameter once any entry exists, and the records make some exist.
        # Empty entries are dropped again on load.
        ids = param_ids(param_groups)
        state = {ids[id(p)]: {} for group in param_groups for p in group["params"] if p.requires_grad}
    for name, tensors in entry["sites"].items():
        pid = owners[name]
        param_entry = dict(state.get(pid, {}))
        carried = param_entry.get(L2E_KEY) or {"format_version": LAYOUT_VERSION, "sites": {}}
        carried["sites"][names[name]] = {**tensors, STEP: entry["step"].clone()}
        param_entry[L2E_KEY] = carried
        state[pid] = param_entry
    out["state"] = state
    out[L2E_KEY] = {"format_version": LAYOUT_VERSION, "config": entry["config"]}
    return out


def split_l2e_state(
    state_dict: Mapping[str, Any], names: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(base state dict, L2E entry or None)``; the input is not modified.

    The entry has ``pack_l2e_state``'s shape (``config`` may be None: DCP drops it), its sites
    keyed by the live names of ``names`` (site -> record name); records of other names keep
    theirs. Layout 1's top-level entry is returned as it is. Raises CheckpointError for an
    unknown format version, a site carried twice, or records whose step counts differ.
    """
    base = dict(state_dict)
    top = base.pop(L2E_KEY, None)
    records: dict[str, tuple[str, Any]] = {}
    state = base.get("state")
    if isinstance(state, Mapping):
        base["state"] = _strip_records(state, records, _listed_ids(base.get("param_groups")))
    if top is not None and not isinstance(top, Mapping):
        raise CheckpointError(f"{L2E_KEY}: expected a dict, got {type(top).__name__}")
    version = top.get("format_version") if top is not None else LAYOUT_VERSION
    if version == LEGACY_VERSION and top is not None:
        if records:
            raise CheckpointError(f"{L2E_KEY}: L2E state in both layouts (top level and parameter entries)")
        return base, {k: v for k, v in top.items() if k != "format_version"}
    if version != LAYOUT_VERSION:
        raise CheckpointError(
            f"{L2E_KEY}.format_version: {version!r} is not a supported version "
            f"({LEGACY_VERSION} or {LAYOUT_VERSION}); use the l2e_optim release that saved it"
        )
    if not records:
        return base, None
    config = top.get("config") if top is not None else None
    live = {record: name for name, record in names.items()}
    return base, _entry_from_records({live.get(k, k): v for k, v in records.items()}, config)


def flat_l2e_entry(flat: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any] | None:
    """The L2E entry carried in a flat, FQN-keyed optimizer state dict, or None if it has none.

    Keys look like ``state.<fqn>.l2e.sites.<site>.<tensor>`` (what torch's
    ``flatten_optimizer_state_dict=True`` and torchtitan's ``get_flat_optim_state_dict`` make of
    the records). Record names contain dots, so keys are matched against the live sites' record
    names (``names``: site -> record name); the entry is keyed by the live names.
    """
    keys = (*SITE_TENSORS, STEP)
    records: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, record in names.items():
        for key in keys:
            suffix = f".{L2E_KEY}.sites.{record}.{key}"
            found = [flat_key for flat_key in flat if flat_key.startswith("state.") and flat_key.endswith(suffix)]
            if len(found) > 1:
                raise CheckpointError(f"{found[1]}: site {name!r} is carried by two parameters")
            if found:
                path = found[0].removesuffix(f".{key}")
                records.setdefault(name, (path, {}))[1][key] = flat[found[0]]
    if not records:
        return None
    return _entry_from_records(records, None)


def _listed_ids(groups: Any) -> set[Any]:
    """The parameter ids the saved groups list (none if malformed: validation says so later)."""
    if not isinstance(groups, list):
        return set()
    lists = [g.get("params") for g in groups if isinstance(g, Mapping)]
    return {pid for ids in lists if isinstance(ids, list) for pid in ids if isinstance(pid, (int, str))}


def _strip_records(state: Mapping[Any, Any], records: dict[str, tuple[str, Any]], listed: set[Any]) -> dict[Any, Any]:
    """Copy of ``state`` without the L2E records (into ``records``: site -> (path, record)) and
    without the empty entries of listed parameters (to a base optimizer the same as none)."""
    out: dict[Any, Any] = {}
    for pid, entry in state.items():
        if isinstance(entry, Mapping) and not entry and pid in listed:
            continue  # attach_l2e_state's, for a stateless base
        if not (isinstance(entry, Mapping) and L2E_KEY in entry):
            out[pid] = entry
            continue
        carried = entry[L2E_KEY]
        prefix = f"state.{pid}.{L2E_KEY}"
        if not isinstance(carried, Mapping) or not isinstance(carried.get("sites"), Mapping):
            raise CheckpointError(f"{prefix}: expected a dict with a 'sites' dict")
        if carried.get("format_version") != LAYOUT_VERSION:
            raise CheckpointError(
                f"{prefix}.format_version: {carried.get('format_version')!r} is not the supported "
                f"version {LAYOUT_VERSION}; use the l2e_optim release that saved it"
            )
        for name, record in carried["sites"].items():
            if name in records:
                raise CheckpointError(f"{prefix}.sites.{name}: site carried by two parameters")
            records[name] = (f"{prefix}.sites.{name}", record)
        rest = {k: v for k, v in entry.items() if k != L2E_KEY}
        if rest:  # an entry that held only L2E records was not the base's: drop it
            out[pid] = rest
    return out


def _entry_from_records(records: Mapping[str, tuple[str, Any]], config: Any) -> dict[str, Any]:
    """``pack_l2e_state``'s shape from per-site records that each repeat the step count.

    ``paths`` and ``step_path`` say where each record sat, so that validation errors name the key;
    ``other_steps`` are the other records' copies of the step, which must agree.
    """
    sites: dict[str, Any] = {}
    paths: dict[str, str] = {}
    steps: list[tuple[str, Any]] = []  # (path, value)
    for name, (path, record) in records.items():
        if not isinstance(record, Mapping):
            raise CheckpointError(f"{path}: expected a dict of tensors")
        sites[name] = {k: v for k, v in record.items() if k != STEP}
        paths[name] = path
        steps.append((f"{path}.{STEP}", record.get(STEP)))
    (step_path, step), others = steps[0], steps[1:]
    entry = {"config": config, "step": step, "sites": sites, "paths": paths, "step_path": step_path}
    entry["other_steps"] = others  # every record repeats the step: validation checks they agree
    return entry
