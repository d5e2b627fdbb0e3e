"""Metric code against scikit-learn, hand-computed cases, ties and degenerate labels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from hlip.evaluate import metrics as m

labels_and_scores = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        # few distinct values, so ties are common
        st.lists(st.integers(0, 4).map(lambda v: v / 4), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(labels_and_scores)
def test_auc_matches_sklearn_including_ties(data):
    y, s = map(np.array, data)
    if len(set(y.tolist())) < 2:
        with pytest.warns(m.MetricWarning, match="only"):
            assert np.isnan(m.roc_auc(y, s))
    else:
        assert m.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(labels_and_scores, st.sampled_from([0.25, 0.5, 0.75]))
def test_threshold_metrics_match_sklearn(data, threshold):
    y, s = map(np.array, data)
    pred = (s >= threshold).astype(int)
    rows = m.weighted_threshold_metrics(y, pred, np.ones((1, y.size)))
    if 0 < y.sum() < y.size:
        assert rows["sensitivity"][0] == pytest.approx(skm.recall_score(y, pred))
        assert rows["specificity"][0] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
        assert rows["balanced_accuracy"][0] == pytest.approx(skm.balanced_accuracy_score(y, pred))


@settings(max_examples=80, deadline=None)
@given(labels_and_scores)
def test_youden_threshold_reaches_the_best_balanced_accuracy_of_any_cut(data):
    y, s = map(np.array, data)
    if len(set(y.tolist())) < 2:
        with pytest.warns(m.MetricWarning, match="Youden threshold undefined"):
            assert np.isnan(m.youden_threshold(y, s))
        return
    cut = m.youden_threshold(y, s)
    best = max(skm.balanced_accuracy_score(y, s >= c) for c in [*np.unique(s), np.inf])
    assert skm.balanced_accuracy_score(y, s >= cut) == pytest.approx(best)
    assert cut not in set(s.tolist()) or cut == s.min()  # between two scores, not on one


def test_youden_threshold_lies_between_the_classes_it_separates():
    # every score above 0.5 (a two-prompt softmax that calls all positive at 0.5), ranked well
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.55, 0.58, 0.60, 0.70, 0.72, 0.90])
    assert m.youden_threshold(y, s) == pytest.approx(0.65)
    at_half = m.binary_metrics(y, s, threshold=0.5, n_boot=0)
    assert (at_half["sensitivity"]["value"], at_half["specificity"]["value"]) == (1.0, 0.0)
    calibrated = m.binary_metrics(y, s, threshold=m.youden_threshold(y, s), n_boot=0)
    assert calibrated["balanced_accuracy"]["value"] == 1.0
    assert m.youden_threshold([np.nan, 0, 1], [0.0, 0.2, 0.4]) == pytest.approx(0.3)  # unannotated left out


def test_hand_computed_auc_and_ties():
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # one tied pair counts 1/2: (0.5 = 0.5) -> 0.5, (0.9 > 0.5) -> 1 => 0.75
    assert m.roc_auc([0, 1, 1], [0.5, 0.5, 0.9]) == 0.75
    assert m.roc_auc([0, 1], [0.3, 0.3]) == 0.5


def test_missing_labels_are_left_out():
    y = np.array([0, np.nan, 1, 1, np.nan, 0])
    s = np.array([0.1, 0.99, 0.35, 0.8, 0.0, 0.4])
    assert m.roc_auc(y, s) == 0.75
    out = m.binary_metrics(y, s, threshold=0.5, name="x", n_boot=50)
    assert (out["n"], out["n_positive"]) == (4, 2)
    assert out["sensitivity"]["value"] == 0.5 and out["specificity"]["value"] == 1.0
    assert out["counts"] == {"tp": 1, "fn": 1, "fp": 0, "tn": 2}


@settings(max_examples=15, deadline=None)
@given(labels_and_scores, st.integers(0, 2**32 - 1))
def test_resample_weights_give_sklearn_auc_of_the_resampled_arrays(data, seed):
    y, s = map(np.array, data)
    rng = np.random.default_rng(seed)
    idx = m.bootstrap_indices(y.size, 10, rng)
    weights = m.resample_weights(y.size, 10, np.random.default_rng(seed))
    expected = [skm.roc_auc_score(y[r], s[r]) if 0 < y[r].sum() < y.size else np.nan for r in idx]
    np.testing.assert_allclose(m.weighted_auc(y, s, weights), expected, atol=1e-12)


def test_zero_weight_equals_leaving_the_study_out():
    rng = np.random.default_rng(3)
    y, s = rng.integers(0, 2, 30), np.round(rng.random(30), 1)
    keep = rng.random(30) > 0.3
    assert m.weighted_auc(y, s, keep[None])[0] == pytest.approx(
        skm.roc_auc_score(y[keep], s[keep]), abs=1e-12
    )


def test_single_class_gives_nan_with_a_warning():
    with pytest.warns(m.MetricWarning, match="only positive"):
        out = m.binary_metrics([1, 1, 1], [0.2, 0.7, 0.9], threshold=0.5, name="all-positive", n_boot=20)
    assert np.isnan(out["auc"]["value"]) and np.isnan(out["specificity"]["value"])
    assert out["sensitivity"]["value"] == pytest.approx(2 / 3)


def test_empty_label_gives_nan_with_a_warning():
    with pytest.warns(m.MetricWarning, match="no study is annotated"):
        out = m.binary_metrics([np.nan, np.nan], [0.2, 0.7], threshold=0.5, name="empty", n_boot=20)
    assert out["n"] == 0
    assert all(np.isnan(out[k]["value"]) and np.isnan(out[k]["ci_low"]) for k in m.BINARY_METRICS)


def test_non_binary_labels_are_rejected():
    with pytest.raises(ValueError, match="0, 1 or missing"):
        m.binary_metrics([0, 2], [0.1, 0.2], threshold=0.5)


def test_bootstrap_is_seeded_reproducible_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y * 0.5 + rng.random(200)
    first = m.binary_metrics(y, s, threshold=0.75, name="a", seed=7)
    assert first == m.binary_metrics(y, s, threshold=0.75, name="a", seed=7)
    assert first != m.binary_metrics(y, s, threshold=0.75, name="a", seed=8)
    for key in m.BINARY_METRICS:
        assert first[key]["ci_low"] <= first[key]["value"] <= first[key]["ci_high"]
        assert first[key]["ci_high"] - first[key]["ci_low"] > 0.01


def test_macro_is_the_mean_of_labels_and_skips_undefined_ones():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (80, 3)).astype(float)
    y[rng.random((80, 3)) < 0.2] = np.nan
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 1.0)  # label 2: positives only
    s = rng.random((80, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", m.MetricWarning)
        per_label = [
            m.binary_metrics(y[:, i], s[:, i], threshold=0.5, name=str(i), n_boot=10) for i in range(3)
        ]
    macro = m.macro_metrics(y, s, [0.5, 0.5, None], n_boot=200, seed=0)
    assert macro["auc"]["n_labels"] == 2
    assert macro["auc"]["value"] == pytest.approx(np.mean([p["auc"]["value"] for p in per_label[:2]]))
    assert macro["sensitivity"]["n_labels"] == 2  # label 2 has no threshold
    assert macro["auc"]["ci_low"] < macro["auc"]["value"] < macro["auc"]["ci_high"]
    assert macro == m.macro_metrics(y, s, [0.5, 0.5, None], n_boot=200, seed=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_multiclass_balanced_accuracy_and_confusion_match_sklearn(pairs):
    y, pred = map(np.array, zip(*pairs, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when pred has classes absent from y
        expected = skm.balanced_accuracy_score(y, pred)
    assert m.weighted_balanced_accuracy(y, pred, 4)[0] == pytest.approx(expected)
    np.testing.assert_array_equal(
        m.confusion_matrix(y, pred, 4), skm.confusion_matrix(y, pred, labels=range(4))
    )


def test_multiclass_metrics_report():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.1
    out = m.multiclass_metrics(y, probs, ["a", "b", "c"], name="t", n_boot=100)
    assert out["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert out["balanced_accuracy"]["value"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["per_class"]["b"]["auc"]["value"] == pytest.approx(skm.roc_auc_score(y == 1, probs[:, 1]))


def test_retrieval_ranks_count_ties_against_the_query():
    sim = np.array(
        [
            [0.9, 0.1, 0.2],  # match first: rank 1
            [0.5, 0.5, 0.1],  # tie with one other item: rank 2
            [0.3, 0.8, 0.1],  # two items above: rank 3
        ]
    )
    ranks = m.retrieval_ranks(sim)
    assert ranks.tolist() == [1, 2, 3]
    assert m.recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert m.recall_at_k(ranks, 2) == pytest.approx(2 / 3)
    assert m.retrieval_ranks(np.ones((4, 4))).tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="square"):
        m.retrieval_ranks(np.ones((2, 3)))


def test_no_bootstrap_gives_point_estimates_only():
    y, s = np.array([0, 1, 0, 1, 1]), np.array([0.1, 0.9, 0.3, 0.6, 0.2])
    out = m.binary_metrics(y, s, threshold=0.5, n_boot=0)
    assert out["auc"]["value"] == pytest.approx(5 / 6) and np.isnan(out["auc"]["ci_low"])
    macro = m.macro_metrics(np.stack([y, y], 1), np.stack([s, s], 1), [0.5, None], n_boot=0)
    assert macro["auc"]["value"] == pytest.approx(5 / 6) and np.isnan(macro["auc"]["ci_high"])
