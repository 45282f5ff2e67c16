"""Grad-CAM and its family as pure JAX functions of (model, variables, images), for any Flax model.

One core, `activations_and_grads`, runs the model once with a zero perturbation
added to the chosen layer's output and returns that layer's activations and the
gradient of the target with respect to them, from `jax.vjp` on the perturbation
alone. Nothing is differentiated with respect to the parameters or the input, so
XLA never builds the backward pass of the trunk below the chosen layer: Grad-CAM
at DenseNet's denseblock4 costs about one forward pass (checked with XLA's cost
analysis in tests/test_gradcam.py). There are no hooks and no mutable state;
everything is jit-compatible; each image has its own target (vmapped over the logits).

A layer is named in one of three ways, the first that applies winning:
- a drjax model's stage name (`model.stage_names`: 'denseblock4', 'layer4'), reached
  through its taps (`drjax.models.common.tap`);
- for any flax.linen Module, a '/'-joined path of submodule names as in the variables
  tree ('backbone/Block_1'): that submodule's `__call__` is intercepted with
  `nn.intercept_methods` (matched by its scope path) to add the perturbation;
- for a flax.nnx Module (passed with `variables=None`), an attribute path ('stage2',
  'blocks/1'): the module is split outside, and inside the traced function a fresh
  copy is merged, put in eval mode, and the submodule at the path is replaced by a
  function that adds the perturbation. The module passed in is never mutated.
`layer_names` lists the valid names. Layers with token outputs `[B, N, C]` (ViT, Swin)
take a `reshape` to a `[B, h, w, C]` grid, such as `vit_reshape(num_prefix_tokens=1)`.

Each CAM method is a few lines that turn `(acts, grads)` into a map, citing its
paper; post-processing (ReLU, bilinear resize, per-image min-max) is separate
(`postprocess`). The formulas follow pytorch-grad-cam (jacobgil), which
tests/test_gradcam_parity.py runs beside drjax on converted torchvision weights.

Conventions: images are float32 `[B, H, W, 3]` ImageNet-normalised (uint8
images are normalised with `drjax.models.common.normalize`); maps are
channels-last `[B, h, w]`; targets are `None` (the predicted class), an int
array `[B]` (a class per image) or a callable `logits [K] -> scalar` applied to
each image's logits (e.g. `referable_dr_target`). The model must map each image
independently (inference mode: BatchNorm on running statistics, no dropout);
`apply_kwargs` (e.g. `{'train': False}`) are passed to `model.apply` (linen) or to
the module's call (nnx).

The computation follows its inputs' placement, as `jax.jit` does: images sharded on
the batch axis over several devices, with the variables replicated, split the batch
over them (`drjax.cam_study.compute_heatmaps` does so).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

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
  """A drjax model's tapped stages (`model.stage_names`); () for other models."""
  return tuple(getattr(model, 'stage_names', ()))


def resolve_layers(model, layer: str | Sequence[str] | None) -> tuple[str, ...]:
  """Layer name(s) as a tuple; None -> `model.default_cam_layer`.

  The names themselves are checked against the model when the core is traced (an
  unknown one is a ValueError listing `layer_names`).
  """
  if layer is None:
    layer = getattr(model, 'default_cam_layer', None)
    if layer is None:
      raise ValueError(
          f'layer=None needs {type(model).__name__}.default_cam_layer, which it does not '
          f'have: pass layer=, a "/"-joined submodule path such as "backbone/Block_1" '
          f'(gradcam.layer_names(model, variables, images) lists them)')
  return (layer,) if isinstance(layer, str) else tuple(layer)


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


def _pure_model(model, variables) -> tuple[Any, Any]:
  """-> (a hashable model, its variables): an nnx Module becomes (GraphDef, State)."""
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError(f'{type(model).__name__} is an nnx Module, which holds its own '
                       f'variables: pass variables=None')
    return nnx.split(model)
  if variables is None:
    raise ValueError(f'variables=None is for nnx Modules; {type(model).__name__} needs its '
                     f'variables (e.g. {{"params": ...}})')
  return model, _clean(variables)


