"""Loading published HLIP encoder weights (reference state_dicts and open_clip checkpoints).

The reference encoder is built from timm keyword arguments; ``from_reference`` accepts exactly
those (as listed in a reference constructor call or in ``fixture_a/config.json``), refuses any
that would change the architecture away from what ``HierarchicalViT`` implements, and loads the
state_dict strictly, position tables included.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hlip.model.vision import HierarchicalViT


class CheckpointError(ValueError):
    """A file given as a checkpoint that is not one hlip can load (foreign, damaged, malicious)."""


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` of a checkpoint file, tensors and plain containers only.

    A pickle that would construct other objects (run code: a foreign or malicious file)
    is refused rather than unpickled, and a file that is no torch file at all is named as
    such; both are :class:`CheckpointError`, one line, never the advice to load unsafely.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        text = str(error)
        if "Unsupported global" in text:  # torch refused a pickle that would construct objects
            raise CheckpointError(f"{path}: not an hlip checkpoint (refusing to unpickle code)") from None
        reason = "no torch tensor pickle" if "Weights only load failed" in text else text.splitlines()[0]
        raise CheckpointError(f"{path}: not a checkpoint file ({reason or type(error).__name__})") from None


# Reference keyword -> HierarchicalViT keyword.
_PASSED = {
    "img_size": "img_size",
    "patch_size": "patch_size",
    "embed_dim": "embed_dim",
    "depth": "depth",
    "num_heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "max_num_scans": "max_num_scans",
    "slice_attn_indexes": "slice_attn_indexes",
    "scan_attn_indexes": "scan_attn_indexes",
    "study_attn_indexes": "study_attn_indexes",
    "drop_path_rate": "drop_path_rate",
    "patch_drop_rate": "patch_drop_rate",
    "scan_pos_sampling": "scan_pos_sampling",
    "attn_backend": "attn_backend",
}
# Reference keywords accepted only at the value HierarchicalViT implements (timm defaults or the
# values every published configuration uses).
_FIXED = {
    "in_chans": 1,
    "num_classes": 0,
    "no_embed_class": True,
    "pos_embed": "none",
    "class_token": True,
    "global_pool": "token",
    "embed_layer": "PatchEmbed3D",
    "qk_norm": False,
    "proj_bias": True,
    "init_values": None,
    "reg_tokens": 0,
    "pre_norm": False,
    "final_norm": True,
    "fc_norm": None,
    "drop_rate": 0.0,
    "pos_drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "proj_drop_rate": 0.0,
}


def vision_kwargs(constructor_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Translate reference (timm) constructor arguments to ``HierarchicalViT`` arguments."""
    kwargs = {}
    for key, value in constructor_kwargs.items():
        if key in _PASSED:
            kwargs[_PASSED[key]] = value
        elif key in _FIXED:
            if getattr(value, "__name__", value) != _FIXED[key]:
                raise ValueError(f"{key}={value!r} is not supported (only {_FIXED[key]!r})")
        else:
            raise ValueError(f"unknown reference constructor argument {key!r}")
    return kwargs


def from_reference(
    constructor_kwargs: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> HierarchicalViT:
    """Encoder equivalent to the reference built with ``constructor_kwargs`` and ``state_dict``.

    Raises if any key is missing or unexpected: position tables are loaded, never regenerated.
    """
    model = HierarchicalViT(**vision_kwargs(constructor_kwargs))
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()


def trunk_state_dict(checkpoint: Mapping[str, Any], prefix: str = "visual.trunk.") -> dict[str, Tensor]:
    """The vision trunk's state_dict from a released open_clip training file or its state_dict.

    Accepts the torch.save'd dict ({"state_dict": ...}) or the state_dict itself; strips a leading
    "module." (DDP) from every key, then keeps the keys under ``prefix`` without it.
    """
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    trunk = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not trunk:
        raise KeyError(f"no keys start with {prefix!r}; is this an HLIP/open_clip checkpoint?")
    return trunk
