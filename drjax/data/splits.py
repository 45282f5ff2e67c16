"""Train/validation splits: stratified by grade, grouped by patient, seeded.

The paper uses 80% of the data for training and 20% for evaluation. Both eyes of an EyePACS
patient ('10_left', '10_right') are strongly correlated, so a patient is never split across
train and validation: whole patients are assigned, stratified by the patient's worst grade so
that every grade keeps ~`val_fraction` of its images in validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from drjax import errors


def train_val_split(labels: Sequence[int] | np.ndarray,
                    groups: Sequence[str] | np.ndarray | None = None,
                    val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Splits example indices into train and validation.

  Args:
    labels: grade of each example [N] (any ints; -1 = ungraded is its own stratum).
    groups: patient id of each example [N]; examples of one patient always land on the
      same side. None: every example is its own patient.
    val_fraction: share of each grade's examples that goes to validation (0 <= f < 1).
    seed: the split is a pure function of (labels, groups, val_fraction, seed).

  Returns:
    (train_indices, val_indices): sorted int64 arrays that partition range(N).
  """
  labels = np.asarray(labels, np.int64)
  n = len(labels)
  if not 0.0 <= val_fraction < 1.0:
    raise errors.ConfigError(f'val_fraction must be in [0, 1), got {val_fraction}')
  if groups is None:
    groups = np.arange(n)
  groups = np.asarray(groups)
  if groups.shape != (n,):
    raise ValueError(f'groups must have shape [{n}], got {groups.shape}')
  # Group -> member indices; a group's stratum is its worst (highest) grade.
  uniq, group_of = np.unique(groups, return_inverse=True)
  stratum = np.full(len(uniq), np.iinfo(np.int64).min)
  np.maximum.at(stratum, group_of, labels)
  sizes = np.bincount(group_of, minlength=len(uniq))

  rng = np.random.default_rng(np.random.SeedSequence([seed, 20]))
  in_val = np.zeros(len(uniq), bool)
  for s in np.unique(stratum):
    members = np.flatnonzero(stratum == s)
    members = members[rng.permutation(len(members))]
    target = val_fraction * sizes[members].sum()
    taken = 0
    for g in members:
      # Take a group while that brings the count closer to the target.
      if abs(taken + sizes[g] - target) < abs(taken - target):
        in_val[g] = True
        taken += sizes[g]
  val_mask = in_val[group_of]
  return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
