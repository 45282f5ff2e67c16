"""Tests for drjax.metrics: hand-computed cases and scikit-learn as the reference."""

import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from drjax import metrics

# A fake model whose predictions we know: 10 eyes, true and predicted grades.
#   idx    0  1  2  3  4  5  6  7  8  9
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 3, 4]
PREDS = [0, 0, 1, 2, 1, 0, 2, 1, 4, 4]


def _one_hot_probs(preds, num_classes=5, confidence=0.6):
  """Probabilities whose argmax is `preds` (the rest spread evenly)."""
  probs = np.full((len(preds), num_classes), (1 - confidence) / (num_classes - 1))
  probs[np.arange(len(preds)), preds] = confidence
  return probs


def test_confusion_matrix_hand_computed():
  cm = metrics.confusion_matrix(LABELS, PREDS)
  expected = np.zeros((5, 5), np.int64)
  for t, p in zip(LABELS, PREDS, strict=True):
    expected[t, p] += 1
  assert cm.dtype == np.int64 and cm.shape == (5, 5)
  np.testing.assert_array_equal(cm, expected)
  assert cm[0].tolist() == [2, 1, 1, 0, 0]  # rows are the truth
  assert cm[:, 4].tolist() == [0, 0, 0, 1, 1]


def test_binary_report_referable_hand_computed():
  # Referable (grade >= 2): true positives are idx 6, 7, 8, 9; predicted positive 3, 6, 8, 9.
  # TP = {6, 8, 9} = 3, FN = {7} = 1, FP = {3} = 1, TN = 10 - 5 = 5.
  r = metrics.binary_report(LABELS, PREDS)
  assert (r['tp'], r['fn'], r['fp'], r['tn']) == (3, 1, 1, 5)
  assert r['sensitivity'] == pytest.approx(3 / 4)
  assert r['specificity'] == pytest.approx(5 / 6)
  assert r['accuracy'] == pytest.approx(8 / 10)
  assert r['precision'] == pytest.approx(3 / 4)
  assert 'auc' not in r  # grades only, no scores


def test_binary_report_any_dr_hand_computed():
  # Any DR (grade >= 1): positives idx 4..9 (6), predicted positive {2, 3, 4, 6, 7, 8, 9}.
  # TP = {4, 6, 7, 8, 9} = 5, FN = {5} = 1, FP = {2, 3} = 2, TN = {0, 1} = 2.
  r = metrics.binary_report(LABELS, PREDS, threshold_grade=1)
  assert (r['tp'], r['fn'], r['fp'], r['tn']) == (5, 1, 2, 2)
  assert r['sensitivity'] == pytest.approx(5 / 6)
  assert r['specificity'] == pytest.approx(2 / 4)
  assert r['accuracy'] == pytest.approx(7 / 10)


def test_binary_report_from_probs_uses_argmax_and_adds_auc():
  r_probs = metrics.binary_report(LABELS, _one_hot_probs(PREDS))
  r_preds = metrics.binary_report(LABELS, PREDS)
  for key in ('tp', 'tn', 'fp', 'fn', 'sensitivity', 'specificity', 'accuracy'):
    assert r_probs[key] == r_preds[key]
  assert 0.0 <= r_probs['auc'] <= 1.0


def test_sensitivity_is_the_fixed_formula_not_the_papers_typo():
  # TP / (TP + FN), not TP / (TP + TN): with TN != FN the two differ.
  r = metrics.binary_report([2, 2, 0, 0, 0], [2, 0, 0, 0, 0])
  assert (r['tp'], r['fn'], r['tn']) == (1, 1, 3)
  assert r['sensitivity'] == pytest.approx(0.5)


def test_one_vs_rest_hand_computed_and_macro():
  r = metrics.one_vs_rest_report(LABELS, PREDS)
  g = r['per_grade']
  # Grade 0: TP 2 (idx 0, 1), FN 2 (2, 3), FP 1 (5), TN 5.
  assert (g[0]['tp'], g[0]['fn'], g[0]['fp'], g[0]['tn']) == (2, 2, 1, 5)
  assert g[0]['sensitivity'] == pytest.approx(0.5)
  assert g[0]['specificity'] == pytest.approx(5 / 6)
  # Grade 3: its only example is predicted 4 -> sensitivity 0; nothing predicted 3.
  assert g[3]['sensitivity'] == 0.0 and g[3]['specificity'] == 1.0
  assert math.isnan(g[3]['precision'])  # 0 / 0
  sens = [2 / 4, 1 / 2, 1 / 2, 0 / 1, 1 / 1]
  assert [x['sensitivity'] for x in g] == pytest.approx(sens)
  assert r['macro']['sensitivity'] == pytest.approx(np.mean(sens))
  assert [x['support'] for x in g] == [4, 2, 2, 1, 1]


