"""Prompts grounded in the training reports' own sentences.

A user writes "Pulmonary nodule." / "No pulmonary nodules."; the reports a model was trained on
say "There is a pulmonary nodule in the left lower lobe." and "No lung nodule or mass is seen.".
After a short training the text tower places the plain phrase only roughly where those
sentences are, and zero-shot scores images along the difference of the two prompts, so the
prompts lose part of what the image side holds (docs/evaluation.md, "Prompts grounded in the
training reports"). Grounding adds to each class of a prompt pair the training sentences that
say the same thing, found without labels:

* **what a sentence is about** comes from a sentence-similarity model (the MiniLM that ships
  with hlip), which was trained for exactly that and does not move with the trained model;
* **which class it speaks for** comes from the trained model's own text tower: a sentence
  belongs to the class whose prompt it lies closest to. This is where negation is decided
  ("No pleural effusion." against "Pleural effusion."), which a general similarity model
  does poorly and the trained tower learnt from the reports.

For each class the :data:`NEIGHBOURS` most relevant sentences of that class join its prompt,
each with the weight of one phrase, if their relevance is at least :data:`MIN_RELEVANCE` and
within :data:`KEEP` of the best one's (so a finding the reports never mention keeps its prompt
alone). Labels without negative prompts are not grounded: with one class there is no side to
choose. No label is read anywhere; the corpus is the reports' text only.

The image tower was aligned with whole reports, not with single sentences, so the grounded
classes then sort the training reports themselves: a report belongs to the class its sentence
most relevant to the label lies closest to (text against text, which the trained tower does
well), and each class embedding becomes the mean embedding of its reports, a *report
prototype*, when every class of the label has at least :data:`MIN_REPORTS` of them. Otherwise
the label keeps its grounded sentences (docs/evaluation.md, "Report prototypes").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hlip.evaluate.zeroshot import l2_normalize

NEIGHBOURS = 8
"""Corpus sentences added to a class at most."""
KEEP = 0.9
"""A sentence joins only if its relevance is at least this share of the best sentence's."""
SHARED = 0.95
"""A sentence grounds a label of the prompt set only if its relevance to that label is at least
this share of its relevance to the label it is most relevant to (0: every label it is relevant
enough to; 1: that label alone). For the similarity model "No intracranial mass." is relevant
to a "no hemorrhage" class at 0.77 and to a "no mass" class at 0.89 (a share of 0.87);
grounding both makes a brain mass lower every study's hemorrhage score. Labels that are near
synonyms (a CT and an MR "hemorrhage", or "arterial" and "coronary artery wall calcification")
stay within the share and keep their common sentences. Measured with
``bench/grounding_sweep.py`` (docs/evaluation.md, "Each report sentence grounds one label")."""
MIN_RELEVANCE = 0.5
"""Cosine similarity (similarity model) below which a sentence is about something else."""
MIN_REPORTS = 10
"""Training reports each class of a label needs for report prototypes (fewer: a mean of a few
reports carries their other findings too, and the label keeps its grounded sentences)."""
MAX_STUDIES = 20_000
"""Reports read per corpus at most (spread evenly over the dataset's studies)."""
MAX_SENTENCES = 20_000
"""Distinct sentences kept at most (the most frequent): both encoders embed each once."""
SIMILARITY_BATCH = 256

Encoder = Callable[[Sequence[str]], np.ndarray]
"""Sentences -> unit-length embeddings ``[n, D]``."""


