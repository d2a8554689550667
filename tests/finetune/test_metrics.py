"""Accuracy and macro-F1 against hand-computed examples and a brute-force count."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinysft.finetune.metrics import accuracy, classification_metrics, confusion_matrix, macro_f1


def test_hand_computed_example():
    labels = [0, 0, 1, 1, 1, 2]
    pred = [0, 1, 1, 1, 2, 2]
    # class 0: TP 1, FP 0, FN 1 -> F1 2/3;  class 1: TP 2, FP 1, FN 1 -> 2/3;  class 2: TP 1, FP 1, FN 0 -> 2/3
    assert accuracy(pred, labels) == pytest.approx(4 / 6)
    assert macro_f1(pred, labels) == pytest.approx(2 / 3)


def test_macro_f1_weights_classes_equally():
    labels = [0] * 8 + [1] * 2
    pred = [0] * 10  # all majority: F1_0 = 2·8/(16+2) = 8/9, F1_1 = 0
    assert accuracy(pred, labels) == pytest.approx(0.8)
    assert macro_f1(pred, labels) == pytest.approx((8 / 9 + 0) / 2)


def test_class_absent_everywhere_counts_only_with_num_classes():
    labels, pred = [0, 1, 1], [0, 1, 0]  # F1_0 = 2/3, F1_1 = 2/3
    assert macro_f1(pred, labels) == pytest.approx(2 / 3)
    assert macro_f1(pred, labels, num_classes=3) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_ignore_index_positions_are_dropped():
    assert accuracy([1, 0, 5], [1, 1, -100]) == 0.5
    assert macro_f1([1, 1, 5], [1, 1, -100]) == 1.0


def test_confusion_matrix_and_logits_entry_point():
    m = confusion_matrix([0, 2, 2, 1], [0, 1, 2, 1], num_classes=3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    logits = np.array([[2.0, 0, 0], [0, 0, 1], [0, 0, 3], [0, 1, 0]])
    out = classification_metrics(logits, np.array([0, 1, 2, 1]))
    assert out["accuracy"] == 0.75 and out["macro_f1"] == pytest.approx(macro_f1([0, 2, 2, 1], [0, 1, 2, 1]))


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=40))
def test_against_brute_force(pairs):
    pred = [p for p, _ in pairs]
    labels = [t for _, t in pairs]
    classes = sorted(set(pred) | set(labels))
    f1s = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in pairs)
        fp = sum(p == c and t != c for p, t in pairs)
        fn = sum(p != c and t == c for p, t in pairs)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert macro_f1(pred, labels) == pytest.approx(sum(f1s) / len(f1s))
    assert accuracy(pred, labels) == pytest.approx(sum(p == t for p, t in pairs) / len(pairs))
