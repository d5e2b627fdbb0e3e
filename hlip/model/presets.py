"""Named vision-trunk configurations: the four published HLIP encoders and small CPU ones.

Each preset is a dict of ``HierarchicalViT`` constructor arguments; ``create_vision(name,
**overrides)`` builds one. The published presets reproduce the reference factories' architecture
(their ``pretrained=True`` MAE initialisation is not reproduced: load a released checkpoint).
"""

from __future__ import annotations

from typing import Any

from hlip.model.vision import HierarchicalViT

_VIT_BASE = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True)
_H2_SCAN = dict(
    slice_attn_indexes=(), scan_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10), study_attn_indexes=(2, 5, 8, 11)
)
_BRAIN = dict(img_size=(48, 224, 224), max_num_scans=40)

VISION_PRESETS: dict[str, dict[str, Any]] = {
    # Published (Zch0414/hlip visual_encoder.py factories).
    "vit_base_singlescan_h2_token2744": dict(
        _VIT_BASE,
        img_size=(112, 336, 336),
        patch_size=(8, 24, 24),
        max_num_scans=1,
        slice_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10),
        scan_attn_indexes=(),
        study_attn_indexes=(2, 5, 8, 11),
    ),
    "vit_base_multiscan_h2_token588": dict(_VIT_BASE, **_BRAIN, **_H2_SCAN, patch_size=(16, 16, 16)),
    "vit_base_multiscan_h2_token1176": dict(_VIT_BASE, **_BRAIN, **_H2_SCAN, patch_size=(8, 16, 16)),
    "vit_base_multiscan_h3_token1176": dict(
        _VIT_BASE,
        **_BRAIN,
        patch_size=(8, 16, 16),
        slice_attn_indexes=(0, 3, 6, 9),
        scan_attn_indexes=(1, 4, 7, 10),
        study_attn_indexes=(2, 5, 8, 11),
    ),
    # CPU demo size: 4*6*6 = 144 tokens per scan, scan/scan/study pattern as the published h2.
    "vit_tiny_multiscan_h2": dict(
        embed_dim=192,
        depth=6,
        num_heads=3,
        img_size=(32, 96, 96),
        patch_size=(8, 16, 16),
        max_num_scans=8,
        slice_attn_indexes=(),
        scan_attn_indexes=(0, 1, 3, 4),
        study_attn_indexes=(2, 5),
    ),
    # Test size: every level once (slice, scan, study), 2*2*2 = 8 tokens per scan.
    "vit_nano_multiscan_h3": dict(
        embed_dim=48,
        depth=3,
        num_heads=2,
        img_size=(8, 16, 16),
        patch_size=(4, 8, 8),
        max_num_scans=4,
        slice_attn_indexes=(0,),
        scan_attn_indexes=(1,),
        study_attn_indexes=(2,),
    ),
}


def create_vision(name: str, **overrides: Any) -> HierarchicalViT:
    """Build the trunk of preset ``name``; ``overrides`` replace or add constructor arguments."""
    if name not in VISION_PRESETS:
        raise KeyError(f"unknown vision preset {name!r}; known: {sorted(VISION_PRESETS)}")
    return HierarchicalViT(**{**VISION_PRESETS[name], **overrides})
