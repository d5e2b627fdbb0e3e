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
    the same way)."""

    sentences: list[str]
    vectors: np.ndarray
    relevance: np.ndarray
    relate: Encoder
    info: dict = field(default_factory=dict)

    def ground(
        self, classes: np.ndarray, class_relevance: np.ndarray, required: np.ndarray | None = None
    ) -> np.ndarray:
        """``[K, T, E]`` class embeddings (per class and template, as
        :meth:`hlip.evaluate.zeroshot.SentenceBank.class_embeddings` builds them) with each
        class's corpus sentences added, each weighing as one unit-length phrase.

        ``class_relevance`` ``[K, R]``: each class's prompts embedded by :attr:`relate`.
        ``required`` ``[S]`` (:meth:`required_relevance`): a sentence less relevant to these
        prompts than that does not join."""
        if len(classes) < 2:
            return classes
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


def report_sentences(
    paths: Sequence[str | Path],
    sections: Sequence[str],
    without_measurements: bool,
    max_studies: int = MAX_STUDIES,
) -> tuple[Counter, int, int]:
    """Sentence counts over (at most ``max_studies``) reports of the shard datasets ``paths``,
    read as the model reads them: the training sections, without measurements if it drops
    them. Returns the counts, the number of reports read and the number that could not be
    (a damaged sample is left out, as training leaves it out, and counted)."""
    from hlip.model.text import drop_measurements, split_sentences
    from hlip.shards.format import ShardFormatError
    from hlip.shards.reader import ShardDataset
    from hlip.train.data import select_sections

    counts: Counter = Counter()
    read = unreadable = 0
    per_dataset = max(1, max_studies // max(1, len(paths)))
    for path in paths:
        dataset = ShardDataset(path)
        keys = dataset.keys()
        for key in keys[:: max(1, -(-len(keys) // per_dataset))]:
            try:
                text = select_sections(dataset.report(key), sections)
            except ShardFormatError:
                unreadable += 1
                continue
            text = drop_measurements(text) if without_measurements else text
            counts.update(split_sentences(text))
            read += 1
    return counts, read, unreadable


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
    """The distinct sentences of a set of training reports, embedded by the similarity model:
    the part of a :class:`Corpus` that does not change as a model trains, read once and
    embedded by each new state of the text tower with :meth:`corpus`."""

    sentences: list[str]
    relevance: np.ndarray
    relate: Encoder
    info: dict

    def corpus(self, encode: Encoder) -> Corpus:
        """The corpus with the sentences embedded by ``encode`` (a model's text tower)."""
        return Corpus(
            self.sentences, l2_normalize(encode(self.sentences)), self.relevance, self.relate, self.info
        )


def read_report_sentences(
    paths: Sequence[str | Path], sections: Sequence[str], without_measurements: bool
) -> ReportSentences | None:
    """The report sentences of the shard datasets ``paths``, read with the model's report
    ``sections`` and its reading of measurements; None if the reports hold no sentence."""
    counts, read, unreadable = report_sentences(paths, sections, without_measurements)
    sentences = [sentence for sentence, _ in counts.most_common(MAX_SENTENCES)]
    if not sentences:
        return None
    relate = similarity_encoder()
    info = {
        "data": [str(p) for p in paths],
        "reports": read,
        "unreadable_reports": unreadable,
        "sentences": len(sentences),
    }
    return ReportSentences(sentences, relate(sentences), relate, info)


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
    (:class:`hlip.evaluate.embed.LoadedModel`), read with its report sections and its reading of
    measurements and embedded by its text tower; None if the reports hold no sentence."""
    from hlip.evaluate.embed import text_encoder

    sentences = read_report_sentences(paths, loaded.config.text_sections, loaded.tokenizer.drop_measurements)
    return sentences.corpus(text_encoder(loaded)) if sentences is not None else None
