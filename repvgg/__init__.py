"""RepVGG: multi-branch training-time model, its exact plain twin, a pruned plain model re-branched for fine-tuning,
and loaders for the public checkpoints (official and timm)."""

from .checkpoint import from_state_dict, load_official_state_dict
from .convert import reparameterize
from .graph import channel_groups
from .model import CONFIGS, LayerSpec, RepVGG, RepVGGBlock, create_model, fuse_bn
from .plain import PlainLayer, PlainRepVGG
from .rebranch import RebranchedRepVGG, rebranch
from .temporary_bn import fold_bn, insert_bn

__all__ = [
    "CONFIGS",
    "LayerSpec",
    "PlainLayer",
    "PlainRepVGG",
    "RebranchedRepVGG",
    "RepVGG",
    "RepVGGBlock",
    "channel_groups",
    "create_model",
    "fold_bn",
    "from_state_dict",
    "fuse_bn",
    "insert_bn",
    "load_official_state_dict",
    "rebranch",
    "reparameterize",
]
