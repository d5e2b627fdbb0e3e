"""HLIP CLIP model: hierarchical vision trunk + text tower in one embedding space.

Module names follow the released open_clip checkpoints exactly (``visual.trunk.*``,
``visual.head.proj.weight``, ``text.transformer.*``, ``text.proj.weight``, ``logit_scale``
and, for SigLIP, ``logit_bias``), so those files load with a strict ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_torch_file
from .text import TextTower

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
MAX_LOGIT_SCALE = math.log(100.0)

# Buffers that some transformers versions store in state_dict and others do not.
_VERSION_DEPENDENT_BUFFERS = (
    "text.transformer.embeddings.position_ids",
    "text.transformer.embeddings.token_type_ids",
)


class ProjectionHead(nn.Module):
    """open_clip's TimmModel head with ``timm_proj='linear'``: one bias-free Linear."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=in_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VisualTower(nn.Module):
    """Vision trunk (HierarchicalViT, pooled cls) followed by the projection head."""

    def __init__(self, trunk: nn.Module, embed_dim: int):
        super().__init__()
        self.trunk = trunk
        self.head = ProjectionHead(trunk.embed_dim, embed_dim)

    def forward(self, packed) -> torch.Tensor:
        return self.head(self.trunk.forward_packed(packed))


class HLIPCLIP(nn.Module):
    """Contrastive image-text model over packed studies.

    ``siglip`` adds the learnable ``logit_bias`` and uses SigLIP's initial temperature.
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs both towers under autocast; the
    returned features are always float32.
    """

    def __init__(
        self,
        trunk: nn.Module,
        text: TextTower,
        *,
        siglip: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.visual = VisualTower(trunk, text.proj.out_features)
        self.text = text
        init_scale = SIGLIP_INIT_LOGIT_SCALE if siglip else CLIP_INIT_LOGIT_SCALE
        self.logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS)) if siglip else None
        self.autocast_dtype = autocast_dtype

    @property
    def embed_dim(self) -> int:
        return self.text.proj.out_features

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.logit_scale.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def _finish(features: torch.Tensor, normalize: bool) -> torch.Tensor:
        features = features.float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, packed, normalize: bool = False) -> torch.Tensor:
        """PackedStudies -> [n_studies, E]."""
        with self._autocast():
            features = self.visual(packed.to(self.logit_scale.device))
        return self._finish(features, normalize)

    def encode_text(self, tokens: Mapping[str, torch.Tensor], normalize: bool = False) -> torch.Tensor:
        """dict(input_ids[, attention_mask]) -> [n_texts, E]."""
        device = self.logit_scale.device
        with self._autocast():
            features = self.text(**{key: value.to(device) for key, value in tokens.items()})
        return self._finish(features, normalize)

    def forward(self, packed, tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalised features of both towers plus the loss parameters.

        ``logit_scale`` is returned as the multiplier exp(s), with s clamped at ln(100) as
        CLIP does, so a loss can use it directly.
        """
        out = {
            "image_features": self.encode_image(packed, normalize=True),
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def lock_text(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text encoder except its last ``unlocked_layers`` layers; ``text.proj`` stays trainable."""
        self.text.lock(unlocked_layers, freeze_layer_norm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.trunk.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""


def read_openclip_state_dict(source: str | Path | Mapping) -> dict[str, torch.Tensor]:
    """State dict of a training file {epoch, name, state_dict, optimizer}, a bare state dict or a
    .safetensors file, with the DDP prefix ``module.`` stripped from every key."""
    if isinstance(source, Mapping):
        obj = source
    elif Path(source).suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(source)
    else:
        obj = load_torch_file(source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: not an hlip checkpoint (holds a {type(obj).__name__}, not a state dict)"
        )
    if isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    return {key.removeprefix("module."): value for key, value in obj.items()}


def _describe_mismatch(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    lines = ["checkpoint does not match the model:"]
    for title, keys in (("missing from checkpoint", missing), ("unexpected in checkpoint", unexpected)):
        if keys:
            lines.append(
                f"  {len(keys)} {title}: " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else "")
            )
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatches: " + "; ".join(shapes[:12]))
    if any("lora_" in key or ".base_model.model." in key for key in unexpected):
        lines.append(
            "  the text tower was trained with LoRA (--lora-text); merge the adapters into the weights first"
        )
    if any(key.startswith("visual.trunk.") for key in missing + unexpected):
        lines.append("  check that the vision preset matches the checkpoint (name, scan count, patch size)")
    return "\n".join(lines)


def load_openclip_checkpoint(model: HLIPCLIP, source: str | Path | Mapping) -> None:
    """Load a released/trained open_clip-layout checkpoint strictly into ``model``.

    Accepts what :func:`read_openclip_state_dict` accepts. Buffers whose presence in a
    state dict depends on the transformers version (BERT ``position_ids``) are reconciled;
    any other missing, unexpected or mis-shaped key raises CheckpointMismatchError naming them.
    """
    state = read_openclip_state_dict(source)
    expected = model.state_dict()
    for key in _VERSION_DEPENDENT_BUFFERS:
        if key in state and key not in expected:
            del state[key]
        elif key in expected and key not in state:
            state[key] = expected[key]
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(_describe_mismatch(missing, unexpected, shapes))
    model.load_state_dict(state, strict=True)
