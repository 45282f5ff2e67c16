"""FullGrad (Srinivas & Fleuret 2019, "Full-Gradient Representation for Neural Network
Visualization"): input-gradient x input plus every layer's bias-gradient x bias, from one
forward and one backward pass of any flax.linen model built from Conv, Dense and BatchNorm.

A ReLU network in inference mode is piecewise linear in its input and its biases, so
f(x) = grad_x f . x + sum_b grad_b f . b (the paper's eq. 2, "completeness"). The bias of a
layer is added at every output position, so the per-position terms grad_out * b are the
layer's bias-gradient map. Each biased layer's output gets a zero perturbation (through
`nn.intercept_methods`, as `taps` does), and the one `jax.vjp` w.r.t. the input and those
perturbations gives grad_x f and every grad_out. The maps are post-processed as
pytorch-grad-cam 1.5.7's `fullgrad_cam.py`: each channel |term|, min-max scaled, upsampled,
summed over channels and layers, and the sum min-max scaled (the paper's eq. 7, psi = abs,
upsample and rescale).

Differences from pytorch-grad-cam, on purpose: a Dense layer on a feature map (a 1x1
convolution) and ConvTranspose count, where the reference counts Conv2d and BatchNorm2d
only; a layer with a bias FullGrad cannot place (LayerNorm, GroupNorm) is an error, where the
reference leaves it out; the last min-max is `maps.normalize` (no eps).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx, traverse_util

from drjax.gradcam import core, maps, taps

Array = jax.Array

# Collections of the intercepted pass: each biased layer's zero perturbation of its output,
# and its (effective) bias, keyed by the layer's module path and `_KEY` in its own scope.
_DELTAS, _BIASES, _KEY = 'fullgrad_deltas', 'fullgrad_biases', 'output'
_EPS = 1e-7   # pytorch-grad-cam's scale_cam_image: (m - min) / (max - min + eps)

# The layers whose bias FullGrad knows. Conv (drjax.models.layers.conv is one), ConvTranspose
# and Dense add their bias along the last axis; BatchNorm on running statistics is affine
# with the implicit bias beta - mean * gamma / sqrt(var + eps).
_BIASED = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.BatchNorm)


def _layer_name(module: nn.Module) -> str:
  return '/'.join(module.path) or type(module).__name__


def _bias_of(module: nn.Module, args, kwargs) -> Array | None:
  """The layer's bias `[C]` as it adds to the output; None for a layer without one.

  Raises:
    ValueError: for a layer with a bias that FullGrad cannot place (LayerNorm, GroupNorm,
      DenseGeneral, ConvLocal, ...), or a BatchNorm on batch statistics.
  """
  params = module.variables.get('params', {})
  if isinstance(module, nn.BatchNorm):
    arg = kwargs.get('use_running_average', args[1] if len(args) > 1 else None)
    if not nn.merge_param('use_running_average', module.use_running_average, arg):
      raise ValueError(f'FullGrad: BatchNorm {_layer_name(module)!r} normalises with batch '
                       f'statistics; FullGrad needs inference mode (running statistics), '
                       f'e.g. apply_kwargs={{"train": False}}')
    if module.axis not in (-1, args[0].ndim - 1):
      raise ValueError(f'FullGrad: BatchNorm {_layer_name(module)!r} normalises axis '
                       f'{module.axis}; only the last (channel) axis is supported')
    stats = module.variables['batch_stats']
    mul = jax.lax.rsqrt(stats['var'] + module.epsilon)
    mul = mul * params['scale'] if module.use_scale else mul
    return (params['bias'] if module.use_bias else 0.0) - stats['mean'] * mul
  if isinstance(module, _BIASED):
    return params['bias'] if module.use_bias else None
  if 'bias' in params and not isinstance(params['bias'], Mapping):
    raise ValueError(
        f'FullGrad cannot use layer {_layer_name(module)!r} ({type(module).__name__}): it has '
        f'a bias, and FullGrad knows the biases of nn.Conv, nn.ConvTranspose, nn.Dense and '
        f'nn.BatchNorm (inference mode) only. A normalisation whose statistics come from its '
        f'input (LayerNorm, GroupNorm) has no fixed bias, so the full-gradient decomposition '
        f'(Srinivas & Fleuret 2019, eq. 2) does not hold for it')
  return None


def _perturb_biased(next_fun, args, kwargs, context):
  """A linen method interceptor: adds a zero perturbation to each biased layer's output and
  records the layer's bias."""
  if context.method_name != '__call__':
    return next_fun(*args, **kwargs)
  module = context.module
  # Before the call, so that a BatchNorm on batch statistics gets this error, not flax's
  # about its immutable running statistics.
  bias = _bias_of(module, args, kwargs)
  out = next_fun(*args, **kwargs)
  if bias is None:
    return out
  scope = module.scope
  if scope.is_mutable_collection(_DELTAS) and not scope.has_variable(_DELTAS, _KEY):
    scope.put_variable(_DELTAS, _KEY, jnp.zeros_like(out))
  if scope.has_variable(_DELTAS, _KEY):
    delta = scope.get_variable(_DELTAS, _KEY)
    if delta.shape != out.shape:
      raise ValueError(f'FullGrad: layer {_layer_name(module)!r} is called more than once '
                       f'with outputs of different shapes {delta.shape} and {out.shape}')
    out = out + delta
  if scope.is_mutable_collection(_BIASES):
    scope.put_variable(_BIASES, _KEY, bias)
  return out


