"""Where sites live: their widths, devices, state and the shared step-accumulator buffers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .discovery import SiteDiscoveryError, site_width
from .accumulator import accumulator_size
from .site import SiteState


def build_sites(
    modules: Mapping[str, nn.Module],
    names: Sequence[str],
    tap: str,
    threshold: float,
    default: torch.device,
    rows: int | None = None,
) -> tuple[dict[str, SiteState], dict[torch.device, Tensor]]:
    """A fresh :class:`SiteState` per name, their accumulators views into one buffer per device.

    ``rows``: per-position statistic rows (None: pooled); the accumulators hold per-row sums, so
    per-position statistics still take one all-reduce per step.

    One buffer per device (one, unless a single process spreads the model over several devices)
    lets the step's all-reduce run on it directly: no packing, no copying back.
    """
    widths = {name: _width(name, modules[name], tap) for name in names}
    devices = {name: module_device(modules[name], default) for name in names}
    sizes: dict[torch.device, int] = {}
    for name in names:
        sizes[devices[name]] = sizes.get(devices[name], 0) + accumulator_size(widths[name], rows)
    buffers = {where: torch.zeros(size, dtype=torch.float32, device=where) for where, size in sizes.items()}
    offsets = dict.fromkeys(buffers, 0)
    sites = {}
    for name in names:
        where, size = devices[name], accumulator_size(widths[name], rows)
        view = buffers[where][offsets[where] : offsets[where] + size]
        offsets[where] += size
        sites[name] = SiteState(name, widths[name], threshold, where, accumulator=view, rows=rows)
    return sites, buffers


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """Device of the module's first parameter (or buffer); ``default`` (else CPU) if it has none."""
    for param in module.parameters():
        return param.device
    for buffer in module.buffers():
        return buffer.device
    return default if default is not None else torch.device("cpu")


def _width(name: str, module: nn.Module, tap: str) -> int:
    width = site_width(module, tap)
    if width is None:
        raise SiteDiscoveryError(
            f"cannot tell the number of neurons of site {name!r} ({type(module).__name__}); point "
            "sites at linear layers: the down projection (tap='input') or the up projection "
            "(tap='output')."
        )
    return width


def accumulator_offsets(sites: Mapping[str, SiteState], buffers: Mapping[torch.device, Tensor]) -> dict[str, int]:
    """Where each site's accumulator starts in its device's buffer (elements)."""
    return {
        name: int(site.accumulator.storage_offset() - buffers[site.accumulator.device].storage_offset())
        for name, site in sites.items()
    }


def relink_accumulators(
    sites: Mapping[str, SiteState], buffers: Mapping[torch.device, Tensor], offsets: Mapping[str, int]
) -> None:
    """Make each site's accumulator a view into its buffer again (after a plain pickle round trip)."""
    for name, site in sites.items():
        start = offsets[name]
        site.accumulator = buffers[site.mean.device][start : start + accumulator_size(site.neurons, site.rows)]