def test_empty_class_gives_nan_not_crash():
  labels = [0, 0, 1, 1]  # grades 2..4 absent
  preds = [0, 1, 1, 1]
  r = metrics.one_vs_rest_report(labels, preds)
  assert math.isnan(r['per_grade'][2]['sensitivity'])  # no positives: 0/0
  assert r['per_grade'][2]['specificity'] == 1.0
  # Macro skips the undefined grades: mean of grade 0 (0.5) and grade 1 (1.0).
  assert r['macro']['sensitivity'] == pytest.approx(0.75)
  b = metrics.binary_report(labels, preds)  # no referable eye at all
  assert math.isnan(b['sensitivity']) and b['specificity'] == 1.0


def test_accuracy_and_kappa_hand_computed():
  assert metrics.accuracy(LABELS, PREDS) == pytest.approx(5 / 10)
  # Perfect agreement -> 1; a reversed 3-grade scale -> -1 (quadratic weights).
  assert metrics.quadratic_weighted_kappa([0, 1, 2], [0, 1, 2], 3) == pytest.approx(1.0)
  assert metrics.quadratic_weighted_kappa([0, 2], [2, 0], 3) == pytest.approx(-1.0)
  # By hand on 2 classes: O = [[1, 1], [0, 2]], W = [[0, 1], [1, 0]], marginals rows (2, 2),
  # cols (1, 3), E = outer / 4 = [[.5, 1.5], [.5, 1.5]]; kappa = 1 - 1 / 2 = 0.5.
  assert metrics.quadratic_weighted_kappa([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx(0.5)


def test_kappa_majority_predictor_is_zero():
  labels = [0, 0, 0, 1, 2, 3, 4, 0]
  assert metrics.quadratic_weighted_kappa(labels, [0] * len(labels)) == pytest.approx(0.0)


def test_kappa_undefined_is_nan_with_warning():
  with pytest.warns(UserWarning, match='undefined'):
    assert math.isnan(metrics.quadratic_weighted_kappa([1, 1], [1, 1]))
  with pytest.warns(UserWarning, match='no examples'):
    assert math.isnan(metrics.quadratic_weighted_kappa([], []))


def test_roc_auc_hand_computed_with_ties():
  # Positives score (0.8, 0.4), negatives (0.4, 0.1). Pairs: (0.8 > 0.4), (0.8 > 0.1),
  # (0.4 == 0.4 -> 1/2), (0.4 > 0.1): AUC = 3.5 / 4.
  auc = metrics.roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1])
  assert auc == pytest.approx(3.5 / 4)
  assert metrics.roc_auc([0, 0, 1, 1], [0.5] * 4) == pytest.approx(0.5)  # all tied
  assert metrics.roc_auc([True, False], [0.0, 1.0]) == pytest.approx(0.0)


