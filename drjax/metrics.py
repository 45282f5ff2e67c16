"""Classification metrics for DR grading: the paper's Table 1 figures, kappa and AUC.

numpy only (scikit-learn is a test-time reference, not a runtime dependency).

Definitions (Wang et al., section 2.3.2, formulas 2-2 to 2-4, with the typo in 2-2 fixed):

    sensitivity = TP / (TP + FN)       (the paper prints TP / (TP + TF))
    specificity = TN / (TN + FP)
    accuracy    = (TP + TN) / (TP + TN + FP + FN)

The paper does not say which binary problem its Table 1 counts. drjax reports two, both
from the 5-class prediction (the argmax grade), never from a re-tuned score threshold:

  * referable DR: positive = grade >= 2 (moderate NPDR or worse), the default and the
    usual screening end point;
  * any DR: positive = grade >= 1.

and, for each grade k, the one-vs-rest problem "grade == k" with the macro average over
grades. A ratio whose denominator is zero (e.g. sensitivity when no example is positive)
is NaN, by design: it is undefined, not 0 or 1. Macro averages skip NaN entries.
"""

import math
import warnings
from collections.abc import Sequence

import numpy as np

NUM_GRADES = 5
# Names of the binary problems in `classification_report`, by threshold grade.
_BINARY_NAMES = {2: 'referable', 1: 'any_dr'}


def binary_name(threshold_grade: int) -> str:
  """Key of the binary problem `grade >= threshold_grade` in a classification report."""
  return _BINARY_NAMES.get(threshold_grade, f'grade_ge{threshold_grade}')


def _ratio(num: float, den: float) -> float:
  """num / den, NaN when den == 0 (an undefined rate, e.g. sensitivity without positives)."""
  return float(num) / float(den) if den else math.nan


def _as_labels(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 1:
    raise ValueError(f'{name} must be 1-D [N], got shape {x.shape}')
  if x.size and not np.issubdtype(x.dtype, np.integer):
    if not np.all(np.equal(np.mod(x, 1), 0)):
      raise ValueError(f'{name} must hold integer grades, got {x.dtype} with fractions')
  return x.astype(np.int64)


def _as_preds(preds_or_probs) -> tuple[np.ndarray, np.ndarray | None]:
  """Grades [N] from grades [N] or class probabilities [N, K] (argmax); also returns probs."""
  x = np.asarray(preds_or_probs)
  if x.ndim == 2:
    return np.argmax(x, axis=-1).astype(np.int64), x.astype(np.float64)
  return _as_labels(x, 'preds'), None


def confusion_matrix(labels, preds, num_classes: int = NUM_GRADES) -> np.ndarray:
  """Counts of (true grade, predicted grade) pairs.

  Args:
    labels: int [N] true grades in [0, num_classes).
    preds: int [N] predicted grades in [0, num_classes).
    num_classes: K.

  Returns:
    np.int64 [K, K]; entry [i, j] counts examples of true grade i predicted as j
    (rows = truth, columns = prediction, as in scikit-learn).
  """
  labels = _as_labels(labels, 'labels')
  preds = _as_labels(preds, 'preds')
  if labels.shape != preds.shape:
    raise ValueError(f'labels {labels.shape} and preds {preds.shape} differ in length')
  for name, x in (('labels', labels), ('preds', preds)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f'{name} must lie in [0, {num_classes}), got range '
                       f'[{x.min()}, {x.max()}]')
  flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes).astype(np.int64)


def accuracy(labels, preds) -> float:
  """Fraction of exactly right grades (5-class accuracy); NaN for no examples."""
  labels = _as_labels(labels, 'labels')
  preds, _ = _as_preds(preds)
  return _ratio(np.sum(labels == preds), labels.size)


def _binary_rates(tp: int, tn: int, fp: int, fn: int) -> dict:
  return dict(
      sensitivity=_ratio(tp, tp + fn),
      specificity=_ratio(tn, tn + fp),
      accuracy=_ratio(tp + tn, tp + tn + fp + fn),
      precision=_ratio(tp, tp + fp),
      tp=int(tp), tn=int(tn), fp=int(fp), fn=int(fn))


