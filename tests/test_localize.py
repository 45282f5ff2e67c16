"""Localisation scores on constructed heatmaps and masks with known answers."""

import numpy as np
import pytest
from sklearn import metrics as skm

from drjax import localize


def _mask(shape, *points):
  m = np.zeros(shape, np.uint8)
  for r, c in points:
    m[r, c] = 1
  return m


def test_pointing_game_with_tolerance():
  mask = _mask((32, 32), (10, 10))
  heat = np.zeros((32, 32), np.float32)
  heat[10, 20] = 1.0   # 10 px from the lesion
  assert localize.pointing_game(heat, mask, tolerance=15) == 1.0
  assert localize.pointing_game(heat, mask, tolerance=5) == 0.0
  assert localize.pointing_game(heat, mask, tolerance=10) == 1.0   # inclusive
  heat[10, 10] = 2.0
  assert localize.pointing_game(heat, mask, tolerance=0) == 1.0
  # A flat map has no peak: a miss. An empty mask: nothing to find.
  assert localize.pointing_game(np.ones((32, 32)), mask) == 0.0
  assert np.isnan(localize.pointing_game(heat, np.zeros((32, 32))))


def test_relevance_mass_and_rank():
  mask = np.zeros((10, 10), np.uint8)
  mask[:5, :5] = 1   # a quarter of the image
  heat = np.zeros((10, 10))
  heat[:5, :5] = 3.0
  heat[5:, 5:] = 1.0
  assert localize.relevance_mass(heat, mask) == pytest.approx(0.75)
  assert localize.relevance_rank(heat, mask) == pytest.approx(1.0)
  # Uniform heatmap: mass = area fraction (the chance level); negatives are ignored.
  assert localize.relevance_mass(np.ones((10, 10)), mask) == pytest.approx(0.25)
  assert localize.relevance_mass(np.where(mask, -1.0, 1.0), mask) == 0.0
  assert localize.relevance_mass(np.zeros((10, 10)), mask) == 0.0
  # Half of the top-25 pixels in the mask.
  heat = np.zeros((10, 10))
  heat[:5, :3] = 2.0    # 15 mask pixels
  heat[5:7, 5:10] = 1.0  # 10 non-mask pixels
  assert localize.relevance_rank(heat, mask) == pytest.approx(15 / 25)


def test_auroc_and_ap_known_values():
  mask = np.zeros((8, 8), np.uint8)
  mask[2:4, 2:4] = 1
  assert localize.pixel_auroc(mask.astype(float), mask) == 1.0
  assert localize.pixel_auroc(1.0 - mask, mask) == 0.0
  assert localize.pixel_auroc(np.ones((8, 8)), mask) == 0.5
  assert localize.average_precision(mask.astype(float), mask) == 1.0
  assert localize.average_precision(np.ones((8, 8)), mask) == pytest.approx(4 / 64)
  assert np.isnan(localize.pixel_auroc(np.ones((8, 8)), np.zeros((8, 8))))


def test_auroc_and_ap_match_sklearn_with_ties():
  rng = np.random.default_rng(0)
  mask = rng.random((24, 24)) < 0.1
  heat = np.round(rng.random((24, 24)) + 0.5 * mask, 1)   # many ties
  assert localize.pixel_auroc(heat, mask) == pytest.approx(
      skm.roc_auc_score(mask.ravel(), heat.ravel()), abs=1e-9)
  assert localize.average_precision(heat, mask) == pytest.approx(
      skm.average_precision_score(mask.ravel(), heat.ravel()), abs=1e-9)


def test_heatmap_is_resized_to_the_mask():
  mask = np.zeros((64, 64), np.uint8)
  mask[:32, :32] = 1
  coarse = np.array([[1.0, 0.0], [0.0, 0.0]])   # a 2x2 "layer" map
  scores = localize.score(coarse, mask)
  assert scores['pointing'] == 1.0
  assert scores['auroc'] > 0.9
  assert scores['area'] == pytest.approx(0.25)


def test_score_lesions_and_aggregate():
  masks = np.zeros((16, 16, 5), np.uint8)
  masks[2, 2, 0] = 1          # MA
  masks[10:14, 10:14, 2] = 1  # EX
  heat = np.zeros((16, 16))
  heat[11, 11] = 1.0
  per = localize.score_lesions(heat, masks, tolerance=2)
  assert set(per) == {'MA', 'HE', 'EX', 'SE', 'NV', 'any'}
  assert per['EX']['pointing'] == 1.0 and per['MA']['pointing'] == 0.0
  assert np.isnan(per['HE']['pointing'])
  assert per['any']['pointing'] == 1.0
  agg = localize.aggregate([per, localize.score_lesions(np.ones((16, 16)), masks)])
  assert agg['EX']['n'] == 2 and agg['HE']['n'] == 0
  assert agg['EX']['pointing'] == pytest.approx(0.5)
  assert np.isnan(agg['HE']['auroc'])
  with pytest.raises(ValueError, match='masks must be'):
    localize.score_lesions(heat, masks[..., :4])


def test_deletion_insertion_known_curves():
  # The "model" scores the intact fraction of a region R (64 of 256 pixels); the
  # image is all ones and the baseline zeros. With 8 steps (32 pixels each):
  # a heatmap on R deletes R in 2 steps (AUC = 64 / 512 = 0.125) and inserts it in 2
  # (AUC = 0.875); the inverted heatmap gives the mirror image.
  region = np.zeros((16, 16), bool)
  region[4:12, 4:12] = True

  def score_fn(images):
    return images[:, region, 0].mean(axis=1)

  image = np.ones((16, 16, 1), np.float32)
  good = localize.deletion_insertion(score_fn, image, region.astype(float), steps=8)
  np.testing.assert_allclose(good['deletion'], [1, 0.5, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(good['insertion'], [0, 0.5, 1, 1, 1, 1, 1, 1, 1])
  assert good['deletion_auc'] == pytest.approx(0.125)
  assert good['insertion_auc'] == pytest.approx(0.875)
  bad = localize.deletion_insertion(score_fn, image, 1.0 - region, steps=8, batch_size=5)
  assert bad['deletion_auc'] == pytest.approx(0.875)
  assert bad['insertion_auc'] == pytest.approx(0.125)
  # A coarse heatmap is upsampled to the image first.
  coarse = localize.deletion_insertion(score_fn, image, np.array([[0, 0, 0, 0], [0, 1, 1, 0],
                                                                   [0, 1, 1, 0], [0, 0, 0, 0]]),
                                       steps=8)
  assert coarse['deletion_auc'] == pytest.approx(0.125)
