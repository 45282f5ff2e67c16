"""Tests for drjax.freeze: label trees from path regexes, partition and merge."""

import numpy as np
import pytest

from drjax import freeze


def _params():
  z = np.zeros
  return {
      'features': {
          'conv0': {'kernel': z((3, 3, 3, 4))},
          'denseblock4': {'denselayer1': {'norm1': {'scale': z(4), 'bias': z(4)}},
                          'denselayer2': {'conv1': {'kernel': z((1, 1, 4, 4))}}},
          'norm5': {'scale': z(4), 'bias': z(4)},
      },
      'classifier': {'kernel': z((4, 5)), 'bias': z(5)},
  }


def test_first_matching_rule_wins():
  labels = freeze.make_labels(_params(), [('classifier/bias', 'a'), ('classifier/.*', 'b'),
                                          ('.*', 'c')])
  assert labels['classifier'] == {'kernel': 'b', 'bias': 'a'}
  assert labels['features']['norm5']['scale'] == 'c'


def test_unmatched_parameter_is_an_error_listing_it():
  with pytest.raises(ValueError, match='features/conv0/kernel'):
    freeze.make_labels(_params(), [('classifier/.*', 'x'), ('features/(norm5|denseblock4)/.*',
                                                            'y')])


def test_trainable_pattern_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match='denselayer16'):
    freeze.trainable_labels(_params(), ['classifier/.*', 'features/denseblock4/denselayer16/.*'])


def test_trainable_must_be_a_sequence_not_a_string():
  with pytest.raises(TypeError):
    freeze.trainable_labels(_params(), 'classifier/.*')


def test_patterns_match_whole_paths():
  # 'norm5' alone must not match 'features/norm5/scale' (fullmatch, not search).
  with pytest.raises(ValueError, match='match no parameter'):
    freeze.trainable_labels(_params(), ['norm5'])


def test_partition_and_merge_round_trip():
  params = _params()
  labels = freeze.trainable_labels(params, ['classifier/.*', 'features/denseblock4/denselayer1/.*'])
  trainable, frozen = freeze.partition(params, labels)
  assert set(freeze.param_paths(trainable)) == {
      'classifier/kernel', 'classifier/bias', 'features/denseblock4/denselayer1/norm1/scale',
      'features/denseblock4/denselayer1/norm1/bias'}
  assert 'features/conv0/kernel' in freeze.param_paths(frozen)
  merged = freeze.merge(trainable, frozen)
  assert sorted(freeze.param_paths(merged)) == sorted(freeze.param_paths(params))
  assert freeze.count(params, labels) == {'trainable': 4 * 5 + 5 + 4 + 4,
                                          'frozen': 3 * 3 * 3 * 4 + 16 + 8}


def test_merge_rejects_overlap():
  with pytest.raises(ValueError, match='more than one'):
    freeze.merge({'a': {'b': 1}}, {'a': {'b': 2}})


def test_frozen_module_paths_are_modules_with_no_trainable_param():
  labels = freeze.trainable_labels(_params(), ['classifier/.*', 'features/norm5/scale'])
  frozen = freeze.frozen_module_paths(labels)
  assert ('features', 'conv0') in frozen
  assert ('features', 'denseblock4', 'denselayer1', 'norm1') in frozen
  # A module with any trainable parameter is not frozen (its BatchNorm trains).
  assert ('features', 'norm5') not in frozen
  assert ('classifier',) not in frozen
