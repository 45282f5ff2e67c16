"""End to end: a smoke run exported by scripts/export_weights.py, then fine-tuned from it
through `--config.weights.path` (the pretrain224 -> transfer224 chain at tiny scale)."""

import json

import chex
import jax
import numpy as np
import pytest
from script_runner import REPO, run_ok

from drjax import evaluate, weights

ARCH = 'densenet_tiny'


def _train(workdir, tmp, *overrides):
  return run_ok('train.py', '--config', REPO / 'configs' / 'densenet.py:smoke',
                '--workdir', workdir, f'--config.input.data_dir={tmp / "tfds"}', *overrides,
                cwd=tmp)


def _export(workdir, output, tmp, *flags):
  return run_ok('export_weights.py', '--workdir', workdir, '--output', output, *flags, cwd=tmp)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A finished smoke run (every layer from a random init) and its exported trunk."""
  tmp = tmp_path_factory.mktemp('export')
  _train(tmp / 'pretrain', tmp)
  result = _export(tmp / 'pretrain', tmp / 'trunk', tmp)
  assert f'weights: {tmp / "trunk" / "variables.msgpack"}' in result.stdout
  return tmp


def _numpy(variables):
  return jax.tree.map(np.asarray, jax.device_get(
      {'params': variables['params'], 'batch_stats': variables['batch_stats']}))


def test_export_drops_the_head_unless_kept(pretrained):
  tmp = pretrained
  _, _, run = evaluate.load_run(tmp / 'pretrain')
  run = _numpy(run)
  trunk = weights.load(ARCH, tmp / 'trunk')
  assert 'classifier' not in trunk['params']
  chex.assert_trees_all_equal(trunk['params'], weights.without_head(ARCH, run)['params'])
  chex.assert_trees_all_equal(trunk['batch_stats'], run['batch_stats'])
  _export(tmp / 'pretrain', tmp / 'whole', tmp, '--keep_head')
  chex.assert_trees_all_equal(weights.load(ARCH, tmp / 'whole'), run)


def test_fine_tune_starts_from_the_exported_trunk(pretrained):
  tmp = pretrained
  _train(tmp / 'finetune', tmp, '--config.weights.pretrained=True',
         f'--config.weights.path={tmp / "trunk"}', '--config.num_steps=2',
         '--config.eval_every=2', '--config.checkpoint_every=2', '--config.seed=3')
  assert (tmp / 'finetune' / 'weights_source.txt').read_text().strip() == (
      f'explicit:{tmp / "trunk"}')
  report = json.loads((tmp / 'finetune' / 'metrics.json').read_text())
  # The smoke config's freezing applies to given weights (not every layer, as from scratch).
  assert report['pretrained'] is True
  assert report['trainable'] == ['classifier/.*', 'features/norm5/.*', 'features/denseblock4/.*']
  # The frozen layers are the exported ones, bit for bit, after two steps.
  _, _, tuned = evaluate.load_run(tmp / 'finetune')
  tuned, trunk = _numpy(tuned), weights.load(ARCH, tmp / 'trunk')
  for name in ('conv0', 'norm0', 'denseblock1', 'transition3'):
    chex.assert_trees_all_equal(tuned['params']['features'][name],
                                trunk['params']['features'][name])
  # Their BatchNorms ran on the exported running statistics and left them as they were.
  for name in ('norm0', 'denseblock1'):
    chex.assert_trees_all_equal(tuned['batch_stats']['features'][name],
                                trunk['batch_stats']['features'][name])
