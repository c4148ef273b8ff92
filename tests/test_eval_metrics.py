"""sigvlp.eval metrics against hand-computed values (CT-CLIP's threshold rule, weighted F1),
scikit-learn on bootstrap resamples, and the bootstrap's resampling itself."""

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the eval extra (scikit-learn) is not installed")

from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402

from sigvlp.eval import binary_metrics  # noqa: E402
from sigvlp.eval.metrics import (THRESHOLD_GRID, bootstrap_ci, ctclip_threshold, detection_metrics,  # noqa: E402
                                 dice_scores, multilabel_metrics, rank_auroc, retrieval_metrics, weighted_f1)


def test_threshold_rule_by_hand():
    # scores 0.1 (neg), 0.4 (neg), 0.35 (pos), 0.8 (pos). Distance sqrt((1-TPR)^2 + FPR^2) over t:
    # [0, 0.1): 1 | [0.1, 0.35): 0.5 | [0.35, 0.4): 0.707 | [0.4, 0.8): 0.5 | [0.8, 1]: 1
    # Ties go to the last grid point at the minimum: the largest k/99 below 0.8 is 79/99.
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert ctclip_threshold(y, s) == pytest.approx(79 / 99, abs=1e-12)
    m = binary_metrics(y, s)
    assert set(m) == {"auroc", "f1_weighted", "accuracy", "precision", "threshold"}
    # at t = 79/99 the predictions are [0, 0, 0, 1]
    assert m["auroc"] == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(1.0)
    # F1(pos) = 2*1/(1+2) = 2/3, F1(neg) = 2*2/(3+2) = 0.8, supports 2 and 2
    assert m["f1_weighted"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 0.8)


def test_threshold_is_strictly_greater_and_on_the_grid():
    g = THRESHOLD_GRID
    assert len(g) == 100 and g[0] == 0.0 and g[-1] == 1.0
    # a positive scored exactly at grid[33] is predicted negative at t = grid[33] ("score > t"):
    # only thresholds below grid[33] separate the classes, and the last of them is grid[32].
    y, s = [0, 1], [0.05, g[33]]
    assert ctclip_threshold(y, s) == g[32]


def test_weighted_f1_by_hand_with_unequal_supports():
    y = [0, 0, 0, 1, 1]
    s = [0.1, 0.6, 0.2, 0.7, 0.3]
    m = binary_metrics(y, s, threshold=0.5)  # predictions [0, 1, 0, 1, 0]
    # F1(neg) = 2*2/(3+3) = 2/3 (support 3), F1(pos) = 2*1/(2+2) = 1/2 (support 2)
    assert m["f1_weighted"] == pytest.approx(3 / 5 * 2 / 3 + 2 / 5 * 1 / 2)  # 0.6, not macro 0.583 nor binary 0.5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["threshold"] == 0.5
    d = detection_metrics(y, s, 0.5)
    assert (d["precision"], d["recall"], d["f1"]) == pytest.approx((0.5, 0.5, 0.5))


def test_precision_zero_when_nothing_predicted_positive():
    m = binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], threshold=0.9)
    assert m["precision"] == 0.0 and m["accuracy"] == 0.5


