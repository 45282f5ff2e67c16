"""The shared core: one forward pass with a zero perturbation at the chosen layers, and `jax.vjp`
with respect to that perturbation alone, giving each layer's activations and the target's
gradient w.r.t. them; plus the targets and the input checks every method uses."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drjax.gradcam import taps
from drjax.models import common

Array = jax.Array
Targets = None | Array | np.ndarray | Sequence[int] | int | Callable[[Array], Array]


# ----------------------------------------------------------------------------
# Targets: pure functions of one image's logits.


def class_score(logits: Array, cls: Array) -> Array:
  """The raw logit of class `cls` (pytorch-grad-cam's ClassifierOutputTarget)."""
  return logits[cls]


def referable_dr_target(logits: Array) -> Array:
  """Probability of referable DR: softmax mass of grades 2-4 (moderate or worse)."""
  return jax.nn.softmax(logits)[2:].sum()


def resolve_targets(targets: Targets, batch: int
                    ) -> tuple[Callable[[Array, Array], Array], Array]:
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


def predicted(logits: Array, cls: Array) -> Array:
  """`cls`, or the arg-max class where `cls` is -1."""
  return jnp.where(cls < 0, jnp.argmax(logits), cls)


# ----------------------------------------------------------------------------
# Input checks.


def prepare_images(images, image_size: int | Sequence[int] | None = None) -> Array:
  """Checks `[B, H, W, C]`, normalises uint8 RGB, and resizes to `image_size` if given.

  Args:
    images: float `[B, H, W, C]` as the model takes them, or uint8 RGB `[B, H, W, 3]`
      (ImageNet-normalised here, as drjax's models take them); a single `[H, W, C]`
      image is promoted to a batch of one.
    image_size: if set (int or (H, W)) and different from the images' size, the
      images are resized bilinearly to it before the forward pass. Heatmaps are
      still returned at the resolution of the images as passed in.

  Returns:
    float32 `[B, H', W', C]`.
  """
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[1] in (1, 3) and images.shape[-1] > 4:
    raise ValueError(f'images must be [B, H, W, C] (channels last); got shape '
                     f'{tuple(images.shape)}')
  if images.dtype == jnp.uint8 or images.dtype == np.uint8:
    if images.shape[-1] != 3:
      raise ValueError(f'uint8 images are ImageNet-normalised, which needs RGB [B, H, W, 3]; '
                       f'got shape {tuple(images.shape)}: pass float images normalised as '
                       f'your model expects')
    images = common.normalize(images)
  images = jnp.asarray(images, jnp.float32)
  if image_size is not None:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if tuple(images.shape[1:3]) != size:
      images = jax.image.resize(images, (images.shape[0], *size, images.shape[-1]), 'bilinear')
  return images


# ----------------------------------------------------------------------------
# The core.


@functools.partial(jax.jit, static_argnames=('model', 'layers', 'target_fn', 'apply_kwargs',
                                             'reshape'))
def acts_and_grads(model, variables, images, cls, *, layers, target_fn, apply_kwargs=(),
                   reshape=None):
  """The compiled core on checked inputs: (acts, grads, logits, scores, is_zero) per layer."""
  shapes = taps.layer_shapes(model, variables, images, layers, apply_kwargs, reshape)
  zeros = {n: jnp.zeros(shapes[n].shape, shapes[n].dtype) for n in layers}

  def forward(deltas):
    return taps.forward(model, variables, images, deltas, apply_kwargs=apply_kwargs)

  # Differentiate w.r.t. the perturbations of the chosen layers only: the trunk
  # below them is a constant of this vjp, so no backward pass is built for it.
  logits, vjp_fn, acts = jax.vjp(forward, zeros, has_aux=True)
  # Per-example targets, vmapped over the logits. In inference mode (BatchNorm on
  # running statistics) image i's logits depend on image i alone, so pulling the
  # per-example cotangents back through the batched forward pass gives each
  # image's own gradient, as `vmap` of a per-image `jax.grad` would (a test checks
  # it), from one batched forward and one vjp.
  cls = jax.vmap(predicted)(logits, cls)
  scores, dscores = jax.vmap(jax.value_and_grad(target_fn))(logits, cls)
  (grads,) = vjp_fn(dscores)
  acts, grads = taps.grid(acts, reshape), taps.grid(grads, reshape)
  is_zero = {n: jnp.all(grads[n] == 0, axis=(1, 2, 3)) for n in layers}
  return acts, grads, logits, scores, is_zero


def warn_zero_grads(is_zero: dict[str, Array]) -> None:
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
                          image_size: int | Sequence[int] | None = None,
                          apply_kwargs: dict[str, Any] | None = None,
                          reshape: Callable[[Array], Array] | None = None) -> dict[str, Any]:
  """The shared core: a layer's activations and the target's gradient w.r.t. them.

  Args:
    model: a flax.linen Module, or an nnx Module (then `variables=None`).
    variables: the linen model's variables (`params`, `batch_stats`, ...); None for nnx.
    images: `[B, H, W, C]` as the model takes them, or uint8 RGB (`prepare_images`).
    layer: a drjax stage name or a '/'-joined submodule path ('backbone/Block_1'), a
      sequence of them (all from one pass), or None for `model.default_cam_layer`.
      Stage names win over submodule paths of the same name; `layer_names` lists both.
    targets: None (predicted class), int array `[B]`, or callable on logits `[K]`.
    image_size: if set and different from the images', resize the images to it first.
    apply_kwargs: hashable keyword arguments of the forward pass (`model.apply` for
      linen, the module's call for nnx), e.g. `{'train': False}`.
    reshape: maps a layer's output to `[B, h, w, C]` (e.g. `vit_reshape(1)` for ViT
      tokens); applied to the activations and to their gradients alike. It is a static
      argument: reuse one callable (or `vit_reshape`'s, equal by value) to compile once.

  Returns:
    dict(acts={layer: [B, h, w, C]}, grads={layer: [B, h, w, C]}, logits=[B, K],
    scores=[B] (target values)).
  """
  model, variables, layers, apply_kwargs = model_inputs(model, variables, layer, apply_kwargs)
  images, target_fn, cls = core_inputs(images, targets, image_size)
  acts, grads, logits, scores, is_zero = acts_and_grads(
      model, variables, images, cls, layers=layers, target_fn=target_fn,
      apply_kwargs=apply_kwargs, reshape=reshape)
  warn_zero_grads(is_zero)
  return dict(acts=acts, grads=grads, logits=logits, scores=scores)


def model_inputs(model, variables, layer, apply_kwargs):
  """-> (model, variables, layers, apply_kwargs) as the compiled programs take them."""
  layers = taps.resolve_layers(model, layer)
  model, variables = taps.pure_model(model, variables)
  return model, variables, layers, taps.static_kwargs(apply_kwargs)


def core_inputs(images, targets, image_size=None):
  """-> (images checked, normalised and resized (`prepare_images`), target_fn, cls)."""
  images = prepare_images(images, image_size)
  target_fn, cls = resolve_targets(targets, images.shape[0])
  return images, target_fn, cls