def _static_kwargs(apply_kwargs: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  """`apply_kwargs` as sorted items: static (hashed) arguments of the compiled programs."""
  items = tuple(sorted((apply_kwargs or {}).items()))
  try:
    hash(items)
  except TypeError as e:
    raise TypeError(f'apply_kwargs must hold hashable flags such as train=False (they are '
                    f'compiled in); got {apply_kwargs!r}') from e
  return items


# ----------------------------------------------------------------------------
# Layers: any model's forward pass with a zero perturbation at the chosen layers.

# The collection, and the name in it, where intercepted submodules leave their outputs: sown
# rather than kept in a Python dict, so that flax carries them out of lifted transforms
# (nn.remat), and apart from the model's own 'intermediates'. `sow` reserves the name in the
# submodule's scope, so it must not be one that a child could have.
_SOWN, _SOWN_KEY = 'gradcam_outputs', '__call__'


def _forward(model, variables, images, deltas: dict[str, Array | None], *, apply_kwargs):
  """Runs the model with `deltas[name]` added to layer `name`'s output (None: only captured).

  Returns:
    (logits `[B, K]`, {name: that layer's output, perturbation included}); a name that
    the forward pass never reached is absent.
  """
  if isinstance(model, nnx.GraphDef):
    return _nnx_forward(model, variables, images, deltas, dict(apply_kwargs))
  return _linen_forward(model, variables, images, deltas, dict(apply_kwargs))


def _linen_forward(model, variables, images, deltas, kwargs):
  # drjax stage names win over submodule paths (ResNet's 'layer4' is both, the same tensor).
  taps = {n: d for n, d in deltas.items() if n in stage_names(model)}
  paths = {tuple(n.split('/')): d for n, d in deltas.items() if n not in taps}
  variables = {**variables, 'perturbations': {n: d for n, d in taps.items() if d is not None}}
  mutable = [_SOWN] + (['intermediates'] if taps else [])
  with nn.intercept_methods(functools.partial(_perturb_call, paths)):
    logits, state = model.apply(variables, images, mutable=mutable, **kwargs)
  acts = {n: state['intermediates'][n][0] for n in taps}
  for path in paths:
    sown = functools.reduce(lambda tree, k: tree.get(k, {}), path, state.get(_SOWN, {}))
    if _SOWN_KEY in sown:
      acts['/'.join(path)] = _single_call('/'.join(path), sown[_SOWN_KEY])
  return logits, acts


def _perturb_call(paths, next_fun, args, kwargs, context):
  """A linen method interceptor: adds the delta to the chosen submodules' `__call__` output."""
  out = next_fun(*args, **kwargs)
  path = tuple(context.module.path) if context.method_name == '__call__' else None
  if path in paths:
    out = out if paths[path] is None else out + paths[path]
    context.module.sow(_SOWN, _SOWN_KEY, out)
  return out


def _single_call(name: str, outputs: tuple):
  if len(outputs) > 1:
    raise ValueError(f'Layer {name!r} is called {len(outputs)} times in one forward pass; '
                     f'Grad-CAM needs a single output: choose a submodule that runs once')
  return outputs[0]


def _nnx_forward(graphdef, state, images, deltas, kwargs):
  module = nnx.merge(graphdef, state)
  # A fresh copy, so that this changes nothing outside: BatchNorm on running statistics and
  # no dropout make each image's map its own.
  module.eval()
  captured = {}
  for name, delta in deltas.items():
    *parents, last = name.split('/')
    parent = functools.reduce(_child, parents, module)
    child = _child(parent, last)
    if isinstance(child, nnx.Module):   # unknown paths are reported by the caller
      _set_child(parent, last, functools.partial(_call_perturbed, child, name, delta, captured))
  logits = module(images, **kwargs)
  return logits, {n: _single_call(n, tuple(outs)) for n, outs in captured.items()}


def _call_perturbed(child, name, delta, captured, *args, **kwargs):
  out = child(*args, **kwargs)
  out = out if delta is None else out + delta
  captured.setdefault(name, []).append(out)
  return out


def _child(node, key: str):
  """`node`'s attribute `key`, or item `int(key)` of an nnx.List; None if there is none."""
  if isinstance(node, (nnx.List, list)):
    return node[int(key)] if key.isdigit() and int(key) < len(node) else None
  return getattr(node, key, None)


def _set_child(node, key: str, value) -> None:
  if isinstance(node, (nnx.List, list)):
    node[int(key)] = value
  else:
    setattr(node, key, value)


def layer_names(model, variables, images, *, apply_kwargs: dict[str, Any] | None = None
                ) -> tuple[str, ...]:
  """Every name that `layer` accepts: the stage names, then the submodule paths.

  Args:
    model: a flax.linen Module (with its `variables`) or an nnx Module (`variables=None`).
    variables: the linen model's variables; None for an nnx Module.
    images: `[B, H, W, 3]` (only the shape is used: a linen model's submodules are
      found by tracing one forward pass, without computing it).
    apply_kwargs: keyword arguments of the forward pass, e.g. `{'train': False}`.

  Returns:
    drjax stage names (`model.stage_names`), then '/'-joined submodule paths, in call
    order for linen and in `nnx.iter_modules` order for nnx.
  """
  names = stage_names(model)
  model, variables = _pure_model(model, variables)
  return names + _submodule_paths(model, variables, images, _static_kwargs(apply_kwargs))


def _submodule_paths(model, variables, images, apply_kwargs) -> tuple[str, ...]:
  if isinstance(model, nnx.GraphDef):
    modules = nnx.iter_modules(nnx.merge(model, variables))
    return tuple('/'.join(map(str, path)) for path, _ in modules if path)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.path:
      seen.setdefault('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, **dict(apply_kwargs)), variables,
                   jax.ShapeDtypeStruct(images.shape, images.dtype))
  return tuple(seen)


def _layer_shapes(model, variables, images, layers, apply_kwargs, reshape) -> dict[str, Any]:
  """Each layer's output shape, from a trace of one forward pass, checked for the CAMs."""
  shapes = jax.eval_shape(
      lambda v, x: _forward(model, v, x, dict.fromkeys(layers), apply_kwargs=apply_kwargs)[1],
      variables, images)
  for name in layers:
    if name not in shapes:
      _raise_unreached(name, model, variables, images, apply_kwargs)
    _check_grid(name, shapes[name], reshape)
  return shapes


def _raise_unreached(name, model, variables, images, apply_kwargs):
  """The error for a layer whose output the forward pass did not give: why, and what is valid."""
  model_name = type(nnx.merge(model, variables) if isinstance(model, nnx.GraphDef)
                    else model).__name__
  valid = _submodule_paths(model, variables, images, apply_kwargs)
  if name in valid:
    raise ValueError(f'Layer {name!r} of {model_name} is a submodule whose output cannot be '
                     f'reached: it is not called in the forward pass, or it runs inside a '
                     f'transform that does not carry it out (nn.scan, nn.vmap); choose a '
                     f'layer outside it')
  stages = (f'stage names (model.stage_names): {", ".join(stage_names(model))}; '
            if stage_names(model) else '')
  raise ValueError(f'Unknown layer {name!r} for {model_name}: neither a stage name nor a '
                   f'submodule called in its forward pass; valid layers: {stages}'
                   f'submodule paths: {", ".join(valid)}')


def _check_grid(name: str, out, reshape) -> None:
  """Raises unless the layer's output, reshaped if asked, is one `[B, h, w, C]` array."""
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise ValueError(f'Layer {name!r} returns {jax.tree.map(lambda s: s.shape, out)}, not one '
                     f'array; choose a submodule that returns its activations alone')
  grid = out if reshape is None else jax.eval_shape(reshape, out)
  if getattr(grid, 'ndim', 0) == 4 and grid.shape[0] == out.shape[0]:
    return
  if reshape is None:
    raise ValueError(f'Layer {name!r} outputs shape {tuple(out.shape)}; the CAM methods need '
                     f'[B, h, w, C]: pass reshape=, e.g. reshape=gradcam.vit_reshape('
                     f'num_prefix_tokens=1) for ViT tokens [B, 1 + h*w, C]')
  raise ValueError(f'reshape turned layer {name!r} output {tuple(out.shape)} into '
                   f'{getattr(grid, "shape", grid)}; it must return [B, h, w, C]')


def reshape_tokens(tokens: Array, num_prefix_tokens: int = 1) -> Array:
  """Transformer tokens `[B, P + h*w, C]` -> a square grid `[B, h, w, C]`, prefix dropped.

  As pytorch-grad-cam's `reshape_transform` for ViT (P = 1, the class token) and Swin
  (P = 0); the patch tokens are taken in row-major order.
  """
  if tokens.ndim != 3:
    raise ValueError(f'reshape_tokens expects tokens [B, N, C]; got shape {tokens.shape}')
  batch, n, channels = tokens.shape
  side = math.isqrt(n - num_prefix_tokens)
  if side * side != n - num_prefix_tokens:
    raise ValueError(f'{n} tokens less {num_prefix_tokens} prefix token(s) do not form a '
                     f'square grid; pass your own reshape for this layer')
  return tokens[:, num_prefix_tokens:].reshape(batch, side, side, channels)


@dataclasses.dataclass(frozen=True)
class _TokenGrid:
  """`reshape_tokens` with a fixed prefix; hashable by value, so that it compiles once."""
  num_prefix_tokens: int

  def __call__(self, tokens: Array) -> Array:
    return reshape_tokens(tokens, self.num_prefix_tokens)


def vit_reshape(num_prefix_tokens: int = 1) -> Callable[[Array], Array]:
  """A `reshape` for ViT-style layers: `[B, P + h*w, C]` -> `[B, h, w, C]` (`reshape_tokens`).

  Args:
    num_prefix_tokens: tokens before the patches (1: the class token; 0 for Swin).
  """
  return _TokenGrid(num_prefix_tokens)


def _grid(tree: dict[str, Array], reshape) -> dict[str, Array]:
  return tree if reshape is None else {n: reshape(x) for n, x in tree.items()}


# ----------------------------------------------------------------------------
# The core.


@functools.partial(jax.jit, static_argnames=('model', 'layers', 'target_fn', 'apply_kwargs',
                                             'reshape'))
def _acts_and_grads(model, variables, images, cls, *, layers, target_fn, apply_kwargs=(),
                    reshape=None):
  shapes = _layer_shapes(model, variables, images, layers, apply_kwargs, reshape)
  zeros = {n: jnp.zeros(shapes[n].shape, shapes[n].dtype) for n in layers}

  def forward(deltas):
    return _forward(model, variables, images, deltas, apply_kwargs=apply_kwargs)

  # Differentiate w.r.t. the perturbations of the chosen layers only: the trunk
  # below them is a constant of this vjp, so no backward pass is built for it.
  logits, vjp_fn, acts = jax.vjp(forward, zeros, has_aux=True)
  # Per-example targets, vmapped over the logits. In inference mode (BatchNorm on
  # running statistics) image i's logits depend on image i alone, so pulling the
  # per-example cotangents back through the batched forward pass gives each
  # image's own gradient, as `vmap` of a per-image `jax.grad` would (a test checks
  # it), from one batched forward and one vjp.
  cls = jax.vmap(_predicted)(logits, cls)
  scores, dscores = jax.vmap(jax.value_and_grad(target_fn))(logits, cls)
  (grads,) = vjp_fn(dscores)
  acts, grads = _grid(acts, reshape), _grid(grads, reshape)
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
                          image_size: int | Sequence[int] | None = None,
                          apply_kwargs: dict[str, Any] | None = None,
                          reshape: Callable[[Array], Array] | None = None) -> dict[str, Any]:
  """The shared core: a layer's activations and the target's gradient w.r.t. them.

  Args:
    model: a flax.linen Module, or an nnx Module (then `variables=None`).
    variables: the linen model's variables (`params`, `batch_stats`, ...); None for nnx.
    images: `[B, H, W, 3]`, uint8 or float32 ImageNet-normalised.
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
  model, variables, layers, apply_kwargs = _model_inputs(model, variables, layer, apply_kwargs)
  images, target_fn, cls = _core_inputs(images, targets, image_size)
  acts, grads, logits, scores, is_zero = _acts_and_grads(
      model, variables, images, cls, layers=layers, target_fn=target_fn,
      apply_kwargs=apply_kwargs, reshape=reshape)
  _warn_zero_grads(is_zero)
  return dict(acts=acts, grads=grads, logits=logits, scores=scores)


def _model_inputs(model, variables, layer, apply_kwargs):
  """-> (model, variables, layers, apply_kwargs) as the compiled programs take them."""
  layers = resolve_layers(model, layer)
  model, variables = _pure_model(model, variables)
  return model, variables, layers, _static_kwargs(apply_kwargs)


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


def _gradient_cam(map_fn, model, variables, images, layer, targets, raw, image_size,
                  apply_kwargs, reshape):
  size = tuple(images.shape[-3:-1])
  model, variables, layers, apply_kwargs = _model_inputs(model, variables, layer, apply_kwargs)
  (name,) = layers
  images, target_fn, cls = _core_inputs(images, targets, image_size)
  # The core program is shared by every method at this layer (one compile), the map and its
  # post-processing are one small program, and the warning reads its flag last, so that
  # nothing waits for the core before the map is dispatched.
  acts, grads, _, _, is_zero = _acts_and_grads(model, variables, images, cls, layers=layers,
                                               target_fn=target_fn, apply_kwargs=apply_kwargs,
                                               reshape=reshape)
  cam = _map_program(map_fn, acts[name], grads[name], size=None if raw else size)
  _warn_zero_grads(is_zero)
  return cam


@functools.partial(jax.jit, static_argnames=('map_fn', 'size'))
def _map_program(map_fn, acts, grads, *, size):
  """A method's map and, unless `size` is None (raw), its post-processing, jitted."""
  cam = map_fn(acts, grads)
  return cam if size is None else postprocess(cam, size)


