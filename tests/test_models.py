"""Tests for drjax.models: registry, shapes and taps of the tiny variants, torchvision parity."""

import chex
import jax
import jax.numpy as jnp
import pytest

from drjax import models

TINY = ('densenet_tiny', 'resnet_tiny', 'vgg_tiny')


def test_registry_names_and_unknown():
  assert set(TINY) <= set(models.MODEL_NAMES)
  for name in ('densenet121', 'resnet101', 'vgg16', 'vgg16_bn'):
    assert name in models.MODEL_NAMES
  with pytest.raises(ValueError, match='densenet121'):
    models.get_model('densenet122')


@pytest.mark.parametrize('name', TINY)
def test_tiny_init_apply_taps(name):
  model = models.get_model(name, num_classes=5)
  x = jnp.zeros((2, 64, 80, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables) == {'params', 'batch_stats'}
  logits, state = model.apply(variables, x, train=False,
                              mutable=['intermediates', 'perturbations'])
  chex.assert_shape(logits, (2, 5))
  assert tuple(state['intermediates']) == model.stage_names
  assert set(state['perturbations']) == set(model.stage_names)
  assert model.default_cam_layer in model.stage_names
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.key(1)})
  chex.assert_shape(logits, (2, 5))
  assert set(updates) == {'batch_stats'}
