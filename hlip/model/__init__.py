"""hlip.model: the HLIP vision trunk (hierarchical ViT, packing) and the CLIP model around it."""

from hlip.model.checkpoint import from_reference, trunk_state_dict
from hlip.model.clip import HLIPCLIP, CheckpointMismatchError, load_openclip_checkpoint
from hlip.model.factory import MODEL_PRESETS, create_model, resolve_model_config
from hlip.model.losses import ClipLoss, SigLipLoss, create_loss
from hlip.model.packing import PackedStudies, pack_studies
from hlip.model.presets import VISION_PRESETS, create_vision
from hlip.model.text import TextTower, Tokenizer, default_text_model_dir
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