def gradcam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
            apply_kwargs=None, reshape=None):
  """Grad-CAM heatmaps (Selvaraju et al. 2017).

  Args:
    model: a flax.linen Module (a drjax model or any other), or an nnx Module.
    variables: the linen model's variables (`{'params', 'batch_stats'}`); None for nnx.
    images: `[B, H, W, 3]`, uint8 or float32 ImageNet-normalised.
    layer: a drjax stage name or a '/'-joined submodule path ('backbone/Block_1');
      None -> `model.default_cam_layer` (DenseNet: 'denseblock4', the paper's choice).
      Unknown names raise a ValueError listing the valid ones (`layer_names`).
    targets: None = predicted class; int array `[B]` = class per image; callable
      `logits [K] -> scalar` = custom target (e.g. `referable_dr_target`).
    raw: return the unprocessed map at layer resolution `[B, h, w]` (no ReLU).
    image_size: if set and different from the images', resize the images to it
      before the forward pass (heatmaps still come back at the input resolution).
    apply_kwargs: hashable keyword arguments of the forward pass, e.g.
      `{'train': False}` (passed to `model.apply`, or to the nnx module's call).
    reshape: maps the layer's output to `[B, h, w, C]`, e.g. `vit_reshape(1)` for ViT
      tokens `[B, 1 + h*w, C]`; needed for any output that is not 4-D.

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (or the raw `[B, h, w]` map).
  """
  return _gradient_cam(gradcam_map, model, variables, images, layer, targets, raw, image_size,
                       apply_kwargs, reshape)