@pytest.mark.parametrize("y, s, match", [
    ([0, 0, 0], [0.1, 0.2, 0.3], "y_true: needs both classes"),
    ([0, 2, 1], [0.1, 0.2, 0.3], "y_true: expected 0/1"),
    ([0, 1, 1], [0.1, 0.2], r"y_score: expected shape \(3,\)"),
    ([0, 1], [0.1, float("nan")], "y_score: scores must be finite"),
    ([[0, 1]], [[0.1, 0.2]], "y_true: expected a 1-D"),
])
def test_bad_input(y, s, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(y, s)


def test_multilabel_selects_labels_and_averages():
    rng = np.random.default_rng(0)
    y = np.stack([rng.integers(0, 2, 40), np.r_[np.ones(3), np.zeros(37)], rng.integers(0, 2, 40)], 1)
    s = rng.random((40, 3))
    out = multilabel_metrics(y, s, ["a", "rare", "c"], min_positives=5, min_negatives=5)
    assert out["labels_used"] == ["a", "c"] and out["labels_skipped"]["rare"]["positives"] == 3
    assert out["mean"]["auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in (0, 2)]))
    assert out["per_label"]["a"]["n_pos"] == int(y[:, 0].sum())
    with pytest.raises(ValueError, match="no label has"):
        multilabel_metrics(y[:, 1:2], s[:, 1:2], ["rare"], min_positives=5)


def test_vectorised_bootstrap_statistics_equal_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (6, 30))
    s = np.round(rng.random((6, 30)), 1)  # ties on purpose
    y[:, 0], y[:, 1] = 0, 1
    np.testing.assert_allclose(rank_auroc(y, s), [roc_auc_score(a, b) for a, b in zip(y, s)], rtol=0, atol=1e-12)
    pred = s > 0.45
    np.testing.assert_allclose(weighted_f1(y, pred),
                               [f1_score(a, b, average="weighted", zero_division=0) for a, b in zip(y, pred)],
                               rtol=0, atol=1e-12)
    assert np.isnan(rank_auroc(np.zeros((1, 5)), rng.random((1, 5)))).all()


def _task(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, 3))
    s = np.clip(0.5 + 0.25 * (y - 0.5) + 0.2 * rng.standard_normal((n, 3)), 0, 1)  # AUROC ~0.8
    return y, s


def test_bootstrap_really_resamples():
    y, s = _task(60)
    t = [0.5, 0.5, 0.5]
    a = bootstrap_ci(y, s, t, n_resamples=300, seed=0)
    b = bootstrap_ci(y, s, t, n_resamples=300, seed=0)
    c = bootstrap_ci(y, s, t, n_resamples=300, seed=1)
    assert a == b  # seeded
    assert a["mean_auroc"] != c["mean_auroc"]  # another seed draws other resamples
    point = np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(3)])
    iv = a["mean_auroc"]
    assert iv["low"] < point < iv["high"] and iv["high"] - iv["low"] > 0.02
    assert iv["estimate"] == pytest.approx(point, abs=0.02)
    f1 = a["mean_f1_weighted"]
    assert f1["low"] < f1["high"]


def test_bootstrap_interval_narrows_as_n_grows():
    widths = []
    for n in (40, 160, 640):
        y, s = _task(n, seed=n)
        iv = bootstrap_ci(y, s, [0.5] * 3, n_resamples=400, seed=0)["mean_auroc"]
        widths.append(iv["high"] - iv["low"])
    # the standard error falls as 1/sqrt(n): each 4x step roughly halves the width
    assert widths[0] > 1.4 * widths[1] > 1.4 ** 2 * widths[2]


def test_bootstrap_bad_input():
    y, s = _task(10)
    with pytest.raises(ValueError, match="thresholds: expected 3"):
        bootstrap_ci(y, s, [0.5, 0.5])
    with pytest.raises(ValueError, match="y_score: expected"):
        bootstrap_ci(y, s[:, :2], [0.5] * 3)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(y, s, [0.5] * 3, n_resamples=0)


def test_retrieval_by_hand():
    sim = np.array([[0.9, 0.1, 0.5],   # own (col 0) first: rank 1
                    [0.8, 0.2, 0.1],   # own (col 1): col 0 above -> rank 2
                    [0.7, 0.6, 0.3]])  # own (col 2): cols 0 and 1 above -> rank 3
    r = retrieval_metrics(sim, np.eye(3, dtype=bool), ks=(1, 2, 5))
    assert r["R@1"] == pytest.approx(1 / 3) and r["R@2"] == pytest.approx(2 / 3) and r["R@5"] == 1.0
    assert r["median_rank"] == 2 and r["mean_rank"] == 2
    pos = np.eye(3, dtype=bool)
    pos[2, 0] = True  # a second correct candidate (identical text) for query 2
    assert retrieval_metrics(sim, pos, ks=(1,))["R@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no positive"):
        retrieval_metrics(sim, np.zeros((3, 3), bool))