def binary_report(labels, preds_or_probs, threshold_grade: int = 2) -> dict:
  """Sensitivity, specificity and accuracy of the binary problem `grade >= threshold_grade`.

  Positive = true grade >= threshold_grade (2: referable DR; 1: any DR). A prediction is
  positive when the predicted grade (the argmax if probabilities are given) is
  >= threshold_grade. Rates use the definitions in the module docstring; an undefined
  rate (zero denominator) is NaN.

  Args:
    labels: int [N] true grades.
    preds_or_probs: int [N] predicted grades, or float [N, K] class probabilities.
    threshold_grade: lowest grade counted as positive.

  Returns:
    dict(sensitivity, specificity, accuracy, precision, tp, tn, fp, fn), plus `auc` (the
    ROC AUC of the score "summed probability of grades >= threshold_grade") when
    probabilities are given.
  """
  labels = _as_labels(labels, 'labels')
  preds, probs = _as_preds(preds_or_probs)
  if labels.shape != preds.shape:
    raise ValueError(f'labels {labels.shape} and preds {preds.shape} differ in length')
  true_pos = labels >= threshold_grade
  pred_pos = preds >= threshold_grade
  report = _binary_rates(
      tp=np.sum(true_pos & pred_pos), tn=np.sum(~true_pos & ~pred_pos),
      fp=np.sum(~true_pos & pred_pos), fn=np.sum(true_pos & ~pred_pos))
  if probs is not None:
    report['auc'] = roc_auc(true_pos, binary_scores(probs, threshold_grade))
  return report


def one_vs_rest_report(labels, preds_or_probs, num_classes: int = NUM_GRADES) -> dict:
  """Per-grade one-vs-rest sensitivity/specificity/accuracy and their macro average.

  For grade k, positive = "grade == k". Sensitivity_k is the recall of grade k
  (scikit-learn's per-class `recall_score`); specificity_k is the recall of "not k".

  Returns:
    dict(per_grade=[{grade, support, sensitivity, specificity, accuracy, precision, tp,
    tn, fp, fn}, ...], macro=dict(sensitivity, specificity, accuracy, precision)). The macro
    average is the mean over grades whose value is defined (NaN entries, e.g. the
    sensitivity of a grade absent from `labels`, are skipped; NaN if none is defined).
  """
  labels = _as_labels(labels, 'labels')
  preds, _ = _as_preds(preds_or_probs)
  cm = confusion_matrix(labels, preds, num_classes)
  n = cm.sum()
  per_grade = []
  for k in range(num_classes):
    tp = cm[k, k]
    fn = cm[k].sum() - tp
    fp = cm[:, k].sum() - tp
    tn = n - tp - fn - fp
    per_grade.append(dict(grade=k, support=int(cm[k].sum()),
                          **_binary_rates(tp=tp, tn=tn, fp=fp, fn=fn)))
  macro = {key: _nanmean([g[key] for g in per_grade])
           for key in ('sensitivity', 'specificity', 'accuracy', 'precision')}
  return dict(per_grade=per_grade, macro=macro)


def _nanmean(values: Sequence[float]) -> float:
  finite = [v for v in values if not math.isnan(v)]
  return float(np.mean(finite)) if finite else math.nan


def quadratic_weighted_kappa(labels, preds, num_classes: int = NUM_GRADES) -> float:
  """Cohen's kappa with quadratic weights (the EyePACS/APTOS competition metric).

  kappa = 1 - sum(W * O) / sum(W * E), with O the confusion matrix, E the outer product of
  its marginals divided by N (agreement expected by chance), and W[i, j] = (i - j)^2 over
  the full grade range 0..K-1 (matches scikit-learn's `cohen_kappa_score(...,
  weights='quadratic', labels=range(K))`). 1 = perfect, 0 = chance (e.g. always predicting
  the majority grade), < 0 = worse than chance.

  Returns NaN, with a warning, when kappa is undefined: no examples, or sum(W * E) == 0
  (truth and prediction both constant and equal).
  """
  labels = _as_labels(labels, 'labels')
  preds, _ = _as_preds(preds)
  cm = confusion_matrix(labels, preds, num_classes).astype(np.float64)
  n = cm.sum()
  if n == 0:
    warnings.warn('quadratic_weighted_kappa: no examples; returning NaN', stacklevel=2)
    return math.nan
  grades = np.arange(num_classes)
  weights = (grades[:, None] - grades[None, :]) ** 2
  expected = np.outer(cm.sum(1), cm.sum(0)) / n
  den = np.sum(weights * expected)
  if den == 0:
    warnings.warn('quadratic_weighted_kappa: undefined (truth and predictions are one '
                  'and the same constant grade); returning NaN', stacklevel=2)
    return math.nan
  return float(1.0 - np.sum(weights * cm) / den)


