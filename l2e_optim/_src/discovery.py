"""Finding neuron sites: the modules whose input is a transformer MLP's hidden activation.

A *block list* is an ``nn.ModuleList``/``nn.Sequential`` of same-class children (the transformer
blocks); in each block the site is the *down projection*: the linear-like module (``nn.Linear`` or
Hugging Face ``Conv1D``) with ``in_features > out_features`` and the most ``in_features``. That
finds GPT-NeoX's ``dense_4h_to_h``, GPT-2's ``mlp.c_proj``, Llama's ``down_proj``, BERT's
``output.dense`` and ``nn.TransformerEncoderLayer.linear2`` with no per-model code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .config import LayerChoice

SiteSelector = Callable[[str, nn.Module], bool]


class SiteDiscoveryError(ValueError):
    """No neuron site could be found, or a named site does not exist."""


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.ndim == 2:  # transformers' Conv1D stores [in, out]
            return int(weight.shape[0]), int(weight.shape[1])
    return None


def site_width(module: nn.Module, tap: str) -> int | None:
    """Number of neurons seen at the module's input (``tap="input"``) or output."""
    features = linear_features(module)
    if features is None:
        return None
    return features[0] if tap == "input" else features[1]


def down_projections(block: nn.Module, prefix: str) -> list[str]:
    """Qualified names of the block's MLP output projection(s) (several for mixture-of-experts)."""
    found = []
    for name, module in block.named_modules(prefix=prefix):
        features = linear_features(module)
        if features is not None and features[0] > features[1]:
            found.append((name, features[0]))
    if not found:
        return []
    widest = max(width for _, width in found)
    return [name for name, width in found if width == widest]


def find_block_list(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """The outermost, longest list of same-class blocks that each hold a down projection."""
    candidates: list[tuple[str, list[nn.Module]]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        blocks = list(module)
        if len({type(b) for b in blocks}) != 1:
            continue
        if all(down_projections(b, "") for b in blocks):
            candidates.append((name, blocks))
    outermost = [
        (name, blocks)
        for name, blocks in candidates
        if not any(name.startswith(other + ".") for other, _ in candidates if other != name)
    ]
    if not outermost:
        return None
    return max(outermost, key=lambda item: len(item[1]))


def select_blocks(num_blocks: int, layers: LayerChoice) -> list[int]:
    """Block indices for ``L2EConfig.layers`` in a model of ``num_blocks`` blocks."""
    n = num_blocks
    if layers == "all":
        return list(range(n))
    if layers == "mid-2":
        return [0] if n == 1 else [n // 2 - 1, n // 2]
    if layers == "mid-third":
        low = n // 3
        return list(range(low, max(low + 1, (2 * n) // 3)))
    assert isinstance(layers, tuple)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise SiteDiscoveryError(
            f"layers={layers} has block indices {bad} outside the model's {n} blocks "
            f"(valid: 0..{n - 1}, or negative from the end)."
        )
    return sorted(i % n for i in layers)


def discover_sites(model: nn.Module, layers: LayerChoice) -> list[str]:
    """Site names for ``sites=None``; raises SiteDiscoveryError saying what was searched."""
    found = find_block_list(model)
    if found is None:
        raise SiteDiscoveryError(
            f"no transformer MLP found in {type(model).__name__}: searched every nn.ModuleList / "
            "nn.Sequential of same-class blocks for a down projection (nn.Linear or Conv1D with "
            "in_features > out_features). Pass sites by hand: L2EWrapper(opt, model, sites=[...]) "
            "with the qualified names (as in model.named_modules()) of the modules whose input is "
            "the MLP hidden activation, or a callable (name, module) -> bool."
        )
    list_name, blocks = found
    names: list[str] = []
    for index in select_blocks(len(blocks), layers):
        prefix = f"{list_name}.{index}" if list_name else str(index)
        names.extend(down_projections(blocks[index], prefix))
    return names


def resolve_sites(
    model: nn.Module, sites: Sequence[str] | SiteSelector | None, layers: LayerChoice
) -> list[str]:
    """Turn the ``sites`` argument into a non-empty list of qualified module names."""
    if sites is None:
        return discover_sites(model, layers)
    modules = dict(model.named_modules())
    if callable(sites):
        names = [name for name, module in modules.items() if name and sites(name, module)]
        if not names:
            raise SiteDiscoveryError(
                "the sites callable selected no module; it is called as (name, module) for every "
                "entry of model.named_modules()."
            )
        return names
    if isinstance(sites, str):
        raise SiteDiscoveryError(f"sites={sites!r} must be a list of names, not one string: [{sites!r}].")
    names = list(sites)
    missing = [name for name in names if name not in modules]
    if missing:
        raise SiteDiscoveryError(
            f"sites {missing} are not modules of {type(model).__name__}; names must match "
            "model.named_modules(), e.g. " + ", ".join(list(modules)[1:4]) + " ..."
        )
    if not names:
        raise SiteDiscoveryError("sites=[] selects nothing; pass None to discover sites.")
    if len(set(names)) != len(names):
        raise SiteDiscoveryError(f"sites {names} name a module twice.")
    return names
