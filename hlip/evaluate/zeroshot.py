"""Zero-shot classification: score study embeddings against embedded prompt sentences.

For a binary label with negative prompts the score is HLIP's two-prompt softmax,
``p(positive) = softmax(logit_scale * [cos(image, negative), cos(image, positive)])[1]``,
Without negative prompts (HLIP's RSNA and CQ500 protocol) the score is the cosine
similarity to the positive class embedding. A multi-class task is a softmax over its class
embeddings; the prediction is the arg-max.

AUC needs no threshold. Sensitivity, specificity and balanced accuracy need one per label,
and a fixed 0.5 is no good one: a model whose two prompts sit close in embedding space
calls every study positive at 0.5 while ranking them well. So the thresholds come from
:func:`calibrate_thresholds` (Youden's J on the zero-shot scores of *other* studies with
labels, the training or a validation set), or, failing that, from a fixed ``threshold`` the
prompts file states; with neither, only the AUC is reported.
How several templates and phrases combine is described in :mod:`hlip.evaluate.prompts`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hlip.evaluate import metrics
from hlip.evaluate.labels import binary_targets, class_targets
from hlip.evaluate.prompts import PLACEHOLDER, BinaryLabel, PromptSet

if TYPE_CHECKING:
    from hlip.evaluate.grounding import Corpus

TextEncoder = Callable[[Sequence[str]], np.ndarray]
"""Maps sentences to L2-normalised embeddings ``[n, E]`` (the model's text tower)."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class SentenceBank:
    """Embeds every distinct prompt sentence once and serves them by text; with a ``corpus``
    (:mod:`hlip.evaluate.grounding`), class embeddings are grounded in its sentences."""

    def __init__(
        self,
        encode: TextEncoder,
        sentences: Sequence[str],
        corpus: Corpus | None = None,
        labels: Sequence[Sequence[Sequence[str]]] = (),
    ) -> None:
        """``labels``: per label (or multi-class task) of the prompt set, per class, its
        sentences (:func:`prompt_classes`): a grounded class takes no corpus sentence that is
        clearly more relevant to another of them (:data:`hlip.evaluate.grounding.SHARED`)."""
        unique = list(dict.fromkeys(sentences))
        vectors = l2_normalize(encode(unique)) if unique else np.zeros((0, 0))
        self._vectors = dict(zip(unique, vectors, strict=True))
        self.corpus = corpus
        self._required = None
        if corpus is not None:
            self._relevance = dict(zip(unique, corpus.relate(unique), strict=True))
            self._required = corpus.required_relevance([self._class_relevance(c) for c in labels])

    @classmethod
    def for_prompts(
        cls, encode: TextEncoder, prompts: PromptSet, corpus: Corpus | None = None
    ) -> SentenceBank:
        """The bank of every sentence of ``prompts``; in grounding, a corpus sentence clearly
        more relevant to another of its labels does not join a label's class."""
        labels = prompt_classes(prompts)
        return cls(encode, [s for classes in labels for group in classes for s in group], corpus, labels)

    def __getitem__(self, sentence: str) -> np.ndarray:
        return self._vectors[sentence]

    def class_embeddings(self, phrases: Sequence[Sequence[str]], templates: Sequence[str]) -> np.ndarray:
        """``[K, T, E]``: per class and template, the mean of the phrases' normalised embeddings;
        when grounded, the class as :meth:`hlip.evaluate.grounding.Corpus.ground` makes it."""
        classes = self._prompt_classes(phrases, templates)
        if self.corpus is None:
            return classes
        return self.corpus.ground(classes, self._relevance_of(phrases, templates), self._required)

    def grounding(self, phrases: Sequence[Sequence[str]], templates: Sequence[str]) -> dict | None:
        """How these classes are grounded (:meth:`hlip.evaluate.grounding.Corpus.describe`),
        None without a corpus."""
        if self.corpus is None:
            return None
        classes = self._prompt_classes(phrases, templates)
        return self.corpus.describe(classes, self._relevance_of(phrases, templates), self._required)

    def _prompt_classes(self, phrases: Sequence[Sequence[str]], templates: Sequence[str]) -> np.ndarray:
        return np.stack(
            [
                np.stack([np.mean([self[fill(t, p)] for p in class_phrases], axis=0) for t in templates])
                for class_phrases in phrases
            ]
        )

    def _relevance_of(self, phrases: Sequence[Sequence[str]], templates: Sequence[str]) -> np.ndarray:
        return self._class_relevance([[fill(t, p) for t in templates for p in group] for group in phrases])

    def _class_relevance(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """``[K, R]``: per class, its sentences' mean similarity-model embedding, unit length."""
        return l2_normalize([np.mean([self._relevance[s] for s in group], axis=0) for group in sentences])


def fill(template: str, phrase: str) -> str:
    """The sentence for one template and one phrase."""
    return template.replace(PLACEHOLDER, phrase, 1)


def prompt_classes(prompts: PromptSet) -> list[list[list[str]]]:
    """Per binary label and multi-class task of a prompt set, per class, its sentences (every
    template with every phrase)."""
    groups = [
        ((b.negative, b.positive) if b.has_negative else (b.positive,), b.templates) for b in prompts.binary
    ]
    groups += [(m.phrases, m.templates) for m in prompts.multiclass]
    return [
        [[fill(t, p) for t in templates for p in phrases] for phrases in classes]
        for classes, templates in groups
    ]


def class_probabilities(
    image: np.ndarray, classes: np.ndarray, logit_scale: float, ensemble: str
) -> np.ndarray:
    """``[N, K]`` softmax probabilities of normalised images ``[N, E]`` over classes ``[K, T, E]``."""
    if ensemble == "embedding":
        logits = logit_scale * image @ l2_normalize(classes.mean(axis=1)).T
        return _softmax(logits)
    per_template = logit_scale * np.einsum("ne,kte->ntk", image, l2_normalize(classes))
    return _softmax(per_template).mean(axis=1)


def class_similarity(image: np.ndarray, classes: np.ndarray, ensemble: str) -> np.ndarray:
    """``[N, K]`` cosine similarities, for classes scored without a softmax."""
    if ensemble == "embedding":
        return image @ l2_normalize(classes.mean(axis=1)).T
    return np.einsum("ne,kte->nk", image, l2_normalize(classes)) / classes.shape[1]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def binary_scores(
    image: np.ndarray, label: BinaryLabel, bank: SentenceBank, logit_scale: float, ensemble: str
) -> np.ndarray:
    """p(positive) per study, or the positive similarity when the label has no negatives."""
    if label.has_negative:
        classes = bank.class_embeddings([label.negative, label.positive], label.templates)
        return class_probabilities(image, classes, logit_scale, ensemble)[:, 1]
    classes = bank.class_embeddings([label.positive], label.templates)
    return class_similarity(image, classes, ensemble)[:, 0]


@dataclass
class ZeroShotResult:
    """JSON-ready metrics plus the per-study scores behind them (for plots and tables)."""

    metrics: dict
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)


def run_zeroshot(
    image_embeddings: np.ndarray,
    labels: Sequence[dict],
    prompts: PromptSet,
    encode: TextEncoder,
    logit_scale: float,
    *,
    thresholds: Mapping[str, float] | None = None,
    corpus: Corpus | None = None,
    n_boot: int = metrics.DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> ZeroShotResult:
    """Score every label and task of ``prompts`` against the studies' labels.

    ``thresholds`` (label name -> score cut, from :func:`calibrate_thresholds`) decide the
    thresholded metrics; a label it lacks gets the AUC only. Without it, the prompts file's
    fixed ``threshold`` applies to the labels with negative prompts, if the file sets one.
    ``scores[name]`` is ``[N]`` for a binary label and ``[N, K]`` class probabilities for a
    multi-class task; ``targets`` holds the matching 0/1/NaN or class-index (-1 = none) arrays.
    ``corpus`` grounds the prompts in the training reports (:mod:`hlip.evaluate.grounding`);
    each grounded label's metrics then say how (``grounding``: report prototypes or sentences,
    and the training reports sorted to each class).
    """
    image = l2_normalize(image_embeddings)
    bank = SentenceBank.for_prompts(encode, prompts, corpus)
    rule = "calibrated" if thresholds is not None else "fixed" if prompts.threshold is not None else "none"
    grounding = corpus.info if corpus is not None else "none"
    result = ZeroShotResult(
        metrics={
            "ensemble": prompts.ensemble,
            "thresholds": rule,
            "grounding": grounding,
            "binary": {},
            "multiclass": {},
        }
    )
    cuts = {label.name: _threshold(label, prompts, thresholds) for label in prompts.binary}
    for label in prompts.binary:
        y = binary_targets(labels, label.column)
        s = binary_scores(image, label, bank, logit_scale, prompts.ensemble)
        result.targets[label.name], result.scores[label.name] = y, s
        result.metrics["binary"][label.name] = metrics.binary_metrics(
            y, s, threshold=cuts[label.name], name=label.name, n_boot=n_boot, seed=seed
        )
        if corpus is not None and label.has_negative:
            result.metrics["binary"][label.name]["grounding"] = bank.grounding(
                [label.negative, label.positive], label.templates
            )
    if prompts.binary:
        result.metrics["macro"] = _macro(prompts, result, list(cuts.values()), n_boot=n_boot, seed=seed)
    for task in prompts.multiclass:
        classes = bank.class_embeddings(task.phrases, task.templates)
        y = class_targets(labels, task)
        p = class_probabilities(image, classes, logit_scale, prompts.ensemble)
        result.targets[task.name], result.scores[task.name] = y, p
        result.metrics["multiclass"][task.name] = metrics.multiclass_metrics(
            y[y >= 0], p[y >= 0], list(task.classes), name=task.name, n_boot=n_boot, seed=seed
        )
        if corpus is not None:
            result.metrics["multiclass"][task.name]["grounding"] = bank.grounding(
                task.phrases, task.templates
            )
    return result


def calibrate_thresholds(
    image_embeddings: np.ndarray,
    labels: Sequence[dict],
    prompts: PromptSet,
    encode: TextEncoder,
    logit_scale: float,
    corpus: Corpus | None = None,
) -> dict[str, float]:
    """Per binary label, the zero-shot score cut of best Youden's J on these (calibration)
    studies (scored as :func:`run_zeroshot` scores, with the same ``corpus``); a label with one
    class there gets none (and a :class:`~hlip.evaluate.metrics.MetricWarning`)."""
    image = l2_normalize(image_embeddings)
    bank = SentenceBank.for_prompts(encode, prompts, corpus)
    cuts = {
        label.name: metrics.youden_threshold(
            binary_targets(labels, label.column),
            binary_scores(image, label, bank, logit_scale, prompts.ensemble),
        )
        for label in prompts.binary
    }
    return {name: cut for name, cut in cuts.items() if not np.isnan(cut)}


def _threshold(
    label: BinaryLabel, prompts: PromptSet, thresholds: Mapping[str, float] | None
) -> float | None:
    if thresholds is not None:
        return thresholds.get(label.name)
    return prompts.threshold if label.has_negative else None


def _macro(prompts: PromptSet, result: ZeroShotResult, thresholds: list, *, n_boot: int, seed: int) -> dict:
    names = [label.name for label in prompts.binary]
    y = np.stack([result.targets[n] for n in names], axis=1)
    s = np.stack([result.scores[n] for n in names], axis=1)
    return metrics.macro_metrics(y, s, thresholds, n_boot=n_boot, seed=seed)
