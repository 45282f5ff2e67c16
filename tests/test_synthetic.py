"""Tests for the synthetic fundus generator: determinism, grades, honest lesion masks."""

import numpy as np
import pytest

from drjax.data import synthetic

MA, HE, EX, SE, NV = (synthetic.LESION_TYPES.index(t) for t in ('MA', 'HE', 'EX', 'SE', 'NV'))


def _quadrant_counts(mask):
  """Pixels of `mask` [S, S] in each quadrant around the image centre."""
  s = mask.shape[0] // 2
  return [mask[:s, :s].sum(), mask[:s, s:].sum(), mask[s:, :s].sum(), mask[s:, s:].sum()]


def test_constants():
  assert synthetic.LESION_TYPES == ('MA', 'HE', 'EX', 'SE', 'NV')
  assert synthetic.EYEPACS_COUNTS == (25810, 2443, 5292, 873, 708)
  np.testing.assert_allclose(sum(synthetic.EYEPACS_PRIOR), 1.0)
  np.testing.assert_allclose(synthetic.EYEPACS_PRIOR[0], 25810 / 35126)


@pytest.mark.parametrize('size', [64, 97])
def test_shapes_dtypes_and_determinism(size):
  ex = synthetic.generate_example(7, 3, image_size=size)
  assert set(ex) == {'image', 'masks', 'grade', 'eye'}
  assert ex['image'].shape == (size, size, 3) and ex['image'].dtype == np.uint8
  assert ex['masks'].shape == (size, size, 5) and ex['masks'].dtype == np.uint8
  assert set(np.unique(ex['masks'])) <= {0, 1}
  assert ex['grade'] == 3 and ex['eye'] in ('left', 'right')
  again = synthetic.generate_example(7, 3, image_size=size)
  np.testing.assert_array_equal(ex['image'], again['image'])
  np.testing.assert_array_equal(ex['masks'], again['masks'])
  other = synthetic.generate_example(8, 3, image_size=size)
  assert not np.array_equal(ex['image'], other['image'])


def test_looks_like_a_fundus():
  """Black surround, orange-red field of view (red > green > blue), bright disc."""
  img = synthetic.generate_example(3, 0, image_size=128)['image'].astype(float)
  assert img[:3, :3].max() <= 12 and img[-3:, -3:].max() <= 12
  centre = img[40:88, 40:88].reshape(-1, 3).mean(0)
  assert centre[0] > centre[1] > centre[2]
  assert centre[0] > 60
  lum = img.mean(-1)
  assert lum.max() > lum[40:88, 40:88].mean() + 40  # The optic disc.


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_lesion_types_by_grade(seed):
  size = 192
  masks = [synthetic.generate_example(seed, g, image_size=size)['masks'] for g in range(5)]
  present = [m.reshape(-1, 5).any(0) for m in masks]
  assert not present[0].any()  # Grade 0: no lesions.
  np.testing.assert_array_equal(present[1], [True, False, False, False, False])  # MAs only.
  assert present[2][MA] and present[2][HE] and not present[2][NV]
  assert present[3][HE] and not present[3][NV]
  assert min(_quadrant_counts(masks[3][..., HE])) > 0  # Haemorrhages in all four quadrants.
  assert present[4][NV]
  # More disease, more lesion area.
  area = [m.any(-1).mean() for m in masks]
  assert area[1] < area[2] < area[3]


def test_microaneurysms_are_tiny():
  """Grade 1 at 512 px: MAs cover under 0.1% of the image (paper: < 0.08%)."""
  for seed in range(4):
    ma = synthetic.generate_example(seed, 1, image_size=512)['masks'][..., MA]
    assert 0 < ma.mean() < 1e-3


@pytest.mark.parametrize('grade,size', [(2, 160), (3, 128), (4, 200)])
def test_masks_are_exactly_where_lesions_changed_the_image(grade, size):
  """Masked pixels changed by >= MASK_THRESHOLD grey levels; unmasked ones by less."""
  seed = 11
  ex = synthetic.generate_example(seed, grade, image_size=size)
  clean = synthetic.render.render(seed, grade, size, ex['eye'], draw_lesions=False)
  assert not clean['masks'].any()
  change = np.abs(ex['image'].astype(int) - clean['image']).max(-1)
  union = ex['masks'].any(-1)
  np.testing.assert_array_equal(union, change >= synthetic.MASK_THRESHOLD)
  assert change[union].mean() > 15  # Lesions are clearly visible on average.


def test_same_eye_across_grades():
  """Grades 0-2 of one seed are the same photograph, apart from the lesions."""
  g0 = synthetic.generate_example(5, 0, image_size=96)
  g2 = synthetic.generate_example(5, 2, image_size=96)
  assert g0['eye'] == g2['eye']
  outside = ~g2['masks'].any(-1)
  diff = np.abs(g0['image'].astype(int) - g2['image']).max(-1)
  assert diff[outside].max() < synthetic.MASK_THRESHOLD


def test_eyes_are_mirrored():
  left = synthetic.generate_example(4, 4, image_size=80, eye='left')
  right = synthetic.generate_example(4, 4, image_size=80, eye='right')
  assert (left['eye'], right['eye']) == ('left', 'right')
  np.testing.assert_array_equal(left['image'], right['image'][:, ::-1])
  np.testing.assert_array_equal(left['masks'], right['masks'][:, ::-1])
  # Right eye: the optic disc (brightest region) is on the image's right.
  lum = right['image'].astype(float).mean(-1)
  assert np.argmax(lum.max(0)) > 40


def test_grade_prior_sampling():
  grades = synthetic.sample_grades(200_000, seed=3)
  freq = np.bincount(grades, minlength=5) / len(grades)
  np.testing.assert_allclose(freq, synthetic.EYEPACS_PRIOR, atol=3e-3)
  prior = (1, 0, 0, 2, 1)
  freq = np.bincount(synthetic.sample_grades(20_000, seed=0, grade_prior=prior), minlength=5)
  np.testing.assert_allclose(freq / 20_000, np.array(prior) / 4, atol=0.015)
  assert freq[1] == freq[2] == 0
  with pytest.raises(ValueError):
    synthetic.sample_grades(3, grade_prior=(1, 1, 1))


def test_generate():
  exs = list(synthetic.generate(12, image_size=32, seed=9, grade_prior=(1, 1, 1, 1, 1)))
  assert len(exs) == 12
  assert len({e['id'] for e in exs}) == 12
  np.testing.assert_array_equal([e['grade'] for e in exs], synthetic.sample_grades(12, 9, (1,) * 5))
  again = list(synthetic.generate(3, image_size=32, seed=9, grade_prior=(1, 1, 1, 1, 1)))
  for a, b in zip(exs[:3], again, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['id'] == b['id']
  assert {e['image'].shape for e in exs} == {(32, 32, 3)}


def test_bad_arguments():
  with pytest.raises(ValueError):
    synthetic.generate_example(0, 5, image_size=64)
  with pytest.raises(ValueError):
    synthetic.generate_example(0, 1, image_size=64, eye='middle')
