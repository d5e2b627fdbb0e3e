"""Prompts grounded in training-report sentences: which sentences join which class, and the
corpus as read from shards."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hlip.evaluate import grounding
from hlip.evaluate.grounding import Corpus, report_sentences
from hlip.evaluate.prompts import parse_prompts
from hlip.evaluate.zeroshot import SentenceBank, l2_normalize
from hlip.shards.reader import ShardDataset
from hlip.shards.synthetic import synthetic_study
from hlip.shards.writer import write_dataset

E, R = 6, 4


def _corpus(vectors, relevance) -> Corpus:
    vectors, relevance = np.asarray(vectors, float), np.asarray(relevance, float)
    return Corpus(
        sentences=[f"s{i}" for i in range(len(vectors))],
        vectors=l2_normalize(vectors),
        relevance=l2_normalize(relevance),
        relate=lambda sentences: np.zeros((len(sentences), R)),
    )


NEG, POS = np.eye(E)[0], np.eye(E)[1]
ABOUT = np.eye(R)[0]  # what both prompts of the pair are about


def test_each_class_gains_the_relevant_sentences_on_its_side():
    near_pos, near_neg = POS + 0.2 * NEG, NEG + 0.2 * POS
    corpus = _corpus(
        vectors=[near_pos, near_neg, near_pos],
        relevance=[
            ABOUT,  # s0: a positive sentence about the finding
            ABOUT + 0.1 * np.eye(R)[1],  # s1: a negative one
            np.eye(R)[2] + 0.3 * ABOUT,  # s2: positive side, but about something else
        ],
    )
    classes = np.stack([NEG[None], POS[None]])  # [K=2, T=1, E]
    grounded = corpus.ground(classes, np.stack([ABOUT, ABOUT]))
    np.testing.assert_allclose(grounded[1, 0], (POS + corpus.vectors[0]) / 2)
    np.testing.assert_allclose(grounded[0, 0], (NEG + corpus.vectors[1]) / 2)


def test_a_finding_the_reports_never_mention_keeps_its_prompts():
    corpus = _corpus(vectors=[POS, NEG], relevance=[np.eye(R)[2], np.eye(R)[3]])
    classes = np.stack([2 * NEG[None], 3 * POS[None]])
    np.testing.assert_allclose(
        corpus.ground(classes, np.stack([ABOUT, ABOUT])), np.stack([NEG[None], POS[None]])
    )


def test_a_label_without_negative_prompts_is_not_grounded():
    corpus = _corpus(vectors=[POS], relevance=[ABOUT])
    classes = POS[None, None] * 2
    assert corpus.ground(classes, ABOUT[None]) is classes


def test_a_sentence_grounds_the_labels_it_is_about_and_not_a_label_it_is_clearly_less_about(monkeypatch):
    """A corpus sentence "No intracranial mass." denies an intracranial finding, as "No
    hemorrhage." does, and the tower places it on the hemorrhage pair's negative side, but it is
    clearly more about the mass (a share of 0.875 < ``SHARED``): it grounds "No mass." only. "No
    hematoma." is about the MR and the CT hemorrhage labels alike (near synonyms) and grounds
    both. With ``SHARED`` 1 it grounds only the one it is most relevant to; with 0, or in a
    bank that knows no other label, every negative class it is relevant enough to."""
    prompts = parse_prompts(
        {
            "templates": ["{}."],
            "labels": {
                "hemorrhage": {"positive": "Hemorrhage", "negative": "No hemorrhage"},
                "ct_hemorrhage": {
                    "positive": "Intracranial hemorrhage",
                    "negative": "No intracranial hemorrhage",
                },
                "mass": {"positive": "Mass", "negative": "No mass"},
            },
        }
    )
    # relevance axes: hemorrhage, mass, negation, other
    relate = {
        "Hemorrhage.": [1, 0, 0, 0],
        "No hemorrhage.": [1, 0, 1, 0],
        "Intracranial hemorrhage.": [1, 0, 0, 0.1],
        "No intracranial hemorrhage.": [1, 0, 1, 0.1],
        "Mass.": [0, 1, 0, 0],
        "No mass.": [0, 1, 1, 0],
    }
    tower = {"No hemorrhage.": 0, "Hemorrhage.": 1, "No mass.": 2, "Mass.": 3}
    tower |= {"No intracranial hemorrhage.": 0, "Intracranial hemorrhage.": 1}
    corpus = Corpus(
        sentences=["No intracranial mass.", "No hematoma."],
        vectors=l2_normalize([np.eye(E)[2] + 0.3 * np.eye(E)[0], np.eye(E)[0] + 0.1 * np.eye(E)[5]]),
        relevance=l2_normalize([[0.75, 1, 1, 0], [1, 0, 0.5, 0.6]]),
        relate=lambda sentences: l2_normalize([relate[s] for s in sentences]),
    )

    def encode(sentences):
        return np.stack([np.eye(E)[tower[s]] for s in sentences])

    def negative(bank, label):
        return bank.class_embeddings([label.negative, label.positive], label.templates)[0, 0]

    hemorrhage, ct_hemorrhage, mass = prompts.binary
    both = (np.eye(E)[0] + corpus.vectors.sum(axis=0)) / 3
    hematoma = (np.eye(E)[0] + corpus.vectors[1]) / 2
    np.testing.assert_allclose(negative(SentenceBank(encode, list(relate), corpus), hemorrhage), both)
    bank = SentenceBank.for_prompts(encode, prompts, corpus)
    np.testing.assert_allclose(negative(bank, hemorrhage), hematoma)
    np.testing.assert_allclose(negative(bank, ct_hemorrhage), hematoma)
    np.testing.assert_allclose(negative(bank, mass), (np.eye(E)[2] + corpus.vectors[0]) / 2)
    np.testing.assert_allclose(
        bank.class_embeddings([hemorrhage.positive], hemorrhage.templates)[0, 0], np.eye(E)[1]
    )
    monkeypatch.setattr(grounding, "SHARED", 1.0)
    bank = SentenceBank.for_prompts(encode, prompts, corpus)
    np.testing.assert_allclose(negative(bank, hemorrhage), np.eye(E)[0])
    np.testing.assert_allclose(negative(bank, ct_hemorrhage), hematoma)
    monkeypatch.setattr(grounding, "SHARED", 0.0)
    np.testing.assert_allclose(negative(SentenceBank.for_prompts(encode, prompts, corpus), hemorrhage), both)


def test_only_sentences_near_the_best_one_join_and_at_most_neighbours_of_them():
    relevance = np.array([0.95, 0.9, 0.8, 0.55, 0.4] + [0.94] * 20)
    on_side = np.array([True, True, True, True, True] + [True] * 20)
    chosen = Corpus.neighbours(on_side, relevance)
    assert len(chosen) == grounding.NEIGHBOURS and chosen[0] == 0
    assert set(chosen) <= {0, 1} | set(range(5, 25))  # 0.8 < 0.9 * 0.95
    assert len(Corpus.neighbours(on_side & (relevance < 0.5), relevance)) == 0


@settings(max_examples=60, deadline=None)
@given(
    vectors=arrays(np.float64, (12, E), elements=st.floats(-1, 1)),
    relevance=arrays(np.float64, (12, R), elements=st.floats(-1, 1)),
    prompts=arrays(np.float64, (2, E), elements=st.floats(-1, 1)),
    templates=st.integers(1, 3),
)
def test_grounded_classes_are_the_prompt_plus_sentences_of_that_class(vectors, relevance, prompts, templates):
    """Whatever the corpus: a class embedding is the mean of its unit prompt and of corpus
    sentences that lie closer to it than to the other class, are relevant, and number at most
    NEIGHBOURS; the same sentences for every template."""
    if np.any(np.linalg.norm(vectors, axis=1) < 1e-3) or np.any(np.linalg.norm(prompts, axis=1) < 1e-3):
        return
    corpus = _corpus(vectors, relevance)
    classes = np.repeat(prompts[:, None], templates, axis=1)
    grounded = corpus.ground(classes, np.stack([ABOUT, ABOUT]))
    cls = l2_normalize(prompts)
    for k in range(2):
        on_side = np.argmax(corpus.vectors @ cls.T, axis=1) == k
        chosen = Corpus.neighbours(on_side, corpus.relevance @ ABOUT)
        expected = np.vstack([cls[k][None], corpus.vectors[chosen]]).mean(axis=0)
        np.testing.assert_allclose(grounded[k, 0], expected, atol=1e-9)
        assert len(chosen) <= grounding.NEIGHBOURS and on_side[chosen].all()
        assert (corpus.relevance[chosen] @ ABOUT >= grounding.MIN_RELEVANCE - 1e-12).all()
        for t in range(templates):
            np.testing.assert_allclose(grounded[k, t], grounded[k, 0])


def test_the_corpus_is_read_as_the_model_reads_reports(tmp_path):
    """Training sections only, measurements dropped when the model drops them; the reports
    alone are read (no arrays opened)."""
    studies = []
    for i in range(4):
        study = synthetic_study(f"s{i}", n_scans=1, shape=(4, 8, 8), seed=i)
        study.report = (
            "INDICATION:\nCough.\n\nFINDINGS:\nA 12 mm nodule in the right upper lobe. No effusion.\n"
            if i % 2
            else "FINDINGS:\nNo effusion. No nodule.\n\nIMPRESSION:\nNormal."
        )
        studies.append(study)
    write_dataset(tmp_path / "shards", studies)
    counts, read, unreadable = report_sentences(
        [tmp_path / "shards"], ["findings"], without_measurements=True
    )
    assert (read, unreadable) == (4, 0)
    assert counts == {"No effusion.": 4, "No nodule.": 2, "A nodule in the right upper lobe.": 2}
    counts, read, _ = report_sentences([tmp_path / "shards"], [], without_measurements=False, max_studies=2)
    assert read == 2  # every other study: s0 and s2, read whole
    assert counts == {"FINDINGS:": 2, "No effusion.": 2, "No nodule.": 2, "IMPRESSION:": 2, "Normal.": 2}
    dataset = ShardDataset(tmp_path / "shards")
    assert all(dataset.report(key) == dataset.open(key).report for key in dataset)


def test_a_damaged_report_is_left_out_and_counted(tmp_path):
    studies = []
    for i in range(3):
        study = synthetic_study(f"s{i}", n_scans=1, shape=(4, 8, 8), seed=i)
        study.report = f"FINDINGS:\nNo effusion. Study {i}."
        studies.append(study)
    write_dataset(tmp_path / "shards", studies)
    row = ShardDataset(tmp_path / "shards").row("s1")
    shard = tmp_path / "shards" / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["txt_offset"]] ^= 0xFF  # the stored sha256 no longer matches
    shard.write_bytes(bytes(data))
    counts, read, unreadable = report_sentences(
        [tmp_path / "shards"], ["findings"], without_measurements=False
    )
    assert (read, unreadable) == (2, 1)
    assert counts == {"No effusion.": 2, "Study 0.": 1, "Study 2.": 1}