def gradcam_plusplus(model, variables, images, *, layer=None, targets=None, raw=False,
                     image_size=None, apply_kwargs=None, reshape=None):
  """Grad-CAM++ (Chattopadhay et al. 2018); arguments as `gradcam`."""
  return _gradient_cam(gradcam_plusplus_map, model, variables, images, layer, targets, raw,
                       image_size, apply_kwargs, reshape)


def hirescam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None):
  """HiResCAM (Draelos & Carin 2020); arguments as `gradcam`."""
  return _gradient_cam(hirescam_map, model, variables, images, layer, targets, raw, image_size,
                       apply_kwargs, reshape)


def xgradcam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None):
  """XGrad-CAM (Fu et al. 2020); arguments as `gradcam`."""
  return _gradient_cam(xgradcam_map, model, variables, images, layer, targets, raw, image_size,
                       apply_kwargs, reshape)


def layercam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None):
  """LayerCAM (Jiang et al. 2021); arguments as `gradcam`."""
  return _gradient_cam(layercam_map, model, variables, images, layer, targets, raw, image_size,
                       apply_kwargs, reshape)


def default_fusion_layers(model) -> tuple[str, ...]:
  """`FUSION_LAYERS[model.default_cam_layer]`, keeping the stages the model has."""
  (default,) = resolve_layers(model, None)
  names = stage_names(model)
  return tuple(n for n in FUSION_LAYERS.get(default, ()) if n in names) or (default,)


