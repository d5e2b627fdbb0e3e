"""Embed studies and reports with a trained model: checkpoint + shards -> embeddings table.

Two kinds of checkpoint load here:

* an ``hlip-train`` checkpoint, which carries its model config and data config
  (:func:`hlip.train.checkpoint.load_checkpoint`);
* a published HLIP (open_clip layout) file, which carries weights only, so the model is
  built from a named preset (``--preset``) and the weights are checked key by key against it.

Studies go through the evaluation transform of :class:`hlip.train.data.StudyTransform`
(first ``max_scans`` scans in stored order, centre crops, the full report), are packed
without padding and encoded in batches. Packing gives each study exactly the result it
would get alone, so an embedding does not depend on the batch size or on which studies
share its batch (up to float32 summation order).

The table (``embeddings.parquet``) has one row per study in key order: ``key``,
``modality``, ``has_report``, ``labels`` (JSON), ``image_embedding`` and
``report_embedding`` (L2-normalised float32 lists); the file's metadata records the
checkpoint, preset, embedding width and the model's logit scale, which zero-shot
classification needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

METADATA_KEY = b"hlip.embeddings"
TEXT_BATCH = 64
MAX_LOGIT_SCALE = 100.0


class EvalInputError(ValueError):
    """The checkpoint, preset or data cannot be evaluated; the message says what to change."""


@dataclass
class LoadedModel:
    """A model ready for evaluation with the tokenizer and transform settings it was trained with."""

    model: Any
    tokenizer: Any
    config: Any
    """The :class:`hlip.train.config.TrainConfig` whose transform settings embedding uses."""
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def logit_scale(self) -> float:
        """exp(learned temperature), clamped at 100 as in training."""
        return min(math.exp(float(self.model.logit_scale.detach())), MAX_LOGIT_SCALE)


def load_model(
    checkpoint: str | Path,
    *,
    preset: str | None = None,
    text_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> LoadedModel:
    """Load an hlip-train checkpoint, or a published open_clip-layout one with ``preset``.

    ``overrides`` are ``key=value`` settings of the data transform (e.g. ``max_scans=4``,
    ``ct_windows=[[-1000, 1000]]``), applied on top of the checkpoint's (or the defaults).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise EvalInputError(f"checkpoint not found: {path}")
    loaded = _load_published(path, preset, text_path) if preset else _load_trained(path)
    loaded.config = _with_overrides(loaded.config, overrides)
    loaded.model.to(device).eval()
    return loaded


def _load_trained(path: Path) -> LoadedModel:
    from hlip.train.checkpoint import load_checkpoint

    try:
        model, tokenizer, config = load_checkpoint(path)
    except (ValueError, KeyError, TypeError) as error:
        raise EvalInputError(
            f"{error}\nFor a published HLIP (open_clip layout) checkpoint, name its model with --preset "
            "(e.g. --preset hlip-ct-rate; `hlip-eval presets` lists them)."
        ) from None
    return LoadedModel(model, tokenizer, config, {"checkpoint": str(path), "kind": "hlip-train"})


def _load_published(path: Path, preset: str, text_path: str | Path | None) -> LoadedModel:
    from hlip.model.clip import CheckpointMismatchError, load_openclip_checkpoint
    from hlip.model.factory import MODEL_PRESETS, create_model
    from hlip.train.config import TrainConfig

    if preset not in MODEL_PRESETS:
        raise EvalInputError(f"unknown preset {preset!r}; known: {', '.join(sorted(MODEL_PRESETS))}")
    model, tokenizer = create_model(preset, text_path=text_path, pretrained_text=False)
    try:
        load_openclip_checkpoint(model, path)
    except CheckpointMismatchError as error:
        raise EvalInputError(f"checkpoint {path} does not fit preset {preset!r}:\n{error}") from None
    config = TrainConfig(model=preset).resolve()
    return LoadedModel(
        model, tokenizer, config, {"checkpoint": str(path), "kind": "open_clip", "preset": preset}
    )


def _with_overrides(config: Any, overrides: Sequence[str]) -> Any:
    if not overrides:
        return config
    from hlip.train.config import parse_value, set_value

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise EvalInputError(f"setting {item!r}: expected key=value")
        try:
            set_value(config, key.strip(), parse_value(raw.strip()))
        except (KeyError, TypeError) as error:
            raise EvalInputError(f"setting {item!r}: {error}") from None
    return config.validate()


# --- studies -> embeddings ---------------------------------------------------------------------