def test_retrieval_ties_are_broken_at_random_in_expectation():
    # a negative scored equal to the query's best positive shares the place with it: the hit
    # probability at k is the chance a uniformly random order of the tied group puts a
    # positive within the first k - G places (G = negatives strictly above)
    sim = np.array([[0.5, 0.5, 0.1],
                    [0.2, 0.9, 0.9],
                    [0.3, 0.3, 0.3]])
    r = retrieval_metrics(sim, np.eye(3, dtype=bool), ks=(1, 2, 3))
    # q0, q1: tied with one negative -> 1/2 at k=1, 1 at k=2, rank 1.5
    # q2: tied with two negatives -> 1/3, 2/3, 1; rank 1 + 2/2 = 2
    assert r["R@1"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3, rel=1e-12)
    assert r["R@2"] == pytest.approx((1 + 1 + 2 / 3) / 3, rel=1e-12) and r["R@3"] == 1.0
    assert r["mean_rank"] == pytest.approx((1.5 + 1.5 + 2) / 3, rel=1e-12)
    assert r["median_rank"] == pytest.approx(1.5, rel=1e-12)
    # a tie between two positives (and nothing else) is a full hit
    pos = np.eye(3, dtype=bool)
    pos[0, 1] = True
    assert retrieval_metrics(sim, pos, ks=(1,))["R@1"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3, rel=1e-12)
    # one negative strictly above (G=1), two tied positives and one tied negative (T=1):
    # of the random orders of {p, p, n} a positive comes first in 2 of 3
    row = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    p = np.array([[False, True, True, False, False]])
    r = retrieval_metrics(row, p, ks=(1, 2, 3))
    assert r["R@1"] == 0.0 and r["R@2"] == pytest.approx(2 / 3, rel=1e-12) and r["R@3"] == 1.0
    assert r["mean_rank"] == pytest.approx(1 + 1 + 1 / 3, rel=1e-12)  # G + 1 + T / (P + 1)


def test_retrieval_ties_agree_with_random_tie_breaking():
    # the expectation equals the average over every order of the tied candidates (brute force)
    import itertools
    sim = np.array([[0.4, 0.4, 0.4, 0.4, 0.9, 0.1]])
    pos = np.array([[True, True, False, False, False, False]])
    tied = [0, 1, 2, 3]
    hits = {k: [] for k in (1, 2, 3, 4)}
    ranks = []
    for order in itertools.permutations(tied):
        first = next(i for i, c in enumerate(order) if pos[0, c])
        rank = 1 + 1 + first  # one negative (col 4) strictly above
        ranks.append(rank)
        for k in hits:
            hits[k].append(rank <= k)
    r = retrieval_metrics(sim, pos, ks=(1, 2, 3, 4))
    for k in hits:
        assert r[f"R@{k}"] == pytest.approx(np.mean(hits[k]), rel=1e-12, abs=1e-15)
    assert r["mean_rank"] == pytest.approx(np.mean(ranks), rel=1e-12)


def test_retrieval_collapsed_model_is_at_chance():
    # every embedding equal: every candidate scores the same, so a query's positive sits at a
    # uniformly random place among the C candidates and recall@k is exactly k / C
    rng = np.random.default_rng(0)
    n = 50
    e = np.tile(rng.normal(size=(1, 8)), (n, 1))
    sim = e @ e.T
    for s in (sim, sim.T):
        r = retrieval_metrics(s, np.eye(n, dtype=bool), ks=(1, 5, 10, 50))
        for k in (1, 5, 10, 50):
            assert r[f"R@{k}"] == pytest.approx(k / n, rel=1e-12)
        assert r["mean_rank"] == pytest.approx((n + 1) / 2, rel=1e-12)
    # random (uninformative) embeddings sit at chance: mean over queries of R@k ~ k / C
    v, t = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    r = retrieval_metrics(v @ t.T, np.eye(2000, dtype=bool), ks=(100,))
    assert abs(r["R@100"] - 100 / 2000) < 4 * np.sqrt(0.05 * 0.95 / 2000)


def test_dice_by_hand():
    g = np.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    p = np.array([[0, 1, 2, 2], [0, 1, 1, 0]])
    d = dice_scores(p, g, 4)
    # class 1: |G|=3, |P|=3, overlap 2 -> 4/6; class 2: |G|=3, |P|=2, overlap 1 -> 2/5; class 3 absent -> NaN
    assert np.isnan(d[0]) and d[1] == pytest.approx(4 / 6) and d[2] == pytest.approx(2 / 5) and np.isnan(d[3])
