"""Grad-CAM and its family as pure JAX functions of (model, variables, images).

One core, `activations_and_grads`, runs the model once with a zero
'perturbations' entry added at the chosen stage (`drjax.models.common.tap`) and
returns that stage's activations and the gradient of the target with respect to
them, from `jax.vjp` on the perturbation alone. Nothing is differentiated with
respect to the parameters or the input, so XLA never builds the backward pass of
the trunk below the chosen layer: Grad-CAM at DenseNet's denseblock4 costs about
one forward pass (checked with XLA's cost analysis in tests/test_gradcam.py).
There are no hooks and no mutable state; everything is jit-compatible; each image
has its own target (vmapped over the logits).

Each CAM method is a few lines that turn `(acts, grads)` into a map, citing its
paper; post-processing (ReLU, bilinear resize, per-image min-max) is separate
(`postprocess`). The formulas follow pytorch-grad-cam (jacobgil), which
tests/test_gradcam_parity.py runs beside drjax on converted torchvision weights.

Conventions: images are float32 `[B, H, W, 3]` ImageNet-normalised (uint8
images are normalised with `drjax.models.common.normalize`); maps are
channels-last `[B, h, w]`; targets are `None` (the predicted class), an int
array `[B]` (a class per image) or a callable `logits [K] -> scalar` applied to
each image's logits (e.g. `referable_dr_target`).

The computation follows its inputs' placement, as `jax.jit` does: images sharded on
the batch axis over several devices, with the variables replicated, split the batch
over them (`drjax.cam_study.compute_heatmaps` does so).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drjax.models import common

Array = jax.Array
Targets = None | Array | np.ndarray | Sequence[int] | int | Callable[[Array], Array]

# Stages fused by `fusion` (LayerCAM-style), keyed by the model's default CAM layer.
FUSION_LAYERS = {
    'denseblock4': ('denseblock2', 'denseblock3', 'denseblock4'),
    'layer4': ('layer2', 'layer3', 'layer4'),
    'block5': ('block3', 'block4', 'block5'),
}


# ----------------------------------------------------------------------------
# Targets: pure functions of one image's logits.


def class_score(logits: Array, cls: Array) -> Array:
  """The raw logit of class `cls` (pytorch-grad-cam's ClassifierOutputTarget)."""
  return logits[cls]


def referable_dr_target(logits: Array) -> Array:
  """Probability of referable DR: softmax mass of grades 2-4 (moderate or worse)."""
  return jax.nn.softmax(logits)[2:].sum()


def _resolve_targets(targets: Targets, batch: int) -> tuple[Callable[[Array, Array], Array],
                                                            Array]:
  """-> (target_fn(logits [K], cls) -> scalar, cls int32 [B]; -1 = predicted class)."""
  # The -1s are a host array: a jnp.full here would cost an eager dispatch on every call.
  if targets is None:
    return class_score, np.full((batch,), -1, np.int32)
  if callable(targets):
    user_fn = targets
    return _CallableTarget(user_fn), np.full((batch,), -1, np.int32)
  cls = jnp.asarray(targets, jnp.int32)
  if cls.ndim == 0:
    cls = jnp.full((batch,), cls, jnp.int32)
  if cls.shape != (batch,):
    raise ValueError(f'targets must be None, a callable, an int or an int array of shape '
                     f'[{batch}]; got shape {cls.shape}')
  return class_score, cls


class _CallableTarget:
  """Wraps a user `fn(logits [K]) -> scalar` as `(logits, cls) -> scalar`, hashably."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, logits, cls):
    del cls
    return self.fn(logits)

  def __hash__(self):
    return hash(self.fn)

  def __eq__(self, other):
    return isinstance(other, _CallableTarget) and other.fn == self.fn


def _predicted(logits: Array, cls: Array) -> Array:
  return jnp.where(cls < 0, jnp.argmax(logits), cls)


# ----------------------------------------------------------------------------
# Input checks.


def stage_names(model) -> tuple[str, ...]:
  return tuple(getattr(model, 'stage_names', ()))


def resolve_layers(model, layer: str | Sequence[str] | None) -> tuple[str, ...]:
  """Validates layer name(s); None -> the model's default CAM layer."""
  if layer is None:
    layer = model.default_cam_layer
  layers = (layer,) if isinstance(layer, str) else tuple(layer)
  valid = stage_names(model)
  for name in layers:
    if name not in valid:
      raise ValueError(f'Unknown layer {name!r} for {type(model).__name__}; valid layers '
                       f'(model.stage_names): {", ".join(valid)}')
  return layers


def prepare_images(images, image_size: int | Sequence[int] | None = None) -> Array:
  """Checks `[B, H, W, 3]`, normalises uint8, and resizes to `image_size` if given.

  Args:
    images: uint8 (normalised here) or float32 ImageNet-normalised `[B, H, W, 3]`
      (a single `[H, W, 3]` image is promoted to a batch of one).
    image_size: if set (int or (H, W)) and different from the images' size, the
      images are resized bilinearly to it before the forward pass. Heatmaps are
      still returned at the resolution of the images as passed in.

  Returns:
    float32 `[B, H', W', 3]`.
  """
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be [B, H, W, 3] (channels last, RGB); got shape '
                     f'{tuple(images.shape)}')
  if images.dtype == jnp.uint8 or images.dtype == np.uint8:
    images = common.normalize(images)
  images = jnp.asarray(images, jnp.float32)
  if image_size is not None:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if tuple(images.shape[1:3]) != size:
      images = jax.image.resize(images, (images.shape[0], *size, 3), 'bilinear')
  return images


