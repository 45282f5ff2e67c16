"""RefineCAM: the product of a base CAM method's maps at several layers, as in pytorch-grad-cam
1.5.7's refine_cam.py, where deep layers' coarse maps denoise the shallow layers' fine ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from drjax.gradcam import maps, methods

Array = jax.Array


def refinecam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
              apply_kwargs=None, reshape=None,
              base_method: Callable[..., Array] = methods.gradcam_plusplus,
              base_kwargs: dict[str, Any] | None = None):
  """RefineCAM (arXiv:2605.14641, as cited and implemented by pytorch-grad-cam 1.5.7).

  Each layer's `base_method` map (ReLU'd, resized to the input, min-max normalised) is
  computed, and the maps are multiplied element-wise and min-max normalised again: a pixel
  stays salient only where every layer agrees.

  Cost: one `base_method` run per layer (for a gradient method, a forward pass and the
  backward pass down to that layer each).

  Args:
    layer: a sequence of layer names; None -> `methods.default_fusion_layers(model)` (the
      stages that `fusion` takes, e.g. denseblock2-4). A single name gives the base map.
    base_method: any drjax CAM method with `gradcam`'s signature (pytorch-grad-cam's
      default, Grad-CAM++, here too).
    base_kwargs: more keyword arguments of `base_method`.
    Others as `gradcam` (`reshape` applies to every layer). `raw=True` returns the product
    before the final min-max.

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (or the raw product), at the input resolution.
  """
  if layer is None:
    layer = methods.default_fusion_layers(model)
  layers = (layer,) if isinstance(layer, str) else tuple(layer)
  refined = None
  for name in layers:
    # Each base map is already in [0, 1] with its maximum at 1, which the reference's
    # per-layer rescaling (a loop that rebinds its variable, so a no-op) meant to ensure.
    cam = base_method(model, variables, images, layer=name, targets=targets,
                      image_size=image_size, apply_kwargs=apply_kwargs, reshape=reshape,
                      **(base_kwargs or {}))
    refined = cam if refined is None else refined * cam
  return refined if raw else maps.normalize(refined)
