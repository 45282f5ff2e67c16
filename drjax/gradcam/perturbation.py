"""Perturbation CAMs: AblationCAM, whose channel ablations run as one compiled, chunked program,
and `map_chunks`, the chunked `lax.map` that bounds the memory of such batched passes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drjax.gradcam import core, maps, taps

Array = jax.Array

# pytorch-grad-cam's AblationLayer sets an ablated channel to 0 where the layer's smallest
# activation is 0 (after a ReLU), and otherwise to that minimum less this offset, so that a
# following ReLU still silences it (its deviation from the paper, kept here).
ABLATION_OFFSET = 1e7


def map_chunks(fn: Callable[[Any], Any], xs: Any, batch_size: int) -> Any:
  """`fn` over `xs` in chunks of `batch_size` items, as one `lax.map`, to bound memory.

  Args:
    fn: maps a chunk (`xs`' leaves with a leading axis of `batch_size`) to a pytree of arrays
      with the same leading axis, e.g. a batched forward pass or a `vmap`ped function.
    xs: a pytree of arrays `[N, ...]`.
    batch_size: items per chunk (clipped to [1, N]). The last chunk is filled up with copies
      of the first items, so that it holds valid inputs; their outputs are dropped.

  Returns:
    `fn`'s outputs for the N items, `[N, ...]`: the result does not depend on `batch_size`.
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  batch_size = max(1, min(int(batch_size), n))
  chunks = -(-n // batch_size)
  if chunks * batch_size != n:
    xs = jax.tree.map(lambda x: x[np.arange(chunks * batch_size) % n], xs)
  xs = jax.tree.map(lambda x: x.reshape(chunks, batch_size, *x.shape[1:]), xs)
  ys = jax.lax.map(fn, xs)
  return jax.tree.map(lambda y: y.reshape(chunks * batch_size, *y.shape[2:])[:n], ys)


def ablation_values(acts: Array) -> Array:
  """The value an ablated channel takes, per image, as pytorch-grad-cam's AblationLayer.

  Args:
    acts: a layer's output `[B, ..., C]` (its own layout, before any `reshape`).

  Returns:
    `[B, 1, ..., 1]`: 0 where the image's smallest activation is 0, else that minimum less
    `ABLATION_OFFSET`.
  """
  axes = tuple(range(1, acts.ndim))
  low = acts.min(axis=axes, keepdims=True)
  return jnp.where(low == 0, 0.0, low - ABLATION_OFFSET).astype(acts.dtype)


@functools.partial(jax.jit, static_argnames=('model', 'layer', 'target_fn', 'batch_size',
                                             'apply_kwargs', 'reshape'))
def _ablationcam(model, variables, images, cls, *, layer, target_fn, batch_size, apply_kwargs=(),
                 reshape=None):
  taps.layer_shapes(model, variables, images, (layer,), apply_kwargs, reshape)
  forward = functools.partial(taps.forward, model, variables, images, apply_kwargs=apply_kwargs)
  logits, acts = forward({layer: None})
  acts = acts[layer]
  cls = jax.vmap(core.predicted)(logits, cls)
  scores = jax.vmap(target_fn)(logits, cls)
  shift = ablation_values(acts) - acts
  channels = acts.shape[-1]

  def ablated_scores(c):
    # Only this delta (added to the layer's output) depends on c, so under vmap the trunk below
    # the layer stays unbatched and XLA hoists it out of the chunk loop (a test checks it).
    delta = shift * jax.nn.one_hot(c, channels, dtype=acts.dtype)
    return jax.vmap(target_fn)(forward({layer: delta})[0], cls)

  ablated = map_chunks(jax.vmap(ablated_scores), jnp.arange(channels), batch_size)   # [C, B]
  # Desai & Ramaswamy 2020: the relative drop of the target score when channel k is ablated.
  weights = (scores[:, None] - ablated.T) / scores[:, None]
  grid = taps.grid({layer: acts}, reshape)[layer]
  return (grid * weights[:, None, None, :]).sum(-1)


def ablationcam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
                apply_kwargs=None, reshape=None, batch_size: int = 32):
  """Ablation-CAM (Desai & Ramaswamy, WACV 2020): gradient-free, one ablation per channel.

  Each channel k of the layer is ablated in turn and the channel's weight is the relative drop
  of the target score, w_k = (y - y_k) / y, as pytorch-grad-cam 1.5.7's AblationCAM with
  its default `ratio_channels_to_ablate=1.0` (every channel). Ablating sets the channel to 0,
  or, where the image's activations at the layer have a minimum other than 0 (no ReLU before
  it), to that minimum less 1e7, as pytorch-grad-cam's AblationLayer (`ablation_values`).
  The map is sum_k w_k A^k, post-processed as `gradcam`'s. The reference's experimental
  `ratio_channels_to_ablate < 1` (an SVD-based choice of channels to skip) is not implemented.

  Cost: one forward pass, then C (the layer's channels) forward passes of the part of the
  network above the layer (XLA computes the trunk below it once), all in one compiled program:
  `batch_size` channels at a time, each chunk one pass of `batch_size * B` rows above the layer.

  Args:
    batch_size: channels ablated per chunk (bounds memory; the result does not depend on it).
    Others as `gradcam`. `raw=True` gives sum_k w_k A^k at the layer's resolution `[B, h, w]`.

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (or the raw `[B, h, w]` map).
  """
  size = images.shape[-3:-1]
  model, variables, layers, apply_kwargs = core.model_inputs(model, variables, layer, apply_kwargs)
  if len(layers) != 1:
    raise ValueError(f'ablationcam takes one layer; got {layers}')
  images, target_fn, cls = core.core_inputs(images, targets, image_size)
  cam = _ablationcam(model, variables, images, cls, layer=layers[0], target_fn=target_fn,
                     batch_size=batch_size, apply_kwargs=apply_kwargs, reshape=reshape)
  return cam if raw else maps.postprocess(cam, size)
