"""Tests for the on-device augmentation: geometry moves masks with images, colour ranges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drjax.data import augment


def _config(**fields):
  """default_config with everything off except `fields`."""
  config = augment.default_config()
  for k in config:
    config[k] = False if isinstance(config[k], bool) else 0.0
  config.update(fields)
  return config


def _blobs(rng, batch, size, channels):
  """Random binary masks [B, S, S, K] made of a few discs of radius 3-5 px."""
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((batch, size, size, channels), np.uint8)
  for b in range(batch):
    for k in range(channels):
      for _ in range(2):
        cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(3, 5)
        masks[b, ..., k] |= ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
  return masks


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
  return images, _blobs(rng, 6, 24, 5)


def test_default_config_has_the_papers_augmentations():
  config = augment.default_config()
  assert config.rotation_deg > 0 and config.translate_frac > 0
  assert config.hflip and config.vflip and config.grayscale_prob > 0
  assert min(config.brightness, config.contrast, config.saturation, config.hue) > 0
  with pytest.raises(ValueError):
    augment.make_augment_fn(_config(zoom=0.1))


def test_default_augment_shapes_determinism_and_per_example_draws(batch):
  images, _ = batch
  fn = augment.make_augment_fn(augment.default_config())
  same = np.repeat(images[:1], len(images), 0)
  out, none = fn(jax.random.key(0), same)
  assert none is None
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert 0.0 <= float(out.min()) and float(out.max()) <= 255.0
  np.testing.assert_array_equal(out, fn(jax.random.key(0), same)[0])
  # One image repeated: every example gets its own draw.
  assert len({np.asarray(o).tobytes() for o in out}) == len(out)
  assert not np.array_equal(out, fn(jax.random.key(1), same)[0])


def test_flip_twice_is_identity(batch):
  images, masks = batch
  fn = augment.make_augment_fn(_config(hflip=True, vflip=True))
  once, once_masks = fn(jax.random.key(3), images, masks)
  twice, twice_masks = fn(jax.random.key(3), once.astype(jnp.uint8), once_masks)
  np.testing.assert_array_equal(twice, images.astype(np.float32))
  np.testing.assert_array_equal(twice_masks, masks)
  # The flips happened, and each example's mask got the same flip as its image.
  flips = (lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a[::-1, ::-1])
  used = []
  for o, om, i, m in zip(np.asarray(once), np.asarray(once_masks), images, masks, strict=True):
    k = [np.array_equal(o, f(i)) for f in flips].index(True)
    np.testing.assert_array_equal(om, flips[k](m))
    used.append(k)
  assert len(set(used)) > 1


def test_masks_stay_aligned_with_the_image_under_random_geometry():
  """A mask painted into the image is found where the warped mask says it is."""
  rng = np.random.default_rng(1)
  masks = _blobs(rng, 8, 32, 1)
  images = np.zeros((8, 32, 32, 3), np.uint8)
  images[..., 0] = masks[..., 0] * 255
  images[..., 1] = 60
  fn = augment.make_augment_fn(_config(rotation_deg=180.0, translate_frac=0.1, hflip=True,
                                       vflip=True))
  out, out_masks = fn(jax.random.key(5), images, masks)
  assert out_masks.shape == masks.shape and out_masks.dtype == masks.dtype
  assert set(np.unique(np.asarray(out_masks))) <= {0, 1}
  np.testing.assert_array_equal(out_masks, fn(jax.random.key(5), images, masks)[1])
  painted = np.asarray(out[..., 0]) > 127
  warped = np.asarray(out_masks[..., 0]).astype(bool)
  for p, w, m in zip(painted, warped, masks[..., 0], strict=True):
    iou = (p & w).sum() / max((p | w).sum(), 1)
    assert iou > 0.75, iou
    assert w.sum() >= 0.6 * m.sum()  # Not lost (blobs stay inside under a 10% shift).
  # The geometry did something.
  assert not np.array_equal(warped, masks[..., 0].astype(bool))


def test_brightness_contrast_and_grayscale_stay_in_range():
  rng = np.random.default_rng(2)
  # Mid-range images, so that no factor in range clips.
  images = rng.integers(80, 176, (32, 16, 16, 3)).astype(np.uint8)
  b, c, p = 0.3, 0.25, 0.5
  fn = augment.make_augment_fn(_config(brightness=b, contrast=c, grayscale_prob=p))
  out, _ = fn(jax.random.key(0), images)
  out = np.asarray(out, np.float64)
  gray = np.all(np.abs(out - out[..., :1]) < 1e-3, axis=(1, 2, 3))
  assert 0.2 < gray.mean() < 0.8
  x = images[~gray].astype(np.float64)
  y = out[~gray]
  # Brightness scales the mean, contrast then scales the deviations around it
  # (per channel, dm-pix's adjust_contrast).
  mean_ratio = y.mean((1, 2)) / x.mean((1, 2))
  std_ratio = y.std((1, 2)) / x.std((1, 2)) / mean_ratio
  assert np.all(mean_ratio > 1 - b - 1e-4) and np.all(mean_ratio < 1 + b + 1e-4)
  assert np.all(std_ratio > 1 - c - 1e-3) and np.all(std_ratio < 1 + c + 1e-3)
  # The draws spread over the configured range.
  assert np.ptp(mean_ratio[:, 0]) > b and np.ptp(std_ratio[:, 0]) > c / 2


def test_saturation_and_hue_stay_in_range():
  rng = np.random.default_rng(3)
  images = rng.integers(40, 216, (32, 12, 12, 3)).astype(np.uint8)
  s, h = 0.4, 0.1
  fn = augment.make_augment_fn(_config(saturation=s, hue=h))
  out, _ = fn(jax.random.key(1), images)

  def hsv(x):
    x = np.asarray(x, np.float64) / 255.0
    v = x.max(-1)
    sat = (v - x.min(-1)) / np.maximum(v, 1e-9)
    return sat, v

  s_in, v_in = hsv(images)
  s_out, v_out = hsv(out)
  # Saturation and hue act in HSV and leave the value alone.
  np.testing.assert_allclose(v_out, v_in, atol=1e-3)
  ok = s_in > 0.2
  ratio = np.where(ok, s_out / np.maximum(s_in, 1e-9), np.nan)
  # Per-image factor: where no pixel saturated at S=1, one ratio in [1 - s, 1 + s].
  per_image = np.nanmedian(ratio.reshape(len(images), -1), 1)
  assert np.all(per_image > 1 - s - 1e-3) and np.all(per_image < 1 + s + 1e-3)
  assert np.ptp(per_image) > s / 2
  # Hue moved (images are not just rescaled in saturation).
  assert not np.allclose(np.argmax(np.asarray(out), -1), np.argmax(images, -1))
