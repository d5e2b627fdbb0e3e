"""Checkpoints that restore a run exactly, and the two ways out of a run.

A checkpoint (``<run>/checkpoints/step-NNNNNNNN.pt``, newest also as ``last.pt``) holds the
model, optimizer and scheduler states, the step, every rank's data position and RNG states
(torch, CUDA, numpy, python) and the resolved config. Files are written to a temporary name
and renamed, so a crash never leaves a half-written checkpoint; the newest ``keep`` step
files are kept. Everything in it loads with ``torch.load(weights_only=True)``.

Ways out: :func:`load_checkpoint` rebuilds ``(model, tokenizer, config)`` for evaluation,
and :func:`export_openclip` writes the open_clip layout the published HLIP files use.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hlip.model.checkpoint import CheckpointError, load_torch_file
from hlip.model.factory import resolve_model_config
from hlip.train.config import TrainConfig

FORMAT = "hlip-train-checkpoint"
VERSION = 1
LAST = "last.pt"
STEP_GLOB = "step-*.pt"

OPENCLIP_PREFIXES = ("visual.trunk.", "visual.head.proj.", "text.transformer.", "text.proj.")
OPENCLIP_SCALARS = ("logit_scale", "logit_bias")


# --- model construction (shared by training and loading) ---------------------------------------


def model_kwargs(config: TrainConfig, device_type: str = "cpu") -> dict[str, Any]:
    """``create_model`` arguments for a config: preset overrides plus the training switches."""
    overrides = dict(config.model_overrides)
    vision = dict(overrides.pop("vision", {}))
    if config.patch_drop_rate:
        vision["patch_drop_rate"] = config.patch_drop_rate
    if vision:
        overrides["vision"] = vision
    if config.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    overrides["precision"] = "bf16" if config.precision == "bf16" and native_bf16(device_type) else "fp32"
    return overrides


def native_bf16(device_type: str) -> bool:
    """Whether bf16 autocast pays off on this device: on a GPU, and on a CPU with bf16 matrix
    instructions (AMX or AVX512-BF16), where the demo's step takes 0.66x the time of fp32
    (bench/demo_step.py). Elsewhere a CPU emulates bf16 and runs slower than in fp32."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def build_model(config: TrainConfig, device_type: str = "cpu", pretrained_text: bool = True):
    """(HLIPCLIP, Tokenizer) as the config describes, text tower locked if asked."""
    from hlip.model.factory import create_model

    model, tokenizer = create_model(
        config.model,
        text_path=config.text_model or None,
        pretrained_text=pretrained_text,
        **model_kwargs(config, device_type),
    )
    if config.lock_text:
        model.lock_text(config.lock_text_unlocked_layers)
    return model, tokenizer


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Start weights: an hlip-train checkpoint, or any open_clip-layout file (published HLIP)."""
    from hlip.model.clip import load_openclip_checkpoint

    payload = load_torch_file(path)
    if isinstance(payload, Mapping) and payload.get("format") == FORMAT:
        model.load_state_dict(payload["model"])
    else:
        load_openclip_checkpoint(model, payload)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


# --- RNG state ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["gauss"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing -----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: Path) -> Path:
    """torch.save to a temporary file in the same directory, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _point_last(step_file: Path) -> None:
    """Make ``last.pt`` the same file as ``step_file`` (a hard link, else a copy), atomically."""
    last = step_file.with_name(LAST)
    tmp = step_file.with_name(f".{LAST}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(step_file, tmp)
    except OSError:
        shutil.copyfile(step_file, tmp)
    os.replace(tmp, last)
    _fsync_dir(last.parent)


def prune(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``last.pt`` stays)."""
    for old in sorted(checkpoint_dir.glob(STEP_GLOB))[: -keep if keep > 0 else None]:
        old.unlink(missing_ok=True)


def checkpoint_payload(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    config: TrainConfig,
    data_states: list[dict[str, Any]],
    rng_states: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything a resumed run needs; ``data_states``/``rng_states`` are indexed by rank."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config.to_dict(),
        "world_size": len(data_states),
        "num_workers": config.num_workers,
        "data": data_states,
        "rng": rng_states,
    }


def save_checkpoint(payload: Mapping[str, Any], run_dir: Path, keep: int) -> Path:
    """Write ``step-NNNNNNNN.pt``, point ``last.pt`` at it and prune old step files."""
    checkpoint_dir = run_dir / "checkpoints"
    path = save_atomic(dict(payload), checkpoint_dir / f"step-{payload['step']:08d}.pt")
    _point_last(path)
    prune(checkpoint_dir, keep)
    return path


# --- reading -----------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (clear error for anything else)."""
    payload = load_torch_file(path)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an hlip-train checkpoint. For an open_clip-layout file (published HLIP "
            "weights, export_openclip output) use hlip.model.clip.load_openclip_checkpoint, or "
            "start training from it with init_checkpoint."
        )
    if payload["version"] > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload['version']} is newer than this hlip ({VERSION})"
        )
    return dict(payload)


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """``""`` = no resume; ``"auto"`` = ``last.pt`` of the run if there is one; else a path."""
    if not resume:
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / LAST if (path / "checkpoints").is_dir() else path / LAST
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {path}")
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(HLIPCLIP in eval mode, Tokenizer, TrainConfig)`` from an hlip-train checkpoint.

    The config is the run's resolved config, so ``StudyTransform(config, train=False)`` gives
    the evaluation-time preprocessing the model was trained with.
    """
    payload = read_checkpoint(path)
    config = TrainConfig.from_dict(payload["config"])
    model, tokenizer = build_model(config, torch.device(device).type, pretrained_text=False)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), tokenizer, config


def openclip_refusal(config: TrainConfig) -> str | None:
    """Why the open_clip layout cannot hold this config's model, or None when it can: its
    weights would load there and silently give other embeddings."""
    vision = resolve_model_config(config.model, text_path=config.text_model or None, **model_kwargs(config))[
        "vision"
    ]
    pool = vision.get("pool", "token")
    if pool != "token":
        return (
            f"model pools its study embedding with {pool!r}; the open_clip HLIP encoder pools the cls "
            "token only and would compute other embeddings from these weights"
        )
    return None


def export_openclip(checkpoint: str | os.PathLike | Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``{"epoch", "name", "state_dict"}`` with open_clip's key names, as HLIP releases.

    ``state_dict`` holds ``visual.trunk.*``, ``visual.head.proj.weight``, ``text.transformer.*``,
    ``text.proj.weight``, ``logit_scale`` (and ``logit_bias`` for SigLIP), without any
    ``module.`` prefix; load it with ``hlip.model.clip.load_openclip_checkpoint`` or open_clip.
    """
    payload = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    refusal = openclip_refusal(TrainConfig.from_dict(payload["config"]))
    if refusal:
        raise ValueError(refusal)
    state = {
        key: value
        for key, value in payload["model"].items()
        if key.startswith(OPENCLIP_PREFIXES) or key in OPENCLIP_SCALARS
    }
    required = (
        "visual.trunk.",
        "visual.head.proj.weight",
        "text.transformer.",
        "text.proj.weight",
        "logit_scale",
    )
    missing = [prefix for prefix in required if not any(key.startswith(prefix) for key in state)]
    if missing:
        raise ValueError(f"checkpoint model lacks open_clip keys {missing}")
    from hlip.train.data import DataState

    epoch = min((DataState.from_dict(d).epoch for d in payload["data"]), default=0)
    exported = {
        "epoch": epoch,
        "step": payload["step"],
        "name": payload["config"]["model"],
        "state_dict": state,
    }
    return save_atomic(exported, Path(path))
