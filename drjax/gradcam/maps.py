"""Each CAM method's map from a layer's `(acts, grads)`, citing its paper, and the
post-processing (ReLU, bilinear resize, per-image min-max) kept apart from the methods."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------
# Per-method maps: (acts [..., h, w, C], grads [..., h, w, C]) -> [..., h, w].


def gradcam_map(acts: Array, grads: Array) -> Array:
  """Grad-CAM (Selvaraju et al. 2017, eqs. 1-2): channel weights = spatial mean of grads."""
  weights = grads.mean(axis=(-3, -2), keepdims=True)
  return (weights * acts).sum(-1)


def gradcam_plusplus_map(acts: Array, grads: Array) -> Array:
  """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with exp(score) gradients).

  alpha = g^2 / (2 g^2 + sum_ij(A) g^3), zero where g == 0; weights =
  sum_ij alpha * relu(g). eps as in pytorch-grad-cam.
  """
  g2 = grads**2
  g3 = g2 * grads
  sum_acts = acts.sum(axis=(-3, -2), keepdims=True)
  alpha = g2 / (2 * g2 + sum_acts * g3 + 1e-6)
  alpha = jnp.where(grads != 0, alpha, 0.0)
  weights = (alpha * jax.nn.relu(grads)).sum(axis=(-3, -2), keepdims=True)
  return (weights * acts).sum(-1)


def hirescam_map(acts: Array, grads: Array) -> Array:
  """HiResCAM (Draelos & Carin 2020, eq. 4): element-wise grads * acts, summed over channels."""
  return (grads * acts).sum(-1)


def xgradcam_map(acts: Array, grads: Array) -> Array:
  """XGrad-CAM (Fu et al. 2020, eq. 13): weights = sum_ij(A * g) / sum_ij(A)."""
  sum_acts = acts.sum(axis=(-3, -2), keepdims=True)
  weights = (grads * acts / (sum_acts + 1e-7)).sum(axis=(-3, -2), keepdims=True)
  return (weights * acts).sum(-1)


def layercam_map(acts: Array, grads: Array) -> Array:
  """LayerCAM (Jiang et al. 2021, eqs. 5-6): per-location weights relu(g), times A."""
  return (jax.nn.relu(grads) * acts).sum(-1)


# ----------------------------------------------------------------------------
# Post-processing, separate from the methods.


def resize(maps: Array, size: Sequence[int]) -> Array:
  """Bilinear (half-pixel centres, like cv2.resize) `[B, h, w]` -> `[B, H, W]`."""
  size = tuple(size)
  if tuple(maps.shape[-2:]) == size:
    return maps
  return jax.image.resize(maps, (*maps.shape[:-2], *size), 'bilinear')


def normalize(maps: Array) -> Array:
  """Per-image min-max to [0, 1]; a constant map (e.g. all zero) becomes all zero, never NaN."""
  lo = maps.min(axis=(-2, -1), keepdims=True)
  span = maps.max(axis=(-2, -1), keepdims=True) - lo
  ok = span > 0
  return jnp.where(ok, (maps - lo) / jnp.where(ok, span, 1.0), 0.0).astype(jnp.float32)


def postprocess(maps: Array, size: Sequence[int] | None = None, *, relu: bool = True) -> Array:
  """ReLU, bilinear resize to `size` (H, W) and per-image min-max: `[B, h, w]` -> `[B, H, W]`."""
  if relu:
    maps = jax.nn.relu(maps)
  if size is not None:
    maps = resize(maps, size)
  return normalize(maps)


# ----------------------------------------------------------------------------
# Multi-layer fusion (LayerCAM, Sec. III-C).


def layercam_fusion(acts: dict[str, Array], grads: dict[str, Array], size: Sequence[int],
                    gamma: float = 2.0) -> Array:
  """`fuse_maps` of the LayerCAM maps of every layer in `acts` (and `grads`) -> `[B, H, W]`."""
  return fuse_maps([layercam_map(acts[n], grads[n]) for n in acts], size, gamma)


def fuse_maps(maps: Sequence[Array], size: Sequence[int], gamma: float = 2.0) -> Array:
  """LayerCAM's fusion of raw maps `[B, h_i, w_i]` -> `[B, H, W]` (before min-max).

  Each map is ReLU'd, resized to `size`, scaled by tanh(gamma * M / max M)
  (Jiang et al. 2021, eq. 7) and the results are fused by element-wise maximum.
  """
  fused = 0.0
  for cam in maps:
    cam = resize(jax.nn.relu(cam), size)
    peak = cam.max(axis=(-2, -1), keepdims=True)
    fused = jnp.maximum(fused, jnp.tanh(gamma * cam / jnp.where(peak > 0, peak, 1.0)))
  return fused


# The (acts, grads) -> map formulas, for the parity test and for callers with their own core.
CAM_MAPS: dict[str, Callable[[Array, Array], Array]] = {
    'gradcam': gradcam_map,
    'gradcam++': gradcam_plusplus_map,
    'hirescam': hirescam_map,
    'xgradcam': xgradcam_map,
    'layercam': layercam_map,
}
