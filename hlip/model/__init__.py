"""hlip.model: the HLIP vision trunk (hierarchical ViT, packing) and the CLIP model around it."""

from hlip.model.checkpoint import from_reference, trunk_state_dict
from hlip.model.packing import PackedStudies, pack_studies
from hlip.model.presets import VISION_PRESETS, create_vision
from hlip.model.vision import HierarchicalViT

__all__ = [
    "VISION_PRESETS",
    "HierarchicalViT",
    "PackedStudies",
    "create_vision",
    "from_reference",
    "pack_studies",
    "trunk_state_dict",
]
