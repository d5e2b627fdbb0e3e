"""Files shipped inside the package: training presets, prompt sets and benchmark definitions.

They live in ``hlip/configs/`` and are read through :mod:`importlib.resources`, so a preset
name (``--config demo-cpu``, ``--prompts synth``) works the same from a clone, an editable
install or a wheel. Wherever a name is accepted, a path to a file of one's own works too.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

PRESETS = ""
"""Training presets: ``hlip/configs/<name>.toml``."""
PROMPTS = "prompts"
"""Zero-shot prompt sets: ``hlip/configs/prompts/<name>.toml``."""
BENCHMARKS = "benchmarks"
"""Public benchmark definitions (prompts plus provenance): ``hlip/configs/benchmarks/<name>.toml``."""


def shipped_folder(kind: str) -> Traversable:
    folder = files("hlip") / "configs"
    return folder / kind if kind else folder


def shipped_names(kind: str) -> list[str]:
    """Names of the shipped ``.toml`` files of one kind (``PRESETS``, ``PROMPTS`` or ``BENCHMARKS``)."""
    return sorted(
        f.name.removesuffix(".toml") for f in shipped_folder(kind).iterdir() if f.name.endswith(".toml")
    )


def find_file(name_or_path: str | Path, kinds: tuple[str, ...], what: str) -> Path | Traversable:
    """An existing file path as given, else the shipped file of that name (first of ``kinds``).

    Raises ``FileNotFoundError`` naming the shipped choices, so a typo shows what exists.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    for kind in kinds:
        candidate = shipped_folder(kind) / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    choices = sorted(name for kind in kinds for name in shipped_names(kind))
    raise FileNotFoundError(f"no {what} file or shipped name {str(name_or_path)!r} (shipped: {choices})")
