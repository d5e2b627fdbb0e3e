"""Prompts grounded in training-report sentences: which sentences join which class, and the
corpus as read from shards."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hlip.evaluate import grounding
from hlip.evaluate.grounding import Corpus, read_reports, sentence_index
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


def _reporting_corpus(positives: int, negatives: int) -> tuple[Corpus, list[int], list[int]]:
    """Sentences: s0 positive, s1 negative, s2 about something else, s3 positive but less
    relevant than s1. Reports: ``positives`` of [s0, s2], ``negatives`` of [s1, s2], one of [s2],
    one of [s3, s1]. Returns the corpus and the indices of the reports that state each class."""
    corpus = _corpus(
        vectors=[POS + 0.2 * NEG, NEG + 0.2 * POS, POS, POS + 0.1 * NEG],
        relevance=[ABOUT, ABOUT + 0.1 * np.eye(R)[1], np.eye(R)[2], 0.8 * ABOUT + 0.6 * np.eye(R)[2]],
    )
    corpus.reports = [np.array([0, 2])] * positives + [np.array([1, 2])] * negatives
    corpus.reports += [np.array([2]), np.array([3, 1])]
    n = len(corpus.reports)
    corpus.report_vectors = l2_normalize(np.random.default_rng(n).normal(size=(n, E)))
    return corpus, list(range(positives)), list(range(positives, positives + negatives)) + [n - 1]


def test_with_enough_reports_per_class_a_class_is_the_mean_of_the_reports_stating_it():
    """A report joins the class of its sentence most relevant to the label; one without such a
    sentence joins neither; every template gets the prototype."""
    corpus, positive, negative = _reporting_corpus(grounding.MIN_REPORTS, grounding.MIN_REPORTS)
    classes = np.stack([np.stack([NEG, NEG + 0.1 * POS]), np.stack([POS, POS])])  # [K=2, T=2, E]
    grounded = corpus.ground(classes, np.stack([ABOUT, ABOUT]))
    for k, members in enumerate([negative, positive]):
        expected = l2_normalize(corpus.report_vectors[members].mean(axis=0))
        for t in range(2):
            np.testing.assert_allclose(grounded[k, t], expected, atol=1e-12)
    assert corpus.describe(classes, np.stack([ABOUT, ABOUT])) == {
        "classes": "report prototypes",
        "reports": [len(negative), len(positive)],
    }


def test_with_too_few_reports_in_a_class_the_label_keeps_its_grounded_sentences():
    corpus, _, _ = _reporting_corpus(grounding.MIN_REPORTS - 1, grounding.MIN_REPORTS + 5)
    classes = np.stack([NEG[None], POS[None]])
    grounded = corpus.ground(classes, np.stack([ABOUT, ABOUT]))
    assert corpus.describe(classes, np.stack([ABOUT, ABOUT])) == {
        "classes": "sentences",
        "reports": [grounding.MIN_REPORTS + 6, grounding.MIN_REPORTS - 1],
    }
    corpus.reports = []
    np.testing.assert_allclose(grounded, corpus.ground(classes, np.stack([ABOUT, ABOUT])))
    np.testing.assert_allclose(grounded[1, 0], (POS + corpus.vectors[0]) / 2)  # s3 is below KEEP


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
    texts, unreadable = read_reports([tmp_path / "shards"], ["findings"])
    assert (
        unreadable == 0
        and texts
        == [
            "No effusion. No nodule.",
            "A 12 mm nodule in the right upper lobe. No effusion.",
        ]
        * 2
    )
    sentences, reports = sentence_index(texts, without_measurements=True)
    assert sentences == [
        "No effusion.",
        "No nodule.",
        "A nodule in the right upper lobe.",
    ]  # most frequent first
    assert [list(r) for r in reports] == [[0, 1], [2, 0]] * 2
    texts, _ = read_reports([tmp_path / "shards"], [], max_studies=2)
    assert len(texts) == 2  # every other study: s0 and s2, read whole
    assert sentence_index(texts, without_measurements=False)[0] == [
        "FINDINGS:", "No effusion.", "No nodule.", "IMPRESSION:", "Normal."
    ]  # fmt: skip
    read = grounding.read_report_sentences([tmp_path / "shards"], ["findings"], True, prefix="CT: ")
    assert read.sentences == sentences and [list(r) for r in read.reports] == [[0, 1], [2, 0]] * 2
    assert read.texts[:2] == [
        "CT: No effusion. No nodule.",
        "CT: A 12 mm nodule in the right upper lobe. No effusion.",
    ]
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
    texts, unreadable = read_reports([tmp_path / "shards"], ["findings"])
    assert unreadable == 1 and texts == ["No effusion. Study 0.", "No effusion. Study 2."]