@dataclass
class Corpus:
    """Distinct training-report sentences, embedded by the trained model's text tower
    (``vectors``) and by the similarity model (``relevance``, with ``relate`` to embed prompts
    the same way); and the training reports, each as the indices of its sentences
    (``reports``) and embedded whole by the text tower (``report_vectors``)."""

    sentences: list[str]
    vectors: np.ndarray
    relevance: np.ndarray
    relate: Encoder
    info: dict = field(default_factory=dict)
    reports: list[np.ndarray] = field(default_factory=list)
    report_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def ground(
        self, classes: np.ndarray, class_relevance: np.ndarray, required: np.ndarray | None = None
    ) -> np.ndarray:
        """``[K, T, E]`` class embeddings (per class and template, as
        :meth:`hlip.evaluate.zeroshot.SentenceBank.class_embeddings` builds them), grounded
        (:meth:`grounded`)."""
        return self.grounded(classes, class_relevance, required)[0]

    def describe(
        self, classes: np.ndarray, class_relevance: np.ndarray, required: np.ndarray | None = None
    ) -> dict:
        """How :meth:`ground` grounds these classes, for the metrics (:meth:`grounded`)."""
        return self.grounded(classes, class_relevance, required)[1]

    def grounded(
        self, classes: np.ndarray, class_relevance: np.ndarray, required: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict]:
        """The grounded ``[K, T, E]`` classes and how they were grounded: per class the mean
        text-tower embedding of the training reports :meth:`report_classes` sorts to it (a
        report prototype, the same for every template) when every class has at least
        :data:`MIN_REPORTS` of them, else the :meth:`sentence_classes`; with the reports sorted
        to each class.

        ``class_relevance`` ``[K, R]``: each class's prompts embedded by :attr:`relate`.
        ``required`` ``[S]`` (:meth:`required_relevance`): a sentence less relevant to these
        prompts than that does not join and sorts no report."""
        if len(classes) < 2:
            return classes, {"classes": "prompts", "reports": []}  # no side to choose
        sentence_classes = self.sentence_classes(classes, class_relevance, required)
        sorted_to = self.report_classes(
            l2_normalize(sentence_classes.mean(axis=1)), class_relevance, required
        )
        counts = np.bincount(sorted_to[sorted_to >= 0], minlength=len(classes))
        if counts.min() < MIN_REPORTS:
            return sentence_classes, {"classes": "sentences", "reports": counts.tolist()}
        prototypes = l2_normalize(
            np.stack([self.report_vectors[sorted_to == k].mean(axis=0) for k in range(len(classes))])
        )
        prototypes = np.repeat(prototypes[:, None], classes.shape[1], axis=1)
        return prototypes, {"classes": "report prototypes", "reports": counts.tolist()}

    def sentence_classes(
        self, classes: np.ndarray, class_relevance: np.ndarray, required: np.ndarray | None = None
    ) -> np.ndarray:
        """``[K, T, E]``: ``classes`` (two or more) with each class's corpus sentences added, each
        weighing as one unit-length phrase."""
        side = np.argmax(self.vectors @ l2_normalize(classes.mean(axis=1)).T, axis=1)
        if required is not None:
            side[self.about(class_relevance) < required - 1e-9] = -1  # about another label
        grounded = []
        for k, per_template in enumerate(classes):
            chosen = self.vectors[self.neighbours(side == k, self.relevance @ class_relevance[k])]
            grounded.append(
                np.stack(
                    [np.vstack([l2_normalize(vector)[None], chosen]).mean(axis=0) for vector in per_template]
                )
            )
        return np.stack(grounded)

    def report_classes(
        self, classes: np.ndarray, class_relevance: np.ndarray, required: np.ndarray | None = None
    ) -> np.ndarray:
        """``[N]``: per training report, the class (of ``classes`` ``[K, E]``, the grounded ones)
        nearest to its sentence most relevant to the label, among its sentences relevant enough
        (:data:`MIN_RELEVANCE`) and about this label (``required``, as in :meth:`grounded`); -1
        for a report with none."""
        sorted_to = np.full(len(self.reports), -1)
        if not self.reports:
            return sorted_to
        relevance = self.about(class_relevance)
        eligible = relevance >= MIN_RELEVANCE
        if required is not None:
            eligible &= relevance >= required - 1e-9
        sentence = np.concatenate(self.reports)
        owner = np.repeat(np.arange(len(self.reports)), [len(r) for r in self.reports])
        score = np.where(eligible[sentence], relevance[sentence], -np.inf)
        best = np.full(len(self.reports), -np.inf)
        np.maximum.at(best, owner, score)
        chosen = np.flatnonzero(np.isfinite(score) & (score == best[owner]))
        members, first = np.unique(owner[chosen], return_index=True)  # one sentence per report
        sorted_to[members] = np.argmax(self.vectors[sentence[chosen[first]]] @ classes.T, axis=1)
        return sorted_to

    def required_relevance(self, labels: Sequence[np.ndarray]) -> np.ndarray | None:
        """``[S]``: the relevance a sentence needs to ground one of ``labels`` in :meth:`ground`,
        :data:`SHARED` times its relevance to the label it is most relevant to (``labels``: each
        label's ``[K, R]`` class relevance); None when :data:`SHARED` is 0, or without labels."""
        if not SHARED or not len(labels):
            return None
        return SHARED * np.max([self.about(class_relevance) for class_relevance in labels], axis=0)

    def about(self, class_relevance: np.ndarray) -> np.ndarray:
        """``[S]``: each sentence's relevance to one label, that of its most relevant class
        (``class_relevance`` ``[K, R]``)."""
        return (self.relevance @ class_relevance.T).max(axis=1)

    @staticmethod
    def neighbours(on_side: np.ndarray, relevance: np.ndarray) -> np.ndarray:
        """Indices of the sentences joining one class: on its side, relevant enough, best first."""
        candidates = np.flatnonzero(on_side & (relevance >= MIN_RELEVANCE))
        if not len(candidates):
            return candidates
        best = relevance[candidates].max()
        candidates = candidates[relevance[candidates] >= KEEP * best]
        return candidates[np.argsort(-relevance[candidates], kind="stable")][:NEIGHBOURS]


