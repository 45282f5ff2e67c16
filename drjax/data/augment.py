"""On-device image augmentation for fundus photographs.

The paper augments with "random rotation, horizontal flip, vertical flip,
translation, random grayscale, and random color change". Here they run inside
the jitted train step, vmapped over the batch, with dm-pix doing the warps and
the colour operations, and deterministic given the step's rng. Lesion masks, when
carried, go through the same geometry (nearest neighbour), so that they stay
aligned with the image.

Colour jitter follows torchvision's `ColorJitter` conventions: brightness,
contrast and saturation factors are drawn from [1 - x, 1 + x] and the hue shift
from [-hue, hue] (in turns, at most 0.5); brightness is multiplicative, so the
black surround of the field of view stays black.
"""

from __future__ import annotations

from collections.abc import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections as mlc

from drjax import errors

AugmentFn = Callable[..., tuple[jax.Array, jax.Array | None]]

_FIELDS = ('rotation_deg', 'translate_frac', 'hflip', 'vflip', 'grayscale_prob', 'brightness',
           'contrast', 'saturation', 'hue')


def default_config() -> mlc.ConfigDict:
  """The paper's augmentations; set a field to 0 / False to disable it."""
  config = mlc.ConfigDict()
  # Fundus photographs have no canonical orientation beyond the eye's side, so
  # any rotation is plausible.
  config.rotation_deg = 180.0  # Angle drawn from [-rotation_deg, rotation_deg].
  config.translate_frac = 0.05  # Shift drawn from [-f, f] * (H, W), per axis.
  config.hflip = True
  config.vflip = True
  config.grayscale_prob = 0.1  # torchvision's RandomGrayscale default.
  config.brightness = 0.2
  config.contrast = 0.2
  config.saturation = 0.2
  config.hue = 0.02
  return config


def _affine_matrix(angle: jax.Array, shift: jax.Array, height: int, width: int) -> jax.Array:
  """Pull matrix [4, 4] for `pix.affine_transform` on an [H, W, C] image.

  The image is rotated by `angle` (radians) about its centre, then shifted by
  `shift` = (dy, dx) pixels; output pixel o reads input pixel R^-1 (o - c - t) + c.
  """
  c = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  inv = jnp.array([[cos, sin], [-sin, cos]])  # R(angle)^-1 in (y, x) coordinates.
  offset = c - inv @ (c + shift)
  m = jnp.eye(4, dtype=jnp.float32)
  m = m.at[:2, :2].set(inv)
  return m.at[:2, 3].set(offset)


def _fields(config: mlc.ConfigDict) -> dict:
  """The augmentation fields of `config` (missing ones off); raises on unknown or bad ones."""
  unknown = set(config.keys()) - set(_FIELDS)
  if unknown:
    raise errors.ConfigError(f'unknown augmentation fields {sorted(unknown)}; known: {_FIELDS}')
  cfg = {k: config.get(k, 0) for k in _FIELDS}
  if not 0 <= cfg['hue'] <= 0.5:
    raise errors.ConfigError(f"hue must be in [0, 0.5], got {cfg['hue']}")
  for k in ('brightness', 'contrast', 'saturation'):
    if not 0 <= cfg[k] <= 1:
      raise errors.ConfigError(f'{k} must be in [0, 1], got {cfg[k]}')
  return cfg


def _jitter_colour(x: jax.Array, keys: jax.Array, cfg: dict) -> jax.Array:
  """torchvision-style colour jitter and random grayscale of one image [H, W, 3] in [0, 1],
  with keys[4:9]."""

  def uniform(key, amount):
    return jax.random.uniform(key, (), minval=1.0 - amount, maxval=1.0 + amount)

  if cfg['brightness']:
    x = jnp.clip(x * uniform(keys[4], cfg['brightness']), 0.0, 1.0)
  if cfg['contrast']:
    x = jnp.clip(pix.adjust_contrast(x, uniform(keys[5], cfg['contrast'])), 0.0, 1.0)
  if cfg['saturation']:
    x = jnp.clip(pix.adjust_saturation(x, uniform(keys[6], cfg['saturation'])), 0.0, 1.0)
  if cfg['hue']:
    delta = jax.random.uniform(keys[7], (), minval=-cfg['hue'], maxval=cfg['hue'])
    x = jnp.clip(pix.adjust_hue(x, delta), 0.0, 1.0)
  if cfg['grayscale_prob']:
    gray = jnp.broadcast_to(pix.rgb_to_grayscale(x, keep_dims=True), x.shape)
    x = jnp.where(jax.random.bernoulli(keys[8], cfg['grayscale_prob']), gray, x)
  return x


def make_augment_fn(config: mlc.ConfigDict) -> AugmentFn:
  """Builds the jitted batch augmentation described by `config` (see `default_config`).

  Returns:
    augment_fn(rng, images, masks=None) -> (images, masks): images uint8 or float
    [B, H, W, 3] in [0, 255] become float32 [B, H, W, 3] in [0, 255]; masks
    [B, H, W, K] (any dtype, e.g. uint8 {0, 1}) get the same geometric transform
    (nearest neighbour, zero outside) and keep their dtype; None stays None.
    Deterministic given rng; each example gets its own draw.
  """
  cfg = _fields(config)
  warp = bool(cfg['rotation_deg']) or bool(cfg['translate_frac'])
  colour = any(cfg[k] for k in ('brightness', 'contrast', 'saturation', 'hue', 'grayscale_prob'))

  def augment_one(rng, image, mask):
    keys = jax.random.split(rng, 9)
    height, width = image.shape[:2]
    x = image.astype(jnp.float32)

    def geometry(img, order):
      if cfg['hflip']:
        img = jnp.where(jax.random.bernoulli(keys[0]), pix.flip_left_right(img), img)
      if cfg['vflip']:
        img = jnp.where(jax.random.bernoulli(keys[1]), pix.flip_up_down(img), img)
      if warp:
        max_angle = jnp.deg2rad(cfg['rotation_deg'])
        angle = jax.random.uniform(keys[2], (), minval=-max_angle, maxval=max_angle)
        shift = jax.random.uniform(keys[3], (2,), minval=-1.0, maxval=1.0)
        shift = shift * cfg['translate_frac'] * jnp.array([height, width], jnp.float32)
        matrix = _affine_matrix(angle, shift, height, width)
        img = pix.affine_transform(img, matrix, order=order, mode='constant', cval=0.0)
      return img

    x = geometry(x, order=1)
    if mask is not None:
      mask = geometry(mask.astype(jnp.float32), order=0).astype(mask.dtype)
    if not colour:
      return x, mask
    # dm-pix colour ops expect [0, 1].
    return _jitter_colour(x / 255.0, keys, cfg) * 255.0, mask

  @jax.jit
  def augment_fn(rng: jax.Array, images: jax.Array, masks: jax.Array | None = None):
    rngs = jax.random.split(rng, images.shape[0])
    if masks is None:
      out, _ = jax.vmap(lambda r, i: augment_one(r, i, None))(rngs, images)
      return out, None
    return jax.vmap(augment_one)(rngs, images, masks)

  return augment_fn
