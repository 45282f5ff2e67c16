"""Tests for drjax.plots: TensorBoard smoothing values and the PNGs."""

import math

import numpy as np
import pytest
from PIL import Image

from drjax import plots


def test_smoothing_matches_hand_computation():
  # weight 0.6: last_1 = 0.4 * 1 = 0.4, debias 1 - 0.6 = 0.4 -> 1.
  # last_2 = 0.6 * 0.4 + 0.4 * 3 = 1.44, debias 1 - 0.36 = 0.64 -> 2.25.
  # last_3 = 0.6 * 1.44 + 0.4 * 2 = 1.664, debias 1 - 0.216 = 0.784 -> 2.12244898...
  out = plots.tensorboard_smooth([1.0, 3.0, 2.0], 0.6)
  np.testing.assert_allclose(out, [1.0, 2.25, 1.664 / 0.784])


def test_smoothing_weight_zero_is_identity_and_first_value_unbiased():
  x = np.array([5.0, 1.0, 4.0, 2.0])
  np.testing.assert_allclose(plots.tensorboard_smooth(x, 0.0), x)
  assert plots.tensorboard_smooth(x, 0.99)[0] == pytest.approx(5.0)  # debiased, not 0.05


def test_smoothing_constant_and_non_finite_like_tensorboard():
  np.testing.assert_array_equal(plots.tensorboard_smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])
  # A NaN passes through and does not advance the debias count.
  out = plots.tensorboard_smooth([1.0, math.nan, 3.0], 0.6)
  assert math.isnan(out[1])
  np.testing.assert_allclose(out[[0, 2]], [1.0, 2.25])
  assert plots.tensorboard_smooth([], 0.6).shape == (0,)
  with pytest.raises(ValueError):
    plots.tensorboard_smooth([1.0], 1.0)


def test_loss_curve_writes_png(tmp_path):
  steps = np.arange(0, 200, 5)
  losses = 1.5 * np.exp(-steps / 60) + 0.1 * np.random.default_rng(0).random(len(steps))
  path = plots.loss_curve(steps, losses, tmp_path / 'sub' / 'loss.png', title='DenseNet121')
  with Image.open(path) as im:
    assert im.format == 'PNG' and im.size == (600, 400)


def test_compare_loss_curves_one_panel_per_backbone(tmp_path):
  rng = np.random.default_rng(1)
  curves = {name: (np.arange(50), rng.random(50) + k)
            for k, name in enumerate(['DenseNet121', 'ResNet101', 'VGG16'])}
  path = plots.compare_loss_curves(curves, tmp_path / 'figures1-3.png')
  with Image.open(path) as im:
    assert im.format == 'PNG'
    assert im.size[0] == 3 * 450  # three panels side by side
  with pytest.raises(ValueError):
    plots.compare_loss_curves({'a': ([0, 1], [1.0])}, tmp_path / 'bad.png')
