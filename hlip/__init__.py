"""hlip: hierarchical language-image pre-training for 3D medical imaging.

import hlip
model = hlip.load("my-model")                  # hlip-train export, run dir or checkpoint
vector = model.embed_study("dicom/study-1")    # or hlip.open_study("shards/", key)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from hlip.evaluate.embed import LoadedModel
    from hlip.shards.format import Study

__all__ = ["__version__", "load", "open_study"]


def load(path: str, device: str = "auto") -> LoadedModel:
    """A ready model with its tokenizer and preprocessing from a model folder
    (``hlip-train export``), an hlip-train run directory or checkpoint."""
    from hlip.evaluate.embed import load_model

    return load_model(path, device=device)


def open_study(dataset: str, key: str) -> Study:
    """One study of a shard dataset, by key (``hlip-shards ls`` lists them)."""
    from hlip.shards.reader import ShardDataset

    return ShardDataset(dataset).open(key)