def _forward(model, variables, images, deltas, apply_kwargs):
  """-> (logits, {layer path: bias}) with `deltas` (None: collected as zeros) added."""
  mutable = [_BIASES] if deltas is not None else [_BIASES, _DELTAS]
  variables = variables if deltas is None else {**variables, _DELTAS: deltas}
  with nn.intercept_methods(_perturb_biased):
    logits, state = model.apply(variables, images, mutable=mutable, **dict(apply_kwargs))
  return logits, state


def _flat(tree) -> dict[str, Any]:
  """{('a', 'b', _KEY): x} -> {'a/b': x}."""
  return {'/'.join(k[:-1]): v for k, v in traverse_util.flatten_dict(tree).items()}


def _check_linen(model) -> None:
  if isinstance(model, nnx.Module):
    raise ValueError(f'FullGrad supports flax.linen models; {type(model).__name__} is an nnx '
                     f'Module')


def _bias_shapes(model, variables, images, apply_kwargs) -> dict[str, Any]:
  """Each biased layer's output shape, from a trace of one forward pass (nothing computed)."""
  _, state = jax.eval_shape(lambda v, x: _forward(model, v, x, None, apply_kwargs), variables,
                            images)
  return state.get(_DELTAS, {})


def _spatial(name: str, shape) -> bool:
  """Whether a layer's term is a map `[B, h, w, C]`; a `[B, C]` one is spatially constant."""
  if len(shape) in (2, 4):
    return len(shape) == 4
  raise ValueError(f'FullGrad maps biased layers with outputs [B, h, w, C] (or skips [B, C] '
                   f'ones); layer {name!r} outputs shape {tuple(shape)}')


@functools.partial(jax.jit, static_argnames=('model', 'target_fn', 'apply_kwargs'))
def _terms(model, variables, images, cls, *, target_fn, apply_kwargs=()):
  """(grad_x * x `[B, H, W, C]`, {layer: grad_out * bias `[B, ..., C]`}, scores `[B]`)."""
  shapes = _bias_shapes(model, variables, images, apply_kwargs)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def forward(x, deltas):
    logits, state = _forward(model, variables, x, deltas, apply_kwargs)
    return logits, state.get(_BIASES, {})

  logits, vjp_fn, biases = jax.vjp(forward, images, zeros, has_aux=True)
  cls = jax.vmap(core.predicted)(logits, cls)
  # Per-image cotangents through the batched pass, as in the core (inference mode).
  scores, dscores = jax.vmap(jax.value_and_grad(target_fn))(logits, cls)
  grad_x, grad_out = vjp_fn(dscores)
  biases, grad_out = _flat(biases), _flat(grad_out)
  return images * grad_x, {n: grad_out[n] * biases[n] for n in grad_out}, scores