class _EvalStudies(Dataset):
    """Map-style view of a shard dataset through the evaluation transform, in key order."""

    def __init__(
        self, data: str | Path, config: Any, keys: Sequence[str], version: int | None = None
    ) -> None:
        from hlip.train.data import StudyTransform

        self.data, self.keys, self.version = str(data), list(keys), version
        self.transform = StudyTransform(config, train=False)
        self._dataset = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from hlip.shards.reader import ShardDataset

        if self._dataset is None:  # opened lazily, once per worker process
            self._dataset = ShardDataset(self.data, version=self.version)
        return self.transform(self._dataset.open(self.keys[index]))


@dataclass
class Embeddings:
    """Per-study embeddings and labels, row-aligned, in key order."""

    keys: list[str]
    image: np.ndarray
    report: np.ndarray
    has_report: np.ndarray
    labels: list[dict[str, Any]]
    modality: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dim = self.image.shape[1]
        table = pa.table(
            {
                "key": pa.array(self.keys, pa.string()),
                "modality": pa.array(self.modality, pa.string()),
                "has_report": pa.array(self.has_report.tolist(), pa.bool_()),
                "labels": pa.array([json.dumps(v, sort_keys=True) for v in self.labels], pa.string()),
                "image_embedding": _vectors(self.image, dim),
                "report_embedding": _vectors(self.report, dim),
            }
        ).replace_schema_metadata({METADATA_KEY: json.dumps(self.meta, sort_keys=True).encode()})
        pq.write_table(table, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Embeddings:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        return cls(
            keys=table["key"].to_pylist(),
            image=_matrix(table["image_embedding"]),
            report=_matrix(table["report_embedding"]),
            has_report=np.asarray(table["has_report"].to_pylist(), dtype=bool),
            labels=[json.loads(v) for v in table["labels"].to_pylist()],
            modality=table["modality"].to_pylist(),
            meta=meta,
        )


def _vectors(matrix: np.ndarray, dim: int) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def embed_dataset(
    loaded: LoadedModel,
    data: str | Path,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    version: int | None = None,
) -> Embeddings:
    """Encode every study of the shard dataset ``data`` (a directory or object-store URL)
    at ``version`` (default: the latest).

    ``progress(done, total)`` is called after each batch.
    """
    from hlip.shards.format import ShardFormatError
    from hlip.shards.reader import ShardDataset
    from hlip.train.data import worker_collate

    try:
        dataset = ShardDataset(data, version=version)
    except ShardFormatError as error:
        raise EvalInputError(f"cannot read shards at {data}: {error}") from None
    keys = dataset.keys()
    if not keys:
        raise EvalInputError(f"{data} holds no studies")
    manifest = {
        row["key"]: row for row in dataset.manifest.select(["key", "report_length", "modality"]).to_pylist()
    }
    loader = DataLoader(
        _EvalStudies(data, loaded.config, keys, dataset.version.number),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=worker_collate(loaded.tokenizer, loaded.model.visual.trunk.patch_size, num_workers, 2),
    )
    out: dict[str, list] = {"keys": [], "image": [], "report": [], "labels": []}
    for batch in _encode(loaded.model, loader):
        for name, values in batch.items():
            out[name].extend(values)
        if progress is not None:
            progress(len(out["keys"]), len(keys))
    return Embeddings(
        keys=out["keys"],
        image=np.stack(out["image"]),
        report=np.stack(out["report"]),
        has_report=np.array([manifest[k]["report_length"] > 0 for k in out["keys"]], dtype=bool),
        labels=out["labels"],
        modality=[manifest[k]["modality"] for k in out["keys"]],
        meta={
            **loaded.source,
            "data": str(data),
            "data_version": dataset.version.number,
            "logit_scale": loaded.logit_scale,
            "embed_dim": loaded.model.embed_dim,
        },
    )


def _encode(model: Any, loader: DataLoader) -> Iterator[dict[str, list]]:
    with torch.inference_mode():
        for batch in loader:
            yield {
                "keys": list(batch.keys),
                "image": list(model.encode_image(batch.packed, normalize=True).float().cpu().numpy()),
                "report": list(model.encode_text(batch.tokens, normalize=True).float().cpu().numpy()),
                "labels": list(batch.labels),
            }


def text_encoder(loaded: LoadedModel, batch_size: int = TEXT_BATCH) -> Callable[[Sequence[str]], np.ndarray]:
    """The model's text tower as a function of sentences -> normalised ``[n, E]`` embeddings."""

    def encode(sentences: Sequence[str]) -> np.ndarray:
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(sentences), batch_size):
                tokens = loaded.tokenizer(list(sentences[start : start + batch_size]))
                chunks.append(loaded.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, loaded.model.embed_dim), np.float32)

    return encode
