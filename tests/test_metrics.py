"""Metrics against hand-computed values."""
import numpy as np

from utils.metrics import OTHER, classification_metrics, map_predictions


def test_map_predictions_marks_non_labels_other():
    assert map_predictions([11, 10, 99], [10, 11]).tolist() == [1, 0, OTHER]


def test_accuracy_f1_by_hand_with_an_out_of_label_prediction():
    y = [0, 0, 1, 1]
    pred = [0, 1, 1, OTHER]
    m = classification_metrics(y, pred, pred_ids=[10, 11, 11, 50], generic_token_ids=[50], restricted_pred=[0, 1, 1, 1])
    assert m["accuracy"] == 50.0
    # class 0: P=1, R=1/2, F1=2/3 ; class 1: P=1/2, R=1/2, F1=1/2 ; weights 1/2 each
    assert abs(m["f1"] - 100 * (2 / 3 + 1 / 2) / 2) < 1e-9
    assert abs(m["precision"] - 75.0) < 1e-9
    assert abs(m["recall"] - 50.0) < 1e-9
    assert m["accuracy_restricted"] == 75.0
    assert m["predictions"] == {"negative": 1, "positive": 2, "generic": 1, "other": 0}


def test_constant_predictor_f1():
    # the paper's collapsed GA row: always 'positive' on a 1:3 split
    y = np.array([0, 1, 1, 1])
    m = classification_metrics(y, np.ones(4, int))
    assert m["accuracy"] == 75.0
    # class 1: P=3/4, R=1, F1=6/7, weight 3/4; class 0: F1 0
    assert abs(m["f1"] - 100 * 0.75 * 6 / 7) < 1e-9


def test_seed_spread_by_hand():
    from utils.metrics import seed_spread

    # one review flips between the seeds: accuracies 50 / 25, population std 12.5; rates
    # p = (1, 0.5, 0, 0): sqrt(0.25) / 4 = 12.5%; three of four reviews agree on both seeds
    s = seed_spread([[1, 1, 0, 0], [1, 0, 0, 0]])
    assert s == {"accuracies": [50.0, 25.0], "std": 12.5, "review_std": 12.5, "same_share": 75.0}
    # whole seeds differ: std 50 against 25 for independent coins at p = 0.5
    s = seed_spread([[1, 1, 1, 1], [0, 0, 0, 0]])
    assert (s["std"], s["review_std"], s["same_share"]) == (50.0, 25.0, 0.0)
    # the flips cancel: the same accuracy on both seeds, though no review agrees
    s = seed_spread([[1, 1, 0, 0], [0, 0, 1, 1]])
    assert (s["std"], s["review_std"], s["same_share"]) == (0.0, 25.0, 0.0)


def test_seed_spread_review_std_is_the_mean_variance_of_independent_reviews():
    """Reviews flipped independently at their own rates: over many draws of three seeds the
    mean population variance of the accuracy equals the mean of review_std squared."""
    from utils.metrics import seed_spread

    rng = np.random.default_rng(0)
    rates = rng.uniform(0, 0.4, 64)
    var, review = [], []
    for _ in range(4000):
        s = seed_spread(rng.random((3, 64)) < rates)
        var.append(s["std"] ** 2)
        review.append(s["review_std"] ** 2)
    assert abs(np.mean(var) / np.mean(review) - 1) < 0.05
    assert abs(np.mean(var) - 2 / 3 * (rates * (1 - rates)).sum() / 64**2 * 1e4) / np.mean(var) < 0.05


def test_seed_spread_needs_two_seeds():
    import pytest

    from utils.metrics import seed_spread

    with pytest.raises(ValueError, match="seeds >= 2"):
        seed_spread([[1, 0, 1]])


def test_paired_difference_by_hand():
    from utils.metrics import paired_difference

    # differences 2, 4, 6: mean 4, sample std 2, t(0.975, 2 df) = 4.302653 -> half-width 4.302653 * 2 / sqrt(3)
    d = paired_difference([90, 92, 94], [88, 88, 88])
    half = 4.302652729749464 * 2 / np.sqrt(3)
    assert d["n"] == 3 and d["differences"] == [2.0, 4.0, 6.0] and d["mean"] == 4.0 and d["std"] == 2.0
    assert abs(d["low"] - (4 - half)) < 1e-9 and abs(d["high"] - (4 + half)) < 1e-9
    # a constant difference has no spread: the interval is the point
    d = paired_difference([80, 70], [85, 75])
    assert (d["mean"], d["std"], d["low"], d["high"]) == (-5.0, 0.0, -5.0, -5.0)
    # pairing: both rows spread by 10 over the seeds, their difference not at all
    assert paired_difference([70, 90], [75, 95])["std"] == 0.0


def test_paired_difference_needs_two_paired_seeds():
    import pytest

    from utils.metrics import paired_difference

    for a, b in (([1.0], [2.0]), ([1, 2, 3], [1, 2])):
        with pytest.raises(ValueError, match="two equal-length series"):
            paired_difference(a, b)
