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