def test_roc_auc_single_class_is_nan_with_warning():
  with pytest.warns(UserWarning, match='undefined'):
    assert math.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_roc_auc_rejects_bad_input():
  with pytest.raises(ValueError, match='0/1'):
    metrics.roc_auc([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match='finite'):
    metrics.roc_auc([0, 1], [0.1, np.nan])


def test_confusion_matrix_rejects_out_of_range():
  with pytest.raises(ValueError, match=r'\[0, 5\)'):
    metrics.confusion_matrix([0, 5], [0, 1])
  with pytest.raises(ValueError, match='differ'):
    metrics.confusion_matrix([0, 1], [0])


# ---------------------------------------------------------------- scikit-learn as reference


def _random_case(seed, n=200, k=5):
  rng = np.random.default_rng(seed)
  labels = rng.choice(k, size=n, p=[0.5, 0.15, 0.2, 0.08, 0.07])
  logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
  # Round so that scores tie often: the tie handling is what is under test.
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  probs = np.round(probs, 2)
  probs /= probs.sum(-1, keepdims=True)
  return labels, probs


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_against_sklearn(seed):
  labels, probs = _random_case(seed)
  preds = probs.argmax(-1)
  np.testing.assert_array_equal(
      metrics.confusion_matrix(labels, preds),
      skm.confusion_matrix(labels, preds, labels=range(5)))
  assert metrics.quadratic_weighted_kappa(labels, preds) == pytest.approx(
      skm.cohen_kappa_score(labels, preds, weights='quadratic', labels=range(5)))
  assert metrics.accuracy(labels, preds) == pytest.approx(skm.accuracy_score(labels, preds))
  ovr = metrics.one_vs_rest_report(labels, preds)
  recalls = skm.recall_score(labels, preds, labels=range(5), average=None)
  assert [g['sensitivity'] for g in ovr['per_grade']] == pytest.approx(recalls)
  assert ovr['macro']['sensitivity'] == pytest.approx(
      skm.recall_score(labels, preds, labels=range(5), average='macro'))
  for t in (1, 2, 3):
    y, scores = labels >= t, metrics.binary_scores(probs, t)
    assert metrics.roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores))
    b = metrics.binary_report(labels, probs, threshold_grade=t)
    assert b['sensitivity'] == pytest.approx(skm.recall_score(y, preds >= t))
    assert b['specificity'] == pytest.approx(skm.recall_score(~y, preds < t))
    assert b['accuracy'] == pytest.approx(skm.accuracy_score(y, preds >= t))
    assert b['auc'] == pytest.approx(skm.roc_auc_score(y, scores))


def test_roc_auc_heavy_ties_against_sklearn():
  rng = np.random.default_rng(3)
  y = rng.integers(0, 2, size=500)
  scores = rng.integers(0, 4, size=500) / 4 + 0.2 * y * rng.integers(0, 2, size=500)
  assert metrics.roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores))


# ---------------------------------------------------------------- classification_report


def test_classification_report_contents_and_json_roundtrip():
  probs = _one_hot_probs(PREDS)
  r = metrics.classification_report(LABELS, probs)
  assert r['num_examples'] == 10 and r['num_classes'] == 5
  assert r['accuracy'] == pytest.approx(0.5)
  assert r['confusion_matrix'] == metrics.confusion_matrix(LABELS, PREDS).tolist()
  assert r['class_counts'] == [4, 2, 2, 1, 1]
  assert r['thresholds'] == [2, 1]
  assert r['referable']['sensitivity'] == pytest.approx(3 / 4)
  assert r['any_dr']['specificity'] == pytest.approx(2 / 4)
  assert r['referable']['threshold_grade'] == 2
  assert r['kappa'] == pytest.approx(
      skm.cohen_kappa_score(LABELS, PREDS, weights='quadratic', labels=range(5)))
  assert r['referable']['auc'] == pytest.approx(
      skm.roc_auc_score(np.asarray(LABELS) >= 2, probs[:, 2:].sum(-1)))
  back = json.loads(json.dumps(r))
  assert back['referable'] == r['referable']
  assert 'sensitivity' in metrics.format_report(r)


def test_classification_report_mask_drops_padding():
  probs = _one_hot_probs(PREDS + [0, 0])
  r = metrics.classification_report(LABELS + [4, 4], probs, mask=[True] * 10 + [False] * 2)
  expected = metrics.classification_report(LABELS, _one_hot_probs(PREDS))
  assert json.dumps(r) == json.dumps(expected)  # via JSON so that NaN == NaN


def test_classification_report_single_class_eval_set():
  # A tiny smoke eval set holding one grade: NaN (with an AUC warning), never a crash.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    r = metrics.classification_report([0, 0, 0], _one_hot_probs([0, 1, 0]))
  assert math.isnan(r['referable']['auc']) and math.isnan(r['referable']['sensitivity'])
  assert any('roc_auc' in str(w.message) for w in caught)
  assert r['referable']['specificity'] == pytest.approx(1.0)
  json.dumps(r)  # NaN is still serialisable


def test_classification_report_rejects_logits():
  with pytest.raises(ValueError, match='softmax'):
    metrics.classification_report([0, 1], np.array([[2.0, -1.0], [0.5, 3.0]]))