def _clean(variables) -> dict:
  """Drops collections that a forward pass here must own."""
  return {k: v for k, v in variables.items() if k not in ('perturbations', 'intermediates')}


# ----------------------------------------------------------------------------
# The core.


def _zero_perturbations(model, variables, image_shape) -> dict:
  """Zeros for every tap of images of `image_shape` (flax requires all of them)."""
  shapes = jax.eval_shape(
      lambda x: model.apply(variables, x, train=False, mutable=['perturbations'])[1],
      jax.ShapeDtypeStruct(image_shape, jnp.float32))['perturbations']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=('model', 'layers', 'target_fn'))
def _acts_and_grads(model, variables, images, cls, *, layers, target_fn):
  zeros = _zero_perturbations(model, variables, images.shape)
  missing = [n for n in layers if n not in zeros]
  if missing:
    raise ValueError(f'{type(model).__name__} does not tap {missing} in model.apply; taps: '
                     f'{sorted(zeros)}')

  def forward(chosen):
    perturbations = {**zeros, **chosen}
    logits, state = model.apply({**variables, 'perturbations': perturbations}, images,
                                train=False, mutable=['intermediates'])
    return logits, {n: state['intermediates'][n][0] for n in layers}

  # Differentiate w.r.t. the perturbations of the chosen layers only: the trunk
  # below them is a constant of this vjp, so no backward pass is built for it.
  logits, vjp_fn, acts = jax.vjp(forward, {n: zeros[n] for n in layers}, has_aux=True)
  # Per-example targets, vmapped over the logits. In inference mode (BatchNorm on
  # running statistics) image i's logits depend on image i alone, so pulling the
  # per-example cotangents back through the batched forward pass gives each
  # image's own gradient, as `vmap` of a per-image `jax.grad` would (a test checks
  # it), from one batched forward and one vjp.
  cls = jax.vmap(_predicted)(logits, cls)
  scores, dscores = jax.vmap(jax.value_and_grad(target_fn))(logits, cls)
  (grads,) = vjp_fn(dscores)
  is_zero = {n: jnp.all(grads[n] == 0, axis=(1, 2, 3)) for n in layers}
  return acts, grads, logits, scores, is_zero


def _warn_zero_grads(is_zero: dict[str, Array]) -> None:
  """Warns for each image whose target gradient at a layer is all zero.

  Called after the core has been dispatched. Eagerly it reads the flags; inside a
  caller's jit (the flags are tracers) it adds a host callback to the caller's program.
  A callback inside the core itself would cost every eager call a device-host sync.
  """
  for n, flags in is_zero.items():
    if isinstance(flags, jax.core.Tracer):
      jax.debug.callback(functools.partial(_warn_if_zero, layer=n), flags)
    else:
      _warn_if_zero(flags, layer=n)


def _warn_if_zero(is_zero, layer):
  idx = np.flatnonzero(np.asarray(is_zero))
  if idx.size:
    warnings.warn(f'Grad-CAM: the target gradient w.r.t. {layer!r} is all zero for image(s) '
                  f'{idx.tolist()}; their heatmaps are all zero.', RuntimeWarning, stacklevel=2)


