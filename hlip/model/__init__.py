"""hlip.model: the HLIP vision trunk (hierarchical ViT, packing) and the CLIP model around it."""

import importlib

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
    "MODEL_PRESETS",
    "CheckpointMismatchError",
    "ClipLoss",
    "HLIPCLIP",
    "SigLipLoss",
    "TextTower",
    "Tokenizer",
    "create_loss",
    "create_model",
    "default_text_model_dir",
    "load_openclip_checkpoint",
    "resolve_model_config",
]

# The CLIP side imports transformers (seconds); it loads on first use so that code needing only the
# vision trunk or packing (data-loader workers, the vision tests) does not pay for it.
_LAZY = {
    "hlip.model.clip": ("HLIPCLIP", "CheckpointMismatchError", "load_openclip_checkpoint"),
    "hlip.model.factory": ("MODEL_PRESETS", "create_model", "resolve_model_config"),
    "hlip.model.losses": ("ClipLoss", "SigLipLoss", "create_loss"),
    "hlip.model.text": ("TextTower", "Tokenizer", "default_text_model_dir"),
}


def __getattr__(name: str):
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'hlip.model' has no attribute {name!r}")
