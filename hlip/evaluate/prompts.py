"""Zero-shot prompt files: which labels to score, and the sentences that describe them.

A prompts file is TOML (the benchmark files shipped in ``hlip/configs/benchmarks/`` use the
same schema, plus a free-form ``[benchmark]`` table for people); a shipped prompt set or
benchmark is also found by its name (``synth``, ``ct-rate``)::

    version = 1
    name = "CT-RATE"
    ensemble = "embedding"        # or "probability"; see below
    threshold = 0.5               # optional: a fixed p(positive) cut, used when no calibration
                                  # studies are given (hlip-eval run --calibrate)
    templates = "volume"          # default template set of every label

    [template_sets]
    volume = ["The volume shows: {}."]
    lung = ["The lung shows: {}."]

    [labels."Lung nodule"]        # a binary label, scored by a two-prompt softmax
    positive = ["Nodule"]         # phrases put into every template ("{}")
    negative = ["Not nodule"]     # optional: without it the score is the similarity
    templates = "lung"            # a template-set name or an inline list
    column = "Lung nodule"        # the study label it is checked against (default: the name)

    [multiclass."Pub-Brain-5"]    # one label column holding a class name
    column = "diagnosis"          # or `one_hot = true`: one 0/1 column per class, named as the class
    templates = ["This MRI study shows: {}."]
    classes = { Normal = ["No significant abnormalities"], Glioma = ["Glioma"] }

Ensembling (how HLIP's evaluation combines several sentences for one class): with
``"embedding"`` (HLIP and open_clip's ``build_zero_shot_classifier``) every sentence
(template x phrase) is embedded and L2-normalised, the class embedding is their mean,
re-normalised, and the softmax runs once over the class embeddings. With
``"probability"`` the phrases are averaged per template, the softmax runs per template,
and the probabilities are averaged over templates. HLIP's ``--zeroshot-template volume``
mode is a single template set for every label (``--template-set volume`` here); its
``organ`` mode is each label's own set, as the CT-RATE benchmark file declares them.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hlip import resources

PROMPTS_VERSION = 1
ENSEMBLES = ("embedding", "probability")
PLACEHOLDER = "{}"

_TOP_KEYS = {
    "version",
    "name",
    "description",
    "ensemble",
    "threshold",
    "templates",
    "template_sets",
    "labels",
    "multiclass",
    "benchmark",
}
_LABEL_KEYS = {"positive", "negative", "templates", "column"}
_MULTICLASS_KEYS = {"column", "one_hot", "templates", "classes"}


class PromptsError(ValueError):
    """A prompts file is malformed; the message names the file and the offending entry."""


@dataclass(frozen=True)
class BinaryLabel:
    """One finding scored as present/absent."""

    name: str
    column: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    templates: tuple[str, ...]

    @property
    def has_negative(self) -> bool:
        return bool(self.negative)


@dataclass(frozen=True)
class MulticlassTask:
    """Mutually exclusive classes read from one label column (e.g. a diagnosis), or from
    one 0/1 column per class (``one_hot``, columns named as the classes)."""

    name: str
    column: str
    classes: tuple[str, ...]
    phrases: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...]
    one_hot: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        return self.classes if self.one_hot else (self.column,)


@dataclass(frozen=True)
class PromptSet:
    """A parsed prompts file."""

    name: str
    ensemble: str
    threshold: float | None
    """A fixed p(positive) cut stated in advance; None: thresholds come from calibration studies."""
    binary: tuple[BinaryLabel, ...]
    multiclass: tuple[MulticlassTask, ...]
    description: str = ""
    source: str = ""
    benchmark: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """Every label column the file needs, in file order."""
        return [b.column for b in self.binary] + [c for m in self.multiclass for c in m.columns]

    def select(self, names: list[str]) -> PromptSet:
        """The same file restricted to the named labels/tasks (e.g. a paper's subset)."""
        known = [b.name for b in self.binary] + [m.name for m in self.multiclass]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PromptsError(f"{self.source}: no label or task named {unknown}; it defines {known}")
        return replace(
            self,
            binary=tuple(b for b in self.binary if b.name in names),
            multiclass=tuple(m for m in self.multiclass if m.name in names),
        )


def load_prompts(name_or_path: str | Path, *, template_set: str | None = None) -> PromptSet:
    """Read and validate a prompts TOML (a path, or a shipped prompt set or benchmark name);
    ``template_set`` forces one set for every label."""
    try:
        path = resources.find_file(name_or_path, (resources.PROMPTS, resources.BENCHMARKS), "prompts")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PromptsError(f"prompts file not found: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PromptsError(f"{path}: not valid TOML: {exc}") from None
    return parse_prompts(data, source=str(path), template_set=template_set)


def parse_prompts(
    data: Mapping[str, Any], *, source: str = "<prompts>", template_set: str | None = None
) -> PromptSet:
    """Validate the TOML structure described in the module docstring."""
    _check_keys(data, _TOP_KEYS, source)
    version = data.get("version", PROMPTS_VERSION)
    if version != PROMPTS_VERSION:
        raise PromptsError(
            f"{source}: prompts version {version!r} is not supported (expected {PROMPTS_VERSION})"
        )
    ensemble = data.get("ensemble", "embedding")
    if ensemble not in ENSEMBLES:
        raise PromptsError(f"{source}: ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    threshold = data.get("threshold")
    if threshold is not None and not 0.0 < float(threshold) < 1.0:
        raise PromptsError(f"{source}: threshold must lie strictly between 0 and 1, got {threshold}")
    sets = {
        name: _templates(value, f"{source}: template_sets.{name}")
        for name, value in data.get("template_sets", {}).items()
    }
    if template_set is not None and template_set not in sets:
        raise PromptsError(
            f"{source}: no template set {template_set!r}; the file defines {sorted(sets) or 'none'}"
        )
    default = data.get("templates", template_set)
    resolve = _TemplateResolver(sets, default, template_set, source)
    binary = tuple(_binary(name, spec, resolve, source) for name, spec in data.get("labels", {}).items())
    multiclass = tuple(
        _multiclass(name, spec, resolve, source) for name, spec in data.get("multiclass", {}).items()
    )
    if not binary and not multiclass:
        raise PromptsError(f"{source}: defines no [labels.*] and no [multiclass.*] entries")
    _check_unique([b.name for b in binary] + [m.name for m in multiclass], source)
    return PromptSet(
        name=str(data.get("name", Path(source).stem)),
        ensemble=ensemble,
        threshold=None if threshold is None else float(threshold),
        binary=binary,
        multiclass=multiclass,
        description=str(data.get("description", "")),
        source=source,
        benchmark=dict(data.get("benchmark", {})),
    )


@dataclass(frozen=True)
class _TemplateResolver:
    sets: dict[str, tuple[str, ...]]
    default: Any
    forced: str | None
    source: str

    def __call__(self, value: Any, where: str) -> tuple[str, ...]:
        if self.forced is not None:
            return self.sets[self.forced]
        value = self.default if value is None else value
        if value is None:
            raise PromptsError(
                f"{self.source}: {where} has no templates and the file sets no default `templates`"
            )
        if isinstance(value, str) and PLACEHOLDER not in value:
            if value not in self.sets:
                raise PromptsError(
                    f"{self.source}: {where} names template set {value!r}; the file defines {sorted(self.sets) or 'none'}"
                )
            return self.sets[value]
        return _templates(value, f"{self.source}: {where}.templates")


def _binary(name: str, spec: Any, resolve: _TemplateResolver, source: str) -> BinaryLabel:
    where = f"labels.{name!r}"
    spec = _table(spec, f"{source}: {where}")
    _check_keys(spec, _LABEL_KEYS, f"{source}: {where}")
    if "positive" not in spec:
        raise PromptsError(f"{source}: {where} needs `positive` phrases")
    return BinaryLabel(
        name=name,
        column=str(spec.get("column", name)),
        positive=_phrases(spec["positive"], f"{source}: {where}.positive"),
        negative=_phrases(spec["negative"], f"{source}: {where}.negative") if "negative" in spec else (),
        templates=resolve(spec.get("templates"), where),
    )


def _multiclass(name: str, spec: Any, resolve: _TemplateResolver, source: str) -> MulticlassTask:
    where = f"multiclass.{name!r}"
    spec = _table(spec, f"{source}: {where}")
    _check_keys(spec, _MULTICLASS_KEYS, f"{source}: {where}")
    classes = _table(spec.get("classes"), f"{source}: {where}.classes")
    if len(classes) < 2:
        raise PromptsError(f"{source}: {where}.classes needs at least two classes, got {len(classes)}")
    one_hot = spec.get("one_hot", False)
    if not isinstance(one_hot, bool) or (one_hot and "column" in spec):
        raise PromptsError(f"{source}: {where}: set either `column` or `one_hot = true`, not both")
    return MulticlassTask(
        name=name,
        column=str(spec.get("column", name)),
        classes=tuple(classes),
        phrases=tuple(_phrases(v, f"{source}: {where}.classes.{k}") for k, v in classes.items()),
        templates=resolve(spec.get("templates"), where),
        one_hot=one_hot,
    )


def _phrases(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
        raise PromptsError(
            f"{where}: expected a non-empty string or list of non-empty strings, got {value!r}"
        )
    return tuple(s.strip() for s in items)


def _templates(value: Any, where: str) -> tuple[str, ...]:
    templates = _phrases(value, where)
    for template in templates:
        if template.count(PLACEHOLDER) != 1:
            raise PromptsError(
                f"{where}: template {template!r} must contain the placeholder {{}} exactly once"
            )
    return templates


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PromptsError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise PromptsError(f"{where}: unknown key {key!r}{suggestion}; allowed: {sorted(allowed)}")


def _check_unique(names: list[str], source: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise PromptsError(f"{source}: label/task name {name!r} is defined twice")
        seen.add(name)