def activations_and_grads(model, variables, images, *, layer: str | Sequence[str] | None = None,
                          targets: Targets = None,
                          image_size: int | Sequence[int] | None = None) -> dict[str, Any]:
  """The shared core: a stage's activations and the target's gradient w.r.t. them.

  Args:
    model: a drjax linen model with `stage_names`, `default_cam_layer` and taps.
    variables: its variables (`params`, `batch_stats`).
    images: `[B, H, W, 3]`, uint8 or float32 ImageNet-normalised.
    layer: a stage name, a sequence of them (all from one pass), or None for
      `model.default_cam_layer`.
    targets: None (predicted class), int array `[B]`, or callable on logits `[K]`.
    image_size: if set and different from the images', resize the images to it first.

  Returns:
    dict(acts={layer: [B, h, w, C]}, grads={layer: [B, h, w, C]}, logits=[B, K],
    scores=[B] (target values)).
  """
  layers = resolve_layers(model, layer)
  images, target_fn, cls = _core_inputs(images, targets, image_size)
  acts, grads, logits, scores, is_zero = _acts_and_grads(
      model, _clean(variables), images, cls, layers=layers, target_fn=target_fn)
  _warn_zero_grads(is_zero)
  return dict(acts=acts, grads=grads, logits=logits, scores=scores)


def _core_inputs(images, targets, image_size=None):
  """-> (images checked, normalised and resized (`prepare_images`), target_fn, cls)."""
  images = prepare_images(images, image_size)
  target_fn, cls = _resolve_targets(targets, images.shape[0])
  return images, target_fn, cls


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
# The public methods: one plain function each, same signature.


def _gradient_cam(map_fn, model, variables, images, layer, targets, raw, image_size):
  size = tuple(images.shape[-3:-1])
  (name,) = resolve_layers(model, layer)
  images, target_fn, cls = _core_inputs(images, targets, image_size)
  # The core program is shared by every method at this layer (one compile), the map and its
  # post-processing are one small program, and the warning reads its flag last, so that
  # nothing waits for the core before the map is dispatched.
  acts, grads, _, _, is_zero = _acts_and_grads(model, _clean(variables), images, cls,
                                               layers=(name,), target_fn=target_fn)
  cam = _map_program(map_fn, acts[name], grads[name], size=None if raw else size)
  _warn_zero_grads(is_zero)
  return cam


@functools.partial(jax.jit, static_argnames=('map_fn', 'size'))
def _map_program(map_fn, acts, grads, *, size):
  """A method's map and, unless `size` is None (raw), its post-processing, jitted."""
  cam = map_fn(acts, grads)
  return cam if size is None else postprocess(cam, size)


def gradcam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None):
  """Grad-CAM heatmaps (Selvaraju et al. 2017).

  Args:
    model: drjax linen model (with `stage_names`, `default_cam_layer`).
    variables: `{'params', 'batch_stats'}`.
    images: `[B, H, W, 3]`, uint8 or float32 ImageNet-normalised.
    layer: stage name; None -> `model.default_cam_layer` (DenseNet: 'denseblock4',
      the paper's choice). Unknown names raise a ValueError listing the valid ones.
    targets: None = predicted class; int array `[B]` = class per image; callable
      `logits [K] -> scalar` = custom target (e.g. `referable_dr_target`).
    raw: return the unprocessed map at layer resolution `[B, h, w]` (no ReLU).
    image_size: if set and different from the images', resize the images to it
      before the forward pass (heatmaps still come back at the input resolution).

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (or the raw `[B, h, w]` map).
  """
  return _gradient_cam(gradcam_map, model, variables, images, layer, targets, raw, image_size)


def gradcam_plusplus(model, variables, images, *, layer=None, targets=None, raw=False,
                     image_size=None):
  """Grad-CAM++ (Chattopadhay et al. 2018); arguments as `gradcam`."""
  return _gradient_cam(gradcam_plusplus_map, model, variables, images, layer, targets, raw,
                       image_size)


def hirescam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None):
  """HiResCAM (Draelos & Carin 2020); arguments as `gradcam`."""
  return _gradient_cam(hirescam_map, model, variables, images, layer, targets, raw, image_size)


def xgradcam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None):
  """XGrad-CAM (Fu et al. 2020); arguments as `gradcam`."""
  return _gradient_cam(xgradcam_map, model, variables, images, layer, targets, raw, image_size)


def layercam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None):
  """LayerCAM (Jiang et al. 2021); arguments as `gradcam`."""
  return _gradient_cam(layercam_map, model, variables, images, layer, targets, raw, image_size)