def fusion(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
           apply_kwargs=None, reshape=None, gamma: float = 2.0):
  """Multi-layer LayerCAM fusion (Jiang et al. 2021, Sec. III-C, eq. 7).

  LayerCAM maps of several layers, all from one forward/backward pass, are
  ReLU'd, resized to the input, scaled with tanh(gamma * M / max M) (so that the
  weak shallow-layer maps count) and fused by element-wise maximum.

  Args:
    layer: a sequence of layer names; None -> `FUSION_LAYERS[model.default_cam_layer]`.
    gamma: the tanh scaling factor (the paper's 2).
    Others as `gradcam` (`reshape` applies to every layer); `raw=True` returns the fused
    map before min-max, at the input resolution.
  """
  size = images.shape[-3:-1]
  if layer is None:
    layer = default_fusion_layers(model)
  out = activations_and_grads(model, variables, images, layer=layer, targets=targets,
                              image_size=image_size, apply_kwargs=apply_kwargs, reshape=reshape)
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


@functools.partial(jax.jit, static_argnames=('model', 'layer', 'target_fn', 'batch_size',
                                             'apply_kwargs', 'reshape'))
def _scorecam(model, variables, images, cls, *, layer, target_fn, batch_size, apply_kwargs=(),
              reshape=None):
  _layer_shapes(model, variables, images, (layer,), apply_kwargs, reshape)
  forward = functools.partial(_forward, model, variables, apply_kwargs=apply_kwargs)
  logits, acts = forward(images, {layer: None})
  acts = _grid(acts, reshape)[layer]
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
      out = forward(image[None] * m, {})[0]
      return jax.vmap(target_fn, in_axes=(0, None))(out, c)

    scores = jax.lax.map(chunk, masks).reshape(-1)[:channels]
    weights = jax.nn.softmax(scores)   # as pytorch-grad-cam: softmax over channels
    return (weights * a).sum(-1)

  return jax.lax.map(lambda args: one(*args), (images, acts, cls))


