"""SESS (Tursun et al., ECCV 2022): any CAM method run on sliding windows over several scales of
the image, each window's map weighted by its class score, pasted back and fused; one program."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drjax.gradcam import core, maps, methods, taps
from drjax.gradcam.perturbation import map_chunks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
  """SESS's static settings, hashable so that the program compiles once per setting."""
  scales: tuple[int, ...]
  window: int
  step: int
  pre_filter_ratio: float
  theta: float
  pool: str
  smooth: bool
  use_softmax_scores: bool
  batch_size: int


def default_scales(window: int, num_scales: int = 12, scale_step_ratio: float = 2 / 7
                   ) -> tuple[int, ...]:
  """The paper's scales: `num_scales` shorter-side lengths from `window` up, in steps of
  round(scale_step_ratio * window) (224, 288, ..., 928 for a 224 window)."""
  step = int(round(window * scale_step_ratio))
  return tuple(window + step * i for i in range(num_scales))


def window_starts(length: int, step: int, window: int) -> list[int]:
  """Window offsets along one side; a window that would cross the border is shifted back in."""
  starts = []
  for start in range(0, length, step):
    if start + window >= length:
      starts.append(max(length - window, 0))
      break
    starts.append(start)
  return starts


def scaled_size(height: int, width: int, scale: int) -> tuple[int, int]:
  """(H, W) with the shorter side resized to `scale`, as torchvision's `resize(img, scale)`."""
  if width <= height:
    return int(scale * height / width), scale
  return scale, int(scale * width / height)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]`: bilinear resize along one axis with half-pixel centres and clamped edges,
  no antialiasing, as cv2.resize's INTER_LINEAR (which pytorch-grad-cam pastes windows with)."""
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  frac = src - lo
  out = np.zeros((n_out, n_in), np.float32)
  np.add.at(out, (np.arange(n_out), lo), 1 - frac)
  np.add.at(out, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), frac)
  return out


def blur_matrix(n: int, ksize: int = 11, sigma: float = 5.0) -> np.ndarray:
  """`[n, n]`: a 1-D Gaussian blur with reflect-101 borders, as cv2.GaussianBlur's default."""
  kernel = np.exp(-(np.arange(ksize) - (ksize - 1) / 2)**2 / (2 * sigma**2))
  kernel /= kernel.sum()
  out = np.zeros((n, n), np.float64)
  for i in range(n):
    for t, weight in enumerate(kernel):
      out[i, _reflect101(i + t - ksize // 2, n)] += weight
  return out.astype(np.float32)


def _reflect101(i: int, n: int) -> int:
  if n == 1:
    return 0
  while not 0 <= i < n:
    i = -i if i < 0 else 2 * n - 2 - i
  return i


def _windows(images: Array, config: _Config):
  """-> (patches `[B, P, w, w, C]`, per scale a (first patch, sizes, (y, x) offsets) tuple)."""
  height, width = images.shape[1:3]
  window = config.window
  patches, groups = [], []
  for scale in config.scales:
    sh, sw = scaled_size(height, width, scale)
    # jax's antialiasing (on by default) acts only when a scale is below the image's size, as
    # torchvision's antialias=True does; upsampling is plain half-pixel bilinear in both.
    scaled = jax.image.resize(images, (images.shape[0], sh, sw, images.shape[-1]), 'bilinear')
    offsets = [(y, x) for y in window_starts(sh, config.step, window)
               for x in window_starts(sw, config.step, window)]
    groups.append((len(patches), (sh, sw), offsets))
    patches += [scaled[:, y:y + window, x:x + window] for y, x in offsets]
  return jnp.stack(patches, axis=1), groups


def _fuse(cams: Array, keep: Array, groups, size, config: _Config) -> Array:
  """Pastes each window's map `[B, P, w, w]` back at its place and fuses them -> `[B, H, W]`."""
  height, width = size
  window = config.window
  total = jnp.zeros((cams.shape[0], height, width), cams.dtype)
  counts = jnp.zeros_like(total)
  for first, (sh, sw), offsets in groups:
    # Pasting into a zero canvas of the scaled size and resizing it to the image is linear:
    # the window's rows and columns of the two resize matrices do it in two small products.
    rows, cols = resize_matrix(sh, height), resize_matrix(sw, width)
    ys = np.stack([rows[:, y:y + window] for y, _ in offsets])   # [P_s, H, w]
    xs = np.stack([cols[:, x:x + window] for _, x in offsets])   # [P_s, W, w]
    part = cams[:, first:first + len(offsets)]
    pasted = jnp.einsum('phy,bpyx,pwx->bphw', ys, part, xs, precision=jax.lax.Precision.HIGHEST)
    kept = keep[:, first:first + len(offsets), None, None]
    if config.pool == 'max':
      total = jnp.maximum(total, jnp.where(kept, pasted, 0.0).max(axis=1))
    else:
      # The paper's spatial weighted average: each pixel averages the windows whose map
      # there exceeds theta, so that windows which do not cover it do not dilute it.
      counted = kept & (pasted > config.theta)
      total = total + jnp.where(counted, pasted, 0.0).sum(axis=1)
      counts = counts + counted.sum(axis=1)
  if config.pool == 'max':
    return total
  return jnp.where(counts > 0, total / jnp.where(counts > 0, counts, 1.0), 0.0)


def _bind(model, variables):
  """The model as the base method takes it: an nnx Module is merged back from its state."""
  if isinstance(model, nnx.GraphDef):
    return nnx.merge(model, variables), None
  return model, variables


@functools.partial(jax.jit, static_argnames=(
    'model', 'config', 'base_method', 'base_kwargs', 'layer', 'target', 'predict', 'apply_kwargs',
    'reshape'))
def _sess(model, variables, images, cls, *, config, base_method, base_kwargs, layer, target,
          predict, apply_kwargs, reshape):
  forward = functools.partial(taps.forward, model, variables, apply_kwargs=apply_kwargs)
  if predict:
    cls = jax.vmap(core.predicted)(forward(images, {})[0], cls)
  patches, groups = _windows(images, config)
  batch, num = patches.shape[:2]
  flat = patches.reshape(batch * num, *patches.shape[2:])
  flat_cls = jnp.repeat(cls, num)
  target_fn = core.class_score if target is None else lambda logits, _: target(logits)

  def patch_scores(chunk):
    x, c = chunk
    out = forward(x, {})[0]
    out = jax.nn.softmax(out) if config.use_softmax_scores else out
    return jax.vmap(target_fn)(out, c)

  # The paper's channel-wise weights: each window's target score (on the softmax), clipped at
  # 0, over the image's best window's, so that windows without the target count little.
  scores = jax.nn.relu(map_chunks(patch_scores, (flat, flat_cls), config.batch_size))
  scores = scores.reshape(batch, num)
  best = scores.max(axis=1, keepdims=True)
  weights = jnp.where(best > 0, scores / jnp.where(best > 0, best, 1.0), 1.0)
  # The paper's pre-filtering: only the highest scoring windows get a (costly) map.
  drop = int(num * config.pre_filter_ratio)
  if drop:
    kept_idx = jnp.argsort(scores, axis=1)[:, drop:]   # [B, K]
    kept = jnp.take_along_axis(patches, kept_idx[:, :, None, None, None], axis=1)
    kept = kept.reshape(-1, *flat.shape[1:])
    weights = jnp.take_along_axis(weights, kept_idx, axis=1)
  else:
    kept = flat

  def base_maps(chunk):
    x, c = chunk
    base_model, base_variables = _bind(model, variables)
    return base_method(base_model, base_variables, x, layer=layer,
                       targets=c if target is None else target, apply_kwargs=dict(apply_kwargs),
                       reshape=reshape, **dict(base_kwargs))

  cams = map_chunks(base_maps, (kept, jnp.repeat(cls, num - drop)), config.batch_size)
  cams = cams.reshape(batch, num - drop, *cams.shape[1:]) * weights[:, :, None, None]
  keep = jnp.ones((batch, num), bool)
  if drop:
    rows = jnp.arange(batch)[:, None]
    cams = jnp.zeros((batch, num, *cams.shape[2:]), cams.dtype).at[rows, kept_idx].set(cams)
    keep = jnp.zeros((batch, num), bool).at[rows, kept_idx].set(True)
  fused = _fuse(cams, keep, groups, images.shape[1:3], config)
  if config.smooth:
    gy, gx = blur_matrix(fused.shape[1]), blur_matrix(fused.shape[2])
    fused = jnp.einsum('hy,byx,wx->bhw', gy, fused, gx, precision=jax.lax.Precision.HIGHEST)
  return fused


def sess(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
         apply_kwargs=None, reshape=None, base_method: Callable[..., Array] = methods.gradcam,
         base_kwargs: dict[str, Any] | None = None, scales: Sequence[int] | None = None,
         num_scales: int = 12, scale_step_ratio: float = 2 / 7, window_size: int | None = None,
         step_size: int | None = None, pre_filter_ratio: float = 0.0, theta: float = 0.0,
         pool: str = 'mean', smooth: bool = True, use_softmax_scores: bool = True,
         batch_size: int = 32):
  """SESS, Saliency Enhancing with Scaling and Sliding (Tursun et al., ECCV 2022).

  As pytorch-grad-cam 1.5.7's SESS: the image is resized so that its shorter side is each of
  `scales`; a `window_size` window slides over each scale with stride `step_size`; every
  window is scored (the target on the softmax of its logits, clipped at 0) and weighted by its
  score over the image's best window's; `base_method` maps each of the best windows (all but
  the lowest `pre_filter_ratio` of them) for the image's target; the weighted maps are pasted
  back into the image and fused by a per-pixel mean over the windows whose map exceeds `theta`
  (or a max), then blurred (cv2's 11x11 Gaussian, sigma 5) and min-max normalised.

  Cost: one forward pass (when the targets are the predicted classes), P window forward
  passes and K base-method runs on window-sized inputs per image, where P is the number of
  windows over all scales (122 for a 224 px image with the defaults) and K = P - int(P *
  pre_filter_ratio); all in one compiled program, `batch_size` windows at a time.

  Args:
    base_method: any drjax CAM method with `gradcam`'s signature (`gradcam`, `layercam`,
      `scorecam`, `ablationcam`, ...); it gets `layer`, the targets, `apply_kwargs`, `reshape`
      and `base_kwargs`, and returns maps in [0, 1] at the window's size.
    base_kwargs: more keyword arguments of `base_method` (hashable values).
    scales: shorter-side lengths, each >= the window; None -> `default_scales(window,
      num_scales, scale_step_ratio)`.
    window_size: the square window's side; None -> the shorter side of the image (so that
      the smallest default scale is the image itself).
    step_size: the window's stride; None -> the window (windows at the border shift back in).
    pre_filter_ratio: the fraction of lowest-scoring windows that get no map, in [0, 1).
    theta: the threshold of the mean fusion.
    pool: 'mean' (the paper's spatial weighted average) or 'max'.
    smooth: blur the fused map.
    use_softmax_scores: score windows with the target on softmax(logits); False uses the
      target on the logits. A callable target is applied to the probabilities when True.
    batch_size: windows per chunk, for the scores and for the base method.
    Others as `gradcam`; `layer` may be anything that `base_method` takes (a sequence for
    `fusion`). `raw=True` returns the fused (and blurred) map before min-max.

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (or the raw fused map), at the input resolution.
  """
  if pool not in ('mean', 'max'):
    raise ValueError(f"pool must be 'mean' or 'max'; got {pool!r}")
  if not 0.0 <= pre_filter_ratio < 1.0:
    raise ValueError(f'pre_filter_ratio must be in [0, 1); got {pre_filter_ratio}')
  if num_scales < 1:
    raise ValueError(f'num_scales must be at least 1; got {num_scales}')
  size = images.shape[-3:-1]
  images = core.prepare_images(images, image_size)
  height, width = images.shape[1:3]
  window = int(window_size or min(height, width))
  scales = tuple(int(s) for s in scales) if scales is not None else default_scales(
      window, num_scales, scale_step_ratio)
  if min(scales) < window:
    raise ValueError(f'every scale must be at least the window size {window}; got {scales}')
  config = _Config(scales, window, int(step_size or window), float(pre_filter_ratio),
                   float(theta), pool, bool(smooth), bool(use_softmax_scores), int(batch_size))
  _, cls = core.resolve_targets(targets, images.shape[0])
  model, variables = taps.pure_model(model, variables)
  fused = _sess(model, variables, images, cls, config=config, base_method=base_method,
                base_kwargs=taps.static_kwargs(base_kwargs),
                layer=layer if layer is None or isinstance(layer, str) else tuple(layer),
                target=targets if callable(targets) else None,
                predict=targets is None, apply_kwargs=taps.static_kwargs(apply_kwargs),
                reshape=reshape)
  return maps.resize(fused, size) if raw else maps.postprocess(fused, size)