def read_reports(
    paths: Sequence[str | Path], sections: Sequence[str], max_studies: int = MAX_STUDIES
) -> tuple[list[str], int]:
    """The training ``sections`` of (at most ``max_studies``, spread evenly) reports of the shard
    datasets ``paths``, and the number that could not be read (a damaged sample is left out,
    as training leaves it out, and counted). The reports alone are read, no arrays."""
    from hlip.shards.format import ShardFormatError
    from hlip.shards.reader import ShardDataset
    from hlip.train.data import select_sections

    texts: list[str] = []
    unreadable = 0
    per_dataset = max(1, max_studies // max(1, len(paths)))
    for path in paths:
        dataset = ShardDataset(path)
        keys = dataset.keys()
        for key in keys[:: max(1, -(-len(keys) // per_dataset))]:
            try:
                texts.append(select_sections(dataset.report(key), sections).strip())
            except ShardFormatError:
                unreadable += 1
    return texts, unreadable


def sentence_index(texts: Sequence[str], without_measurements: bool) -> tuple[list[str], list[np.ndarray]]:
    """The distinct sentences of ``texts`` as the model reads them (without measurements if it
    drops them), most frequent first and at most :data:`MAX_SENTENCES`, and per text the
    indices of its sentences among them."""
    from hlip.model.text import drop_measurements, split_sentences

    split = [split_sentences(drop_measurements(t) if without_measurements else t) for t in texts]
    counts = Counter(sentence for sentences in split for sentence in sentences)
    kept = [sentence for sentence, _ in counts.most_common(MAX_SENTENCES)]
    index = {sentence: i for i, sentence in enumerate(kept)}
    return kept, [
        np.array([index[s] for s in sentences if s in index], dtype=np.int64) for sentences in split
    ]


def similarity_encoder() -> Encoder:
    """The MiniLM sentence-similarity model that ships with hlip (mean-pooled, unit length)."""
    import torch

    from hlip.model.text import TextTower, Tokenizer

    tower, tokenizer = TextTower.from_pretrained(None, 8, pooling="mean").eval(), Tokenizer(None, 128)

    def encode(sentences: Sequence[str]) -> np.ndarray:
        chunks = [np.zeros((0, tower.transformer.config.hidden_size))]
        with torch.inference_mode():
            for start in range(0, len(sentences), SIMILARITY_BATCH):
                tokens = tokenizer(list(sentences[start : start + SIMILARITY_BATCH]))
                hidden = tower.transformer(**tokens).last_hidden_state
                chunks.append(tower.pool(hidden, tokens["attention_mask"]).numpy())
        return l2_normalize(np.concatenate(chunks))

    return encode


@dataclass
class ReportSentences:
    """The distinct sentences of a set of training reports, embedded by the similarity model,
    and the reports as the model reads them: the part of a :class:`Corpus` that does not change
    as a model trains, read once and embedded by each new state of the text tower with
    :meth:`corpus`."""

    sentences: list[str]
    relevance: np.ndarray
    relate: Encoder
    info: dict
    reports: list[np.ndarray] = field(default_factory=list)
    """Per report, the indices of its sentences."""
    texts: list[str] = field(default_factory=list)
    """Per report, its text as evaluation embeds a study's report."""

    def corpus(self, encode: Encoder) -> Corpus:
        """The corpus with the sentences and reports embedded by ``encode`` (a model's text tower)."""
        vectors = l2_normalize(encode(self.sentences))
        report_vectors = l2_normalize(encode(self.texts)) if self.texts else np.zeros((0, vectors.shape[1]))
        return Corpus(
            self.sentences, vectors, self.relevance, self.relate, self.info, self.reports, report_vectors
        )


def read_report_sentences(
    paths: Sequence[str | Path], sections: Sequence[str], without_measurements: bool, prefix: str = ""
) -> ReportSentences | None:
    """The report sentences of the shard datasets ``paths``, read with the model's report
    ``sections``, its reading of measurements and its text ``prefix``; None if the reports hold
    no sentence."""
    texts, unreadable = read_reports(paths, sections)
    sentences, reports = sentence_index(texts, without_measurements)
    if not sentences:
        return None
    stated = [i for i, report in enumerate(reports) if len(report)]
    relate = similarity_encoder()
    info = {
        "data": [str(p) for p in paths],
        "reports": len(texts),
        "unreadable_reports": unreadable,
        "sentences": len(sentences),
    }
    return ReportSentences(
        sentences,
        relate(sentences),
        relate,
        info,
        [reports[i] for i in stated],
        [prefix + texts[i] for i in stated],
    )


def grounding_paths(ground: str, training_data: Sequence[str]) -> list[str] | None:
    """The shard datasets whose reports ground the prompts: ``ground`` names them ("auto": the
    model's training data, "none": no grounding); None when there are none, or when one is not
    a directory here (a run trained elsewhere, or on remote shards, is scored ungrounded)."""
    if ground == "none":
        return None
    paths = [str(path) for path in training_data] if ground == "auto" else [ground]
    return paths if paths and all(Path(path).is_dir() for path in paths) else None


def model_corpus(loaded, paths: Sequence[str | Path]) -> Corpus | None:
    """The grounding corpus of the reports in ``paths`` for a loaded model
    (:class:`hlip.evaluate.embed.LoadedModel`), read with its report sections, its reading of
    measurements and its text prefix, and embedded by its text tower; None if the reports hold
    no sentence."""
    from hlip.evaluate.embed import text_encoder

    config = loaded.config
    sentences = read_report_sentences(
        paths, config.text_sections, loaded.tokenizer.drop_measurements, config.text_prefix
    )
    return sentences.corpus(text_encoder(loaded)) if sentences is not None else None