def default_fusion_layers(model) -> tuple[str, ...]:
  """`FUSION_LAYERS[model.default_cam_layer]`, keeping the stages the model has."""
  names = stage_names(model)
  layers = FUSION_LAYERS.get(model.default_cam_layer, ())
  return tuple(n for n in layers if n in names) or (model.default_cam_layer,)


def fusion(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
           gamma: float = 2.0):
  """Multi-layer LayerCAM fusion (Jiang et al. 2021, Sec. III-C, eq. 7).

  LayerCAM maps of several stages, all from one forward/backward pass, are
  ReLU'd, resized to the input, scaled with tanh(gamma * M / max M) (so that the
  weak shallow-layer maps count) and fused by element-wise maximum.

  Args:
    layer: a sequence of stage names; None -> `FUSION_LAYERS[model.default_cam_layer]`.
    gamma: the tanh scaling factor (the paper's 2).
    Others as `gradcam`; `raw=True` returns the fused map before min-max, at the
    input resolution.
  """
  size = images.shape[-3:-1]
  if layer is None:
    layer = default_fusion_layers(model)
  out = activations_and_grads(model, variables, images, layer=layer, targets=targets,
                              image_size=image_size)
  fused = layercam_fusion(out['acts'], out['grads'], size, gamma)
  return fused if raw else normalize(fused)


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


@functools.partial(jax.jit, static_argnames=('model', 'layer', 'target_fn', 'batch_size'))
def _scorecam(model, variables, images, cls, *, layer, target_fn, batch_size):
  logits, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  acts = state['intermediates'][layer][0]
  cls = jax.vmap(_predicted)(logits, cls)
  size = images.shape[1:3]

  def one(image, a, c):
    # Each channel, upsampled and min-max normalised, masks the input (Wang et al.
    # 2020, eq. 3; the baseline is 0 = the ImageNet-mean image).
    masks = jnp.moveaxis(resize(jnp.moveaxis(a, -1, 0), size), 0, -1)   # [H, W, C]
    lo = masks.min(axis=(0, 1))
    masks = (masks - lo) / (masks.max(axis=(0, 1)) - lo + 1e-8)
    channels = a.shape[-1]
    padded = -(-channels // batch_size) * batch_size
    masks = jnp.pad(masks, ((0, 0), (0, 0), (0, padded - channels)))
    masks = jnp.moveaxis(masks, -1, 0).reshape(padded // batch_size, batch_size, *size, 1)

    def chunk(m):
      out = model.apply(variables, image[None] * m, train=False)
      return jax.vmap(target_fn, in_axes=(0, None))(out, c)

    scores = jax.lax.map(chunk, masks).reshape(-1)[:channels]
    weights = jax.nn.softmax(scores)   # as pytorch-grad-cam: softmax over channels
    return (weights * a).sum(-1)

  return jax.lax.map(lambda args: one(*args), (images, acts, cls))


def scorecam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             batch_size: int = 32):
  """Score-CAM (Wang et al. 2020): gradient-free, one forward pass per channel.

  The channel weights are the softmax over channels of the target score of the
  input masked by each upsampled, min-max normalised activation channel. The
  masked inputs run in batches of `batch_size` (C / batch_size passes per image).
  Arguments as `gradcam`.
  """
  size = images.shape[-3:-1]
  (name,) = resolve_layers(model, layer)
  images_in = prepare_images(images, image_size)
  target_fn, cls = _resolve_targets(targets, images_in.shape[0])
  cam = _scorecam(model, _clean(variables), images_in, cls, layer=name, target_fn=target_fn,
                  batch_size=batch_size)
  return cam if raw else postprocess(cam, size)


# ----------------------------------------------------------------------------
# Pixel attributions, for comparison with the CAMs.


@functools.partial(jax.jit, static_argnames=('model', 'target_fn'))
def _input_grads(model, variables, images, cls, *, target_fn):
  """Per-image gradient of the target w.r.t. the input: `[B, H, W, 3]`, and classes."""

  logits, vjp_fn = jax.vjp(lambda x: model.apply(variables, x, train=False), images)
  cls = jax.vmap(_predicted)(logits, cls)
  (g,) = vjp_fn(jax.vmap(jax.grad(target_fn))(logits, cls))   # per image, as in the core
  return g, cls


def _pixel_out(maps, raw, size):
  return maps if raw else normalize(resize(maps, size))


def gradients(model, variables, images, *, layer=None, targets=None, raw=False,
              image_size=None):
  """Vanilla gradient saliency (Simonyan et al. 2014, Sec. 3.1): max_c |d score / d x|.

  `layer` is ignored (the attribution is at the input). Other arguments as `gradcam`.
  """
  del layer
  size = images.shape[-3:-1]
  x = prepare_images(images, image_size)
  target_fn, cls = _resolve_targets(targets, x.shape[0])
  g, _ = _input_grads(model, _clean(variables), x, cls, target_fn=target_fn)
  return _pixel_out(jnp.abs(g).max(-1), raw, size)


def smoothgrad(model, variables, images, *, layer=None, targets=None, raw=False,
               image_size=None, num_samples: int = 16, noise: float = 0.15, seed: int = 0):
  """SmoothGrad (Smilkov et al. 2017, eq. 3): gradients averaged over noisy copies.

  Noise is Gaussian with sigma = `noise` * (max - min) of each image (the
  paper's 10-20%). The target class is fixed from the clean image. Saliency is
  max_c |mean gradient|. Other arguments as `gradcam`.
  """
  del layer
  size = images.shape[-3:-1]
  x = prepare_images(images, image_size)
  target_fn, cls = _resolve_targets(targets, x.shape[0])
  variables = _clean(variables)
  _, cls = _input_grads(model, variables, x, cls, target_fn=target_fn)
  sigma = noise * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
  rng = jax.random.PRNGKey(seed)
  total = 0.0
  for i in range(num_samples):
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape) * sigma[:, None, None, None]
    total = total + _input_grads(model, variables, x + eps, cls, target_fn=target_fn)[0]
  return _pixel_out(jnp.abs(total / num_samples).max(-1), raw, size)