def binary_scores(probs, threshold_grade: int = 2) -> np.ndarray:
  """P(grade >= threshold_grade) = summed probability of those grades: float [N, K] -> [N]."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2:
    raise ValueError(f'probs must be [N, K], got shape {probs.shape}')
  return probs[:, threshold_grade:].sum(axis=-1)


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x, tied values sharing the mean of their ranks (scipy's 'average')."""
  order = np.argsort(x, kind='mergesort')
  sorted_x = x[order]
  # Start index of each run of equal values in the sorted array.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], x.size]  # exclusive
  run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def roc_auc(binary_labels, scores) -> float:
  """Area under the ROC curve of `scores` for the positive class.

  Computed as the Mann-Whitney U statistic, AUC = P(score_pos > score_neg) +
  0.5 * P(score_pos == score_neg), with average ranks for ties, which equals the
  trapezoidal area under the ROC curve (scikit-learn's `roc_auc_score`) exactly.

  Args:
    binary_labels: bool or {0, 1} [N]; True = positive.
    scores: float [N]; higher = more likely positive.

  Returns:
    The AUC in [0, 1]; NaN, with a warning, when only one class is present (AUC is then
    undefined; scikit-learn raises instead).
  """
  y = np.asarray(binary_labels)
  s = np.asarray(scores, np.float64)
  if y.ndim != 1 or y.shape != s.shape:
    raise ValueError(f'binary_labels {y.shape} and scores {s.shape} must both be [N]')
  if not np.all(np.isin(y, (0, 1))):
    raise ValueError('binary_labels must be bool or 0/1')
  if not np.all(np.isfinite(s)):
    raise ValueError('scores must be finite')
  y = y.astype(bool)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    warnings.warn(f'roc_auc: undefined with {n_pos} positive and {n_neg} negative '
                  'examples; returning NaN', stacklevel=2)
    return math.nan
  ranks = _average_ranks(s)
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def classification_report(labels, probs, thresholds: Sequence[int] = (2, 1), *,
                          mask=None) -> dict:
  """Every metric drjax reports, as a JSON-able dict (the content of a run's metrics.json).

  Args:
    labels: int [N] true grades.
    probs: float [N, K] class probabilities (softmax output; rows sum to 1). The predicted
      grade is the argmax; binary scores are summed probabilities (see `binary_scores`).
    thresholds: binary problems `grade >= t` to report; the first is the headline one
      (Table 1). 2 -> key 'referable', 1 -> 'any_dr', others 'grade_ge{t}'.
    mask: optional bool [N]; False entries (padding of the last eval batch) are dropped.

  Returns:
    dict with
      num_examples, num_classes, class_counts [K] (true), pred_counts [K],
      accuracy (5-class), kappa (quadratic weighted), confusion_matrix ([K][K], rows = true),
      per_grade (list of one-vs-rest dicts, see `one_vs_rest_report`), macro (their average),
      thresholds (list), and for each t a key `binary_name(t)` holding
      dict(threshold_grade, sensitivity, specificity, accuracy, precision, auc, tp, tn, fp, fn).
    Undefined values are float NaN (Python's json writes and reads them as NaN).
  """
  labels = _as_labels(labels, 'labels')
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
    raise ValueError(f'probs must be [N, K] with N = {labels.shape[0]}, got {probs.shape}')
  if mask is not None:
    mask = np.asarray(mask, bool)
    labels, probs = labels[mask], probs[mask]
  num_classes = probs.shape[1]
  # Summing probabilities of grades only means something for a distribution: catch logits.
  if probs.size and (probs.min() < -1e-6 or not np.allclose(probs.sum(-1), 1.0, atol=1e-2)):
    raise ValueError('probs must be class probabilities (rows >= 0 summing to 1); '
                     'apply a softmax to logits first')
  preds = np.argmax(probs, axis=-1) if probs.size else np.zeros(0, np.int64)
  cm = confusion_matrix(labels, preds, num_classes)
  ovr = one_vs_rest_report(labels, preds, num_classes)
  with warnings.catch_warnings():
    # An eval set with a single grade is legal (tiny smoke runs); values are NaN anyway.
    warnings.simplefilter('ignore')
    kappa = quadratic_weighted_kappa(labels, preds, num_classes)
  report = dict(
      num_examples=int(labels.size),
      num_classes=int(num_classes),
      class_counts=cm.sum(1).tolist(),
      pred_counts=cm.sum(0).tolist(),
      accuracy=accuracy(labels, preds),
      kappa=kappa,
      confusion_matrix=cm.tolist(),
      per_grade=ovr['per_grade'],
      macro=ovr['macro'],
      thresholds=[int(t) for t in thresholds],
  )
  for t in thresholds:
    if not 0 < t < num_classes:
      raise ValueError(f'threshold grade {t} must lie in [1, {num_classes})')
    report[binary_name(t)] = dict(threshold_grade=int(t),
                                  **binary_report(labels, probs, threshold_grade=t))
  return report


def format_report(report: dict) -> str:
  """A short human-readable summary of `classification_report`'s output."""
  lines = [f"examples {report['num_examples']}  accuracy {report['accuracy']:.4f}  "
           f"kappa {report['kappa']:.4f}"]
  for t in report['thresholds']:
    b = report[binary_name(t)]
    lines.append(f"{binary_name(t)} (grade >= {t}): sensitivity {b['sensitivity']:.4f}  "
                 f"specificity {b['specificity']:.4f}  accuracy {b['accuracy']:.4f}  "
                 f"auc {b['auc']:.4f}")
  m = report['macro']
  lines.append(f"per-grade macro: sensitivity {m['sensitivity']:.4f}  "
               f"specificity {m['specificity']:.4f}")
  return '\n'.join(lines)
