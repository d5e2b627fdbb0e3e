"""Portable model folders: what ``hlip-train export`` writes and :func:`hlip.load` reads.

A folder holds

* ``model.safetensors``: the weights only (no optimizer, no data position), loadable
  without pickle;
* ``config.json``: ``{"format": "hlip-model", "version", "hlip_version", "preset",
  "model_config", "train_config"}``: the model preset, the resolved model config (vision
  trunk, text model, tokenizer context), and the run's resolved training config, whose
  transform keys (crop grid, CT windows, MR percentiles, intensity normalisation,
  ``max_scans``) are the preprocessing the model expects;
* ``text/``: the text encoder's config and tokenizer files (its weights are in
  ``model.safetensors``), so the folder needs nothing from the machine it was made on.

The folder loads back into the same model whatever its study pooling, unlike the open_clip
layout (which only holds cls-token-pooled models, see ``export_openclip``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

FORMAT = "hlip-model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TEXT_DIR = "text"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt")
"""Files of a text model directory that are weights: the folder takes them from the model."""


def is_model_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def export_model_folder(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the model folder of an hlip-train checkpoint (or run directory) to ``out``."""
    from safetensors.torch import save_model

    from hlip import __version__
    from hlip.model.text import resolve_text_dir
    from hlip.train.checkpoint import build_model, find_resume, read_checkpoint
    from hlip.train.config import TrainConfig

    payload = read_checkpoint(find_resume(str(checkpoint), Path(checkpoint)))
    config = TrainConfig.from_dict(payload["config"])
    model, _ = build_model(config, pretrained_text=False)
    model.load_state_dict(payload["model"])
    out = Path(out)
    text = out / TEXT_DIR
    text.mkdir(parents=True, exist_ok=True)
    for source in resolve_text_dir(config.text_model or None).iterdir():
        if source.is_file() and not source.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(source, text / source.name)
    save_model(model, str(out / WEIGHTS))
    model_config = {**model.model_config, "text": {**model.model_config["text"], "path": TEXT_DIR}}
    description = {
        "format": FORMAT,
        "version": VERSION,
        "hlip_version": __version__,
        "step": payload["step"],
        "preset": config.model,
        "model_config": model_config,
        "train_config": {**config.to_dict(), "text_model": TEXT_DIR, "init_checkpoint": ""},
    }
    (out / CONFIG).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return out


def read_model_folder(path: str | os.PathLike) -> tuple[Any, Any, Any]:
    """``(HLIPCLIP in eval mode, Tokenizer, TrainConfig)`` from a model folder."""
    from safetensors.torch import load_model

    from hlip.model.factory import create_model
    from hlip.train.config import TrainConfig

    path = Path(path)
    description = json.loads((path / CONFIG).read_text())
    if description.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG} does not describe an hlip model folder")
    if description["version"] > VERSION:
        raise ValueError(f"{path}: model folder version {description['version']} is newer than this hlip")
    text = str(path / TEXT_DIR)
    model, tokenizer = create_model(description["model_config"], text_path=text, pretrained_text=False)
    load_model(model, str(path / WEIGHTS))
    config = TrainConfig.from_dict({**description["train_config"], "text_model": text})
    return model.eval(), tokenizer, config