def scorecam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None, batch_size: int = 32):
  """Score-CAM (Wang et al. 2020): gradient-free, one forward pass per channel.

  The channel weights are the softmax over channels of the target score of the
  input masked by each upsampled, min-max normalised activation channel. The
  masked inputs run in batches of `batch_size` (C / batch_size passes per image).
  Arguments as `gradcam`.
  """
  size = images.shape[-3:-1]
  model, variables, (name,), apply_kwargs = _model_inputs(model, variables, layer, apply_kwargs)
  images_in, target_fn, cls = _core_inputs(images, targets, image_size)
  cam = _scorecam(model, variables, images_in, cls, layer=name, target_fn=target_fn,
                  batch_size=batch_size, apply_kwargs=apply_kwargs, reshape=reshape)
  return cam if raw else postprocess(cam, size)


# ----------------------------------------------------------------------------
# Pixel attributions, for comparison with the CAMs. They ignore `layer` and `reshape`.


@functools.partial(jax.jit, static_argnames=('model', 'target_fn', 'apply_kwargs'))
def _input_grads(model, variables, images, cls, *, target_fn, apply_kwargs=()):
  """Per-image gradient of the target w.r.t. the input: `[B, H, W, 3]`, and classes."""

  def logits_fn(x):
    return _forward(model, variables, x, {}, apply_kwargs=apply_kwargs)[0]

  logits, vjp_fn = jax.vjp(logits_fn, images)
  cls = jax.vmap(_predicted)(logits, cls)
  (g,) = vjp_fn(jax.vmap(jax.grad(target_fn))(logits, cls))   # per image, as in the core
  return g, cls