def integrated_gradients(model, variables, images, *, layer=None, targets=None, raw=False,
                         image_size=None, steps: int = 32, baseline=None):
  """Integrated Gradients (Sundararajan et al. 2017, eq. 3, midpoint Riemann sum).

  attr = (x - x') * mean_k grad(x' + (k + 1/2)/steps (x - x')); the map is
  sum_c |attr|. The baseline x' defaults to 0 (the ImageNet-mean image after
  normalisation). Other arguments as `gradcam`.
  """
  del layer
  size = images.shape[-3:-1]
  attr = integrated_gradients_attributions(model, variables, prepare_images(images, image_size),
                                           targets=targets, steps=steps, baseline=baseline)
  return _pixel_out(jnp.abs(attr).sum(-1), raw, size)


def integrated_gradients_attributions(model, variables, images, *, targets=None, steps=32,
                                      baseline=None):
  """Signed IG attributions `[B, H, W, 3]`; they sum to about score(x) - score(x') (eq. 1)."""
  x = prepare_images(images)
  x0 = jnp.zeros_like(x) if baseline is None else prepare_images(baseline, x.shape[1:3])
  target_fn, cls = _resolve_targets(targets, x.shape[0])
  variables = _clean(variables)
  _, cls = _input_grads(model, variables, x, cls, target_fn=target_fn)
  total = 0.0
  for k in range(steps):
    alpha = (k + 0.5) / steps
    total = total + _input_grads(model, variables, x0 + alpha * (x - x0), cls,
                                 target_fn=target_fn)[0]
  return (x - x0) * total / steps


METHODS: dict[str, Callable[..., Array]] = {
    'gradcam': gradcam,
    'gradcam++': gradcam_plusplus,
    'hirescam': hirescam,
    'xgradcam': xgradcam,
    'layercam': layercam,
    'scorecam': scorecam,
    'fusion': fusion,
    'gradients': gradients,
    'smoothgrad': smoothgrad,
    'integrated_gradients': integrated_gradients,
}

# The (acts, grads) -> map formulas, for the parity test and for callers with their own core.
CAM_MAPS: dict[str, Callable[[Array, Array], Array]] = {
    'gradcam': gradcam_map,
    'gradcam++': gradcam_plusplus_map,
    'hirescam': hirescam_map,
    'xgradcam': xgradcam_map,
    'layercam': layercam_map,
}


def get_method(name: str) -> Callable[..., Array]:
  """`METHODS[name]` with an error that lists the valid names."""
  if name not in METHODS:
    raise ValueError(f'Unknown CAM method {name!r}; valid: {", ".join(METHODS)}')
  return METHODS[name]

