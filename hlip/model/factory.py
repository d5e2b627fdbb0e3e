"""Named model configurations and the one factory that builds (model, tokenizer) from them.

A model config is a plain, JSON-serialisable dict (so a training run can store the resolved
config next to its checkpoint and rebuild the exact model later):

    vision:  {"name": <hlip.model.presets name>, **constructor overrides}
    embed_dim: joint embedding width
    text:    {"path": local HF model dir or None (= built-in MiniLM),
              "requires": None, or the text model a preset was trained with (then "path" is mandatory),
              "pooling": "cls" | "mean", "context_length": int,
              "sentence_mean": bool (a report = mean of its sentences' embeddings; see text.Tokenizer),
              "drop_measurements": bool (texts read without their sizes; see text.drop_measurements)}
    loss:    "clip" | "siglip"
    precision: "fp32" | "bf16" (autocast)     grad_checkpointing: bool
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch

from .clip import HLIPCLIP
from .presets import create_vision
from .text import TextTower, Tokenizer, load_text_config

BIOMEDBERT = "BiomedBERT (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext)"
CXR_BERT = "CXR-BERT (microsoft/BiomedVLP-CXR-BERT-specialized)"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
LOSSES = ("clip", "siglip")


def _config(vision: dict, embed_dim: int, requires: str | None, pooling: str, context_length: int) -> dict:
    return {
        "vision": vision,
        "embed_dim": embed_dim,
        "text": {
            "path": None,
            "requires": requires,
            "pooling": pooling,
            "context_length": context_length,
            "sentence_mean": False,
            "drop_measurements": False,
        },
        "loss": "clip",
        "precision": "fp32",
        "grad_checkpointing": False,
    }


def _published(vision: str) -> dict:
    """The released open_clip configs (drop path 0.2; BiomedBERT with 256 tokens, except CXR-BERT
    with 512 tokens for the CT-RATE model)."""
    trunk = {"name": vision, "drop_path_rate": 0.2}
    if "singlescan" in vision:
        return _config(trunk, 512, CXR_BERT, "cls", 512)
    return _config(trunk, 512, BIOMEDBERT, "cls", 256)


PUBLISHED = (
    "vit_base_multiscan_h2_token588",
    "vit_base_multiscan_h2_token1176",
    "vit_base_multiscan_h3_token1176",
    "vit_base_singlescan_h2_token2744",
)

MODEL_PRESETS: dict[str, dict] = {
    "hlip-demo-cpu": _config({"name": "vit_tiny_multiscan_h2"}, 128, None, "mean", 128),
    "hlip-ct-rate": _published("vit_base_singlescan_h2_token2744"),
    "hlip-brain-mri": _published("vit_base_multiscan_h2_token1176"),
    **{name: _published(name) for name in PUBLISHED},
}


def _merge(base: dict, overrides: Mapping) -> dict:
    """Overrides replace top-level values; the nested ``vision``/``text`` dicts are updated key by key."""
    unknown = overrides.keys() - base.keys()
    if unknown:
        raise TypeError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(base)}")
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(merged[key], dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _missing_text_model(name: str, requires: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"model {name!r} uses the text encoder {requires}, which hlip never downloads. Put a local copy "
        "(config.json, tokenizer files, weights) in a directory and pass it with --text-model DIR "
        "(Python: create_model(..., text_path=DIR)). To run without one, use the 'hlip-demo-cpu' model, "
        "whose MiniLM text encoder ships with hlip."
    )


def resolve_model_config(name: str | Mapping, *, text_path: str | Path | None = None, **overrides) -> dict:
    """The complete config of a preset name or a stored config dict, with overrides applied."""
    label, base = (
        (name, MODEL_PRESETS.get(name)) if isinstance(name, str) else (name["vision"]["name"], dict(name))
    )
    if base is None:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODEL_PRESETS)}")
    config = _merge(base, overrides)
    for option in ("sentence_mean", "drop_measurements"):  # configs stored before the options existed
        config["text"].setdefault(option, False)
    if text_path is not None:
        config["text"]["path"] = str(text_path)
    if config["text"]["path"] is None and config["text"]["requires"]:
        raise _missing_text_model(label, config["text"]["requires"])
    if config["loss"] not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {config['loss']!r}")
    if config["precision"] not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {config['precision']!r}")
    return config


def create_model(
    name: str | Mapping, *, text_path: str | Path | None = None, pretrained_text: bool = True, **overrides
) -> tuple[HLIPCLIP, Tokenizer]:
    """Build (HLIPCLIP, Tokenizer) from a preset name (see MODEL_PRESETS) or a stored config dict.

    ``text_path``: local directory of the text model (required by presets trained with
    BiomedBERT/CXR-BERT; optional otherwise, default the built-in MiniLM).
    ``pretrained_text=False`` builds the text encoder from its config only, for when a
    checkpoint will supply every weight. Other keyword arguments override config entries,
    e.g. ``embed_dim=256, loss="siglip", vision={"patch_drop_rate": 0.5}, precision="bf16"``.
    The resolved config is kept as ``model.model_config`` so that a run can store it.
    """
    config = resolve_model_config(name, text_path=text_path, **overrides)
    text_cfg = config["text"]
    _check_context_length(text_cfg)
    vision_kwargs = {k: v for k, v in config["vision"].items() if k != "name"}
    trunk = create_vision(config["vision"]["name"], **vision_kwargs)
    build_text = TextTower.from_pretrained if pretrained_text else TextTower.from_config
    text = build_text(text_cfg["path"], config["embed_dim"], text_cfg["pooling"])
    model = HLIPCLIP(
        trunk, text, siglip=config["loss"] == "siglip", autocast_dtype=PRECISIONS[config["precision"]]
    )
    if config["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    model.model_config = config
    tokenizer = Tokenizer(
        text_cfg["path"], text_cfg["context_length"], text_cfg["sentence_mean"], text_cfg["drop_measurements"]
    )
    return model, tokenizer


def _check_context_length(text_cfg: dict) -> None:
    limit = getattr(load_text_config(text_cfg["path"]), "max_position_embeddings", None)
    if limit is not None and text_cfg["context_length"] > limit:
        raise ValueError(
            f"context_length {text_cfg['context_length']} exceeds the text model's {limit} positions"
        )