def fullgrad_terms(model, variables, images, *, targets=None, image_size=None,
                   apply_kwargs=None) -> dict[str, Any]:
  """The full-gradient decomposition (Srinivas & Fleuret 2019, eq. 2) of each target score.

  Args:
    model: a flax.linen Module built from nn.Conv, nn.ConvTranspose, nn.Dense and
      nn.BatchNorm (drjax's models, or any other); other layers with a bias raise.
    variables: its variables (`{'params', 'batch_stats'}`).
    images: `[B, H, W, C]` as the model takes them, or uint8 RGB (`prepare_images`).
    targets: None = predicted class; int array `[B]`; or callable `logits [K] -> scalar`.
    image_size: if set and different from the images', resize the images to it first.
    apply_kwargs: hashable keyword arguments of the forward pass, e.g. `{'train': False}`.

  Returns:
    dict(input=grad_x f * x `[B, H', W', C]`, biases={layer path: grad_out f * b
    `[B, ..., C]`} for every biased layer, scores=f `[B]`). For a piecewise-linear model
    (ReLU, max-pool, BatchNorm on running statistics) the input term and all bias terms sum
    to each image's score.
  """
  _check_linen(model)
  model, variables = taps.pure_model(model, variables)
  x, target_fn, cls = core.core_inputs(images, targets, image_size)
  inputs, biases, scores = _terms(model, variables, x, cls, target_fn=target_fn,
                                  apply_kwargs=taps.static_kwargs(apply_kwargs))
  return dict(input=inputs, biases=biases, scores=scores)


def fullgrad_layers(model, variables, images, *, apply_kwargs=None) -> tuple[str, ...]:
  """The biased layers whose maps FullGrad sums (those with `[B, h, w, C]` outputs), sorted by
  path; arguments as `fullgrad_terms` (only the images' shape is used)."""
  _check_linen(model)
  model, variables = taps.pure_model(model, variables)
  shapes = _bias_shapes(model, variables, jax.ShapeDtypeStruct(images.shape, jnp.float32),
                        taps.static_kwargs(apply_kwargs))
  return tuple(n for n, s in _flat(shapes).items() if _spatial(n, s.shape))


def _scale(terms: Array) -> Array:
  """|terms| `[B, h, w, C]`, each channel min-max scaled as pytorch-grad-cam's scale_cam_image."""
  m = jnp.abs(terms)
  m = m - m.min(axis=(1, 2), keepdims=True)
  return m / (m.max(axis=(1, 2), keepdims=True) + _EPS)


@functools.partial(jax.jit, static_argnames=('size',))
def fullgrad_map(inputs: Array, biases: dict[str, Array], size) -> Array:
  """FullGrad's saliency (Srinivas & Fleuret 2019, eq. 7) from `fullgrad_terms`, before min-max.

  As pytorch-grad-cam: the input term and every bias term are |.|, min-max scaled per
  image and channel, upsampled bilinearly to the input and summed over channels and layers.
  The upsampling runs after the channel sum: it is linear, so the sum is the same and only
  one map per layer is resized. Layers with `[B, C]` outputs are left out: their terms are
  constant over the image, and pytorch-grad-cam's scaling makes a constant map zero.

  Args:
    inputs: grad_x f * x `[B, H, W, C]`.
    biases: {layer: grad_out f * b `[B, h, w, C]` or `[B, C]`}.
    size: (H, W) of the maps.

  Returns:
    `[B, H, W]`, non-negative.
  """
  total = maps.resize(_scale(inputs).sum(-1), size)
  for name, terms in biases.items():
    if _spatial(name, terms.shape):
      total = total + maps.resize(_scale(terms).sum(-1), size)
  return total


def fullgrad(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None) -> Array:
  """FullGrad saliency maps (Srinivas & Fleuret 2019), as pytorch-grad-cam's FullGrad.

  One forward and one backward pass to the input, which also give every biased layer's
  output gradient (`fullgrad_terms`); then `fullgrad_map` and a per-image min-max. `layer`
  and `reshape` are ignored: FullGrad uses every biased layer (`fullgrad_layers`). linen
  models only; a layer with a bias FullGrad cannot place (LayerNorm, GroupNorm) raises a
  ValueError naming it. Other arguments as `gradcam`.

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (raw: the summed map before min-max).
  """
  del layer, reshape
  terms = fullgrad_terms(model, variables, images, targets=targets, image_size=image_size,
                         apply_kwargs=apply_kwargs)
  return _fullgrad_out(terms['input'], terms['biases'], size=tuple(images.shape[-3:-1]), raw=raw)


@functools.partial(jax.jit, static_argnames=('size', 'raw'))
def _fullgrad_out(inputs, biases, *, size, raw):
  """`fullgrad_map` at the model's resolution, resized to `size` and, unless raw, min-max."""
  total = maps.resize(fullgrad_map(inputs, biases, tuple(inputs.shape[1:3])), size)
  return total if raw else maps.normalize(total)
