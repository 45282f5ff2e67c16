"""Tests for configs/*.py: the paper's recipe per backbone, smoke variants, locked fields."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from ml_collections.config_flags import config_flags

from drjax import freeze, models

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ('densenet', 'resnet', 'vgg')


def _load(name, arg=None):
  module = config_flags._LoadConfigModule(f'{name}_config', str(REPO / 'configs' / f'{name}.py'))
  return module.get_config(arg)


def _param_paths(model_name, size=64):
  model = models.get_model(model_name, num_classes=5)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))
  return shapes['params']


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('arg', [None, 'smoke', 'paper'])
def test_config_is_locked_and_has_the_paper_hyper_parameters(name, arg):
  config = _load(name, arg)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.optimzer = None  # a typo cannot add a field
  assert config.optimizer.name == 'adam'
  if arg == 'paper':  # the paper's constant Adam 1e-4 and all its augmentations
    assert (config.optimizer.lr, config.optimizer.schedule) == (1e-4, 'constant')
    assert config.augment.rotation_deg == 180 and config.augment.grayscale_prob > 0
  else:  # the CPU-sized runs: 1e-3 with warm-up and cosine decay, lossless flips only
    assert (config.optimizer.lr, config.optimizer.schedule) == (1e-3, 'cosine')
    assert config.optimizer.warmup_steps < config.num_steps
    assert config.augment.hflip and config.augment.rotation_deg == 0
  assert config.num_classes == 5
  assert config.input.val_fraction == 0.2
  assert config.input.class_weights == (0.1, 1.0, 0.5, 3.0, 4.0)
  # A random-init ResNet starts its residual branches at 0; the others have none.
  assert config.weights.zero_init_residual == (name == 'resnet')
  assert config.mixed_precision == 'float32'
  assert config.cpu_conv is True  # the CPU convolutions, where jax runs on a CPU
  assert config.frozen_bn_inference
  assert config.model in models.MODEL_NAMES
  assert isinstance(config.trainable, tuple)
  if arg == 'paper':  # the 512 px EyePACS set of scripts/prepare_data.py, read at 224 px
    assert (config.batch_size, config.input.image_size, config.input.stored_size,
            config.input.dataset) == (256, 224, 512, 'eyepacs')
  elif arg is None:
    assert config.input.dataset == 'synthetic_fundus'


def test_unknown_config_argument_is_an_error():
  with pytest.raises(ValueError, match='smoke'):
    _load('densenet', 'smoek')


@pytest.mark.parametrize('name, expected', [
    ('densenet', {'classifier', 'features/norm5', 'features/denseblock4/denselayer14',
                  'features/denseblock4/denselayer15', 'features/denseblock4/denselayer16'}),
    ('resnet', {'fc', 'layer4/0', 'layer4/1', 'layer4/2'}),
    ('vgg', {'features/24', 'features/26', 'features/28', 'classifier/0', 'classifier/3',
             'classifier/6'}),
])
def test_trainable_patterns_select_the_papers_layers(name, expected):
  config = _load(name)
  params = _param_paths(config.model)
  labels = freeze.trainable_labels(params, config.trainable)
  trainable = {path for path, label in zip(freeze.param_paths(params),
                                           jax.tree.leaves(labels), strict=True)
               if label == 'trainable'}
  depth = 3 if name == 'densenet' else 2
  modules = {'/'.join(p.split('/')[:depth]) if p.startswith(('features/denseblock', 'layer'))
             else '/'.join(p.split('/')[:-1]) for p in trainable}
  assert modules == expected


@pytest.mark.parametrize('name', CONFIGS)
def test_smoke_patterns_match_the_tiny_models(name):
  config = _load(name, 'smoke')
  assert config.model.endswith('_tiny')
  freeze.trainable_labels(_param_paths(config.model, 32), config.trainable)


def test_mistyped_config_field_is_an_error_naming_it(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), DRJAX_NO_DOWNLOAD='1')
  result = subprocess.run(
      [sys.executable, str(REPO / 'scripts' / 'train.py'), '--config',
       str(REPO / 'configs' / 'densenet.py:smoke'), '--config.optimzer.lr=0.1',
       '--workdir', str(tmp_path / 'run')],
      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
  assert result.returncode != 0
  assert 'optimzer' in result.stderr
  assert not (tmp_path / 'run').exists()
