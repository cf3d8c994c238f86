"""l2e_optim: inhibit monosemantic neurons during pretraining (L2E), as a torch.optim wrapper.

The public API is exactly ``__all__``; everything under ``l2e_optim._src`` is private.
"""

from ._src.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from ._src.config import ConfigError, L2EConfig
from ._src.discovery import SiteDiscoveryError
from ._src.metrics import false_killing_rate, neuron_features, position_shares
from ._src.selection import monosemanticity_scores
from ._src.site import SiteState
from ._src.state_dict import CheckpointError
from ._src.wrapper import L2EWrapper

__all__ = [
    "CheckpointError",
    "ConfigError",
    "L2EConfig",
    "L2EWrapper",
    "LoadedCheckpoint",
    "SiteDiscoveryError",
    "SiteState",
    "false_killing_rate",
    "load_checkpoint",
    "monosemanticity_scores",
    "neuron_features",
    "position_shares",
    "save_checkpoint",
]

__version__ = "0.1.0"
