"""The compare experiment's variants: name -> (method, L2EConfig options beyond the defaults)."""

from __future__ import annotations

from typing import Any

from l2e_optim._lab.pretrain import Method

VARIANTS: dict[str, tuple[Method, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "l2e": ("l2e", {}),
    "memel": ("memel", {}),  # the official granularity: each sequence's top-1 (sample-topk)
    "memel/token-topk": ("memel", {"retrieval": "token-topk"}),  # the per-token variant (ablation)
    "l2e/per-position": ("l2e", {"statistics": "per-position"}),
    "l2e/batch-topk": ("l2e", {"retrieval": "batch-topk"}),
    "memel/threshold": ("memel", {"retrieval": "threshold"}),
    "l2e/ratio-1%": ("l2e", {"ratio": 0.01}),
    "l2e/ratio-3%": ("l2e", {"ratio": 0.03}),
    "l2e/mid-third": ("l2e", {"layers": "mid-third"}),
    "l2e/all": ("l2e", {"layers": "all"}),
}
#: Selectable with --variants only (not part of the default compare).
EXTRA_VARIANTS: dict[str, tuple[Method, dict[str, Any]]] = {
    "l2e/strength-1e-4": ("l2e", {"strength": 1e-4}),
    "l2e/strength-1e-2": ("l2e", {"strength": 1e-2}),
    # The control: the same penalty on a random 2% of values, blind to monosemanticity.
    "l2e/random": ("l2e", {"retrieval": "random"}),
    # MEmeL with the official statistics granularity too: one mean/var per (position, neuron).
    "memel/per-position": ("memel", {"statistics": "per-position"}),
}
