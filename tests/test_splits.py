"""Tests of the stratified, patient-grouped train/validation split."""

import numpy as np
import pytest

from drjax.data import splits
from drjax.data.builders import eyepacs


def _eyepacs_like(num_patients=3000, seed=0):
  """Two eyes per patient, grades correlated within a patient, EyePACS-like imbalance."""
  rng = np.random.default_rng(seed)
  prior = np.asarray([25810, 2443, 5292, 873, 708], float)
  patient_grade = rng.choice(5, size=num_patients, p=prior / prior.sum())
  jitter = rng.integers(-1, 2, size=(num_patients, 2)) * (rng.random((num_patients, 2)) < 0.2)
  labels = np.clip(patient_grade[:, None] + jitter, 0, 4).reshape(-1)
  names = [f'{p}_{side}' for p in range(num_patients) for side in ('left', 'right')]
  return labels, np.asarray([eyepacs.patient_id(n) for n in names])


def test_partition_and_per_grade_fraction():
  labels, groups = _eyepacs_like()
  train, val = splits.train_val_split(labels, groups, val_fraction=0.2, seed=0)
  assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
  assert abs(len(val) / len(labels) - 0.2) < 0.01
  for g in range(5):
    share = np.isin(np.flatnonzero(labels == g), val).mean()
    assert abs(share - 0.2) < 0.05, (g, share)


def test_patients_never_split():
  labels, groups = _eyepacs_like()
  train, val = splits.train_val_split(labels, groups, seed=3)
  assert set(groups[train]).isdisjoint(groups[val])


def test_seeded_and_reproducible():
  labels, groups = _eyepacs_like(500)
  a = splits.train_val_split(labels, groups, seed=1)
  b = splits.train_val_split(labels, groups, seed=1)
  c = splits.train_val_split(labels, groups, seed=2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  assert not np.array_equal(a[1], c[1])


def test_ungrouped_and_edge_fractions():
  labels = np.repeat(np.arange(5), 10)
  train, val = splits.train_val_split(labels, None, val_fraction=0.2)
  assert np.bincount(labels[val], minlength=5).tolist() == [2] * 5
  train, val = splits.train_val_split(labels, None, val_fraction=0.0)
  assert len(val) == 0 and len(train) == 50
  with pytest.raises(ValueError):
    splits.train_val_split(labels, None, val_fraction=1.0)