def _pixel_inputs(model, variables, images, targets, image_size, apply_kwargs):
  """-> (model, variables, images, target_fn, cls, apply_kwargs) for `_input_grads`."""
  model, variables = _pure_model(model, variables)
  images, target_fn, cls = _core_inputs(images, targets, image_size)
  return model, variables, images, target_fn, cls, _static_kwargs(apply_kwargs)


def _pixel_out(maps, raw, size):
  return maps if raw else normalize(resize(maps, size))


def gradients(model, variables, images, *, layer=None, targets=None, raw=False,
              image_size=None, apply_kwargs=None, reshape=None):
  """Vanilla gradient saliency (Simonyan et al. 2014, Sec. 3.1): max_c |d score / d x|.

  `layer` and `reshape` are ignored (the attribution is at the input). Other arguments
  as `gradcam`.
  """
  del layer, reshape
  size = images.shape[-3:-1]
  model, variables, x, target_fn, cls, kwargs = _pixel_inputs(model, variables, images, targets,
                                                              image_size, apply_kwargs)
  g, _ = _input_grads(model, variables, x, cls, target_fn=target_fn, apply_kwargs=kwargs)
  return _pixel_out(jnp.abs(g).max(-1), raw, size)


def smoothgrad(model, variables, images, *, layer=None, targets=None, raw=False,
               image_size=None, apply_kwargs=None, reshape=None, num_samples: int = 16,
               noise: float = 0.15, seed: int = 0):
  """SmoothGrad (Smilkov et al. 2017, eq. 3): gradients averaged over noisy copies.

  Noise is Gaussian with sigma = `noise` * (max - min) of each image (the
  paper's 10-20%). The target class is fixed from the clean image. Saliency is
  max_c |mean gradient|. Other arguments as `gradients`.
  """
  del layer, reshape
  size = images.shape[-3:-1]
  model, variables, x, target_fn, cls, kwargs = _pixel_inputs(model, variables, images, targets,
                                                              image_size, apply_kwargs)
  grads_fn = functools.partial(_input_grads, model, variables, target_fn=target_fn,
                               apply_kwargs=kwargs)
  _, cls = grads_fn(x, cls)
  sigma = noise * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))
  rng = jax.random.PRNGKey(seed)
  total = 0.0
  for i in range(num_samples):
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape) * sigma[:, None, None, None]
    total = total + grads_fn(x + eps, cls)[0]
  return _pixel_out(jnp.abs(total / num_samples).max(-1), raw, size)


def integrated_gradients(model, variables, images, *, layer=None, targets=None, raw=False,
                         image_size=None, apply_kwargs=None, reshape=None, steps: int = 32,
                         baseline=None):
  """Integrated Gradients (Sundararajan et al. 2017, eq. 3, midpoint Riemann sum).

  attr = (x - x') * mean_k grad(x' + (k + 1/2)/steps (x - x')); the map is
  sum_c |attr|. The baseline x' defaults to 0 (the ImageNet-mean image after
  normalisation). Other arguments as `gradients`.
  """
  del layer, reshape
  size = images.shape[-3:-1]
  attr = integrated_gradients_attributions(model, variables, prepare_images(images, image_size),
                                           targets=targets, steps=steps, baseline=baseline,
                                           apply_kwargs=apply_kwargs)
  return _pixel_out(jnp.abs(attr).sum(-1), raw, size)


def integrated_gradients_attributions(model, variables, images, *, targets=None, steps=32,
                                      baseline=None, apply_kwargs=None):
  """Signed IG attributions `[B, H, W, 3]`; they sum to about score(x) - score(x') (eq. 1)."""
  model, variables, x, target_fn, cls, kwargs = _pixel_inputs(model, variables, images, targets,
                                                              None, apply_kwargs)
  x0 = jnp.zeros_like(x) if baseline is None else prepare_images(baseline, x.shape[1:3])
  grads_fn = functools.partial(_input_grads, model, variables, target_fn=target_fn,
                               apply_kwargs=kwargs)
  _, cls = grads_fn(x, cls)
  total = 0.0
  for k in range(steps):
    alpha = (k + 0.5) / steps
    total = total + grads_fn(x0 + alpha * (x - x0), cls)[0]
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

