"""Guided backpropagation and Guided Grad-CAM, with the guided ReLU rule applied as a transform of
the traced computation (`guided_relus`), so that any linen or nnx model works unchanged.

Guided backpropagation (Springenberg et al. 2015, "Striving for Simplicity", Sec. 3.4 and
Fig. 1) is the input gradient computed with one change: at every ReLU the backward pass
passes the incoming gradient only where both the ReLU's input and that gradient are
positive. Guided Grad-CAM (Selvaraju et al. 2017, Sec. 3.1) multiplies it, per pixel, by the
upsampled Grad-CAM map. The conventions follow pytorch-grad-cam 1.5.7 (`guided_backprop.py`,
`cam.py`'s `cam_mask * gb`, `deprocess_image`); drjax's maps reduce the channels as
`gradients` does (max_c |g|), and the signed `[B, H, W, C]` values come from the
`*_attributions` functions.

Differences from pytorch-grad-cam, on purpose: every ReLU of the computation is guided,
functional ones included (the reference swaps `nn.ReLU` modules only, so torchvision
DenseNet's final `F.relu` stays ordinary there); the whole batch runs in one pass with a
target per image (the reference takes one image at a time).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from drjax.gradcam import core, maps, methods, taps

Array = jax.Array


# ----------------------------------------------------------------------------
# The guided ReLU and the transform that puts it in place of every ReLU.


@jax.custom_vjp
def guided_relu(x: Array) -> Array:
  """max(x, 0), whose VJP is the guided rule (Springenberg et al. 2015, eq. in Fig. 1c)."""
  return jnp.maximum(x, 0)


def _guided_relu_fwd(x):
  return jnp.maximum(x, 0), x


def _guided_relu_bwd(x, g):
  # Only positive gradients through positive inputs: the ReLU's own mask times the
  # "deconvnet" mask of the gradient's sign, as pytorch-grad-cam's GuidedBackpropReLU.
  return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)

# Call-like primitives whose body is evaluated in place (the transform needs their inner ReLUs;
# the whole computation is compiled as one program anyway). A custom_jvp/custom_vjp call that
# holds a ReLU loses its custom derivative rule and is differentiated through its primal body.
_INLINE = frozenset({'jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call',
                     'custom_vjp_call', 'custom_vjp_call_jaxpr', 'remat', 'remat2',
                     'checkpoint'})
_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (jax, flax))


def guided_relus(fn: Callable[..., Any], *, name: str | None = None) -> Callable[..., Any]:
  """`fn` with the same values, whose VJP uses the guided rule at every ReLU.

  `fn` is traced to a jaxpr and re-evaluated with each ReLU replaced by `guided_relu`;
  nothing in the model is edited. A ReLU is `jax.nn.relu` (flax's `nn.relu` and `nnx.relu`
  are the same function), or a `max(x, 0)` written in the model's own code; the
  `max(0, var)` clamps inside jax and flax (their normalisation layers' variances) are not
  ReLUs. ReLUs inside nested jits, `jax.checkpoint` (`nn.remat`), custom derivative rules,
  `scan` and `cond` bodies are replaced too.

  Args:
    fn: a function of arrays (pytrees), traceable by JAX.
    name: what the warning names if `fn` has no ReLU (default: `fn.__name__`).

  Returns:
    A function of the same arguments and outputs. When traced it warns (RuntimeWarning) if
    `fn` has no ReLU: its VJP is then the plain one.
  """
  label = name or getattr(fn, '__name__', repr(fn))

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    count = [0]
    out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), count)
    if not count[0]:
      warnings.warn(f'Guided backprop: {label} has no ReLU (jax.nn.relu, nn.relu, nnx.relu '
                    f'or max(x, 0) in the model code), so its guided gradients are the plain '
                    f'gradients', RuntimeWarning, stacklevel=2)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def _eval(jaxpr: jex.Jaxpr, consts, args, count: list[int]) -> list[Any]:
  """`jax.core.eval_jaxpr` with each ReLU replaced by `guided_relu` (counted in `count`)."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts, strict=True):
    env[v] = x
  for v, x in zip(jaxpr.invars, args, strict=True):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    relu_arg = _relu_input(eqn)
    if relu_arg is not None:
      count[0] += 1
      outs = [guided_relu(invals[relu_arg])]
    elif not any(_has_relu(j) for j in jex.jaxprs_in_params(eqn.params)):
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    elif eqn.primitive.name in _INLINE:
      (body,) = [p for p in eqn.params.values() if isinstance(p, (jex.ClosedJaxpr, jex.Jaxpr))]
      if isinstance(body, jex.ClosedJaxpr):
        outs = _eval(body.jaxpr, body.consts, invals, count)
      else:
        outs = _eval(body, (), invals, count)
    else:   # scan, cond, while: the same primitive on guided bodies
      params = {k: _guided_param(p, count) for k, p in eqn.params.items()}
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    for v, x in zip(eqn.outvars, outs, strict=True):
      if not isinstance(v, jex.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _guided_param(param, count):
  """A closed jaxpr (or a tuple of them) of a higher-order primitive, re-traced as guided."""
  if isinstance(param, tuple):
    return tuple(_guided_param(p, count) for p in param)
  if not isinstance(param, jex.ClosedJaxpr) or not _has_relu(param.jaxpr):
    return param
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
           for v in param.jaxpr.invars]
  return jax.make_jaxpr(lambda *a: _eval(param.jaxpr, param.consts, a, count))(*avals)


def _relu_input(eqn) -> int | None:
  """Index of the ReLU'd operand if `eqn` is a ReLU, else None."""
  name = eqn.primitive.name
  if name == 'custom_jvp_call' and _is_relu_body(eqn.params['call_jaxpr'].jaxpr):
    return 0
  if name == 'max' and _model_code(eqn):
    return _zero_max_operand(eqn)
  return None


def _zero_max_operand(eqn) -> int | None:
  """For `max(a, b)` with exactly one literal-zero operand, the index of the other one."""
  zero = [isinstance(v, jex.Literal) and np.all(np.asarray(v.val) == 0) for v in eqn.invars]
  if len(zero) != 2 or zero[0] == zero[1]:
    return None
  operand = eqn.invars[zero.index(False)]
  return zero.index(False) if operand.aval.shape == eqn.outvars[0].aval.shape else None


def _is_relu_body(jaxpr) -> bool:
  """Whether a custom_jvp function's body is `max(x, 0)` (`jax.nn.relu`), maybe in a jit."""
  if len(jaxpr.eqns) != 1 or len(jaxpr.invars) != 1:
    return False
  eqn = jaxpr.eqns[0]
  if eqn.primitive.name in ('jit', 'pjit'):
    return list(eqn.invars) == list(jaxpr.invars) and _is_relu_body(eqn.params['jaxpr'].jaxpr)
  return (eqn.primitive.name == 'max' and _zero_max_operand(eqn) is not None
          and eqn.invars[_zero_max_operand(eqn)] is jaxpr.invars[0])


def _model_code(eqn) -> bool:
  """Whether a `max` was written outside jax and flax (not a library's variance clamp)."""
  traceback = eqn.source_info.traceback
  if traceback is None:
    return True
  for frame in traceback.frames:
    if not frame.file_name.startswith(_LIBRARY_DIRS[0]):
      return not frame.file_name.startswith(_LIBRARY_DIRS[1])
  return True


def _has_relu(jaxpr) -> bool:
  return any(_relu_input(e) is not None or any(_has_relu(j) for j in jex.jaxprs_in_params(e.params))
             for e in jaxpr.eqns)


# ----------------------------------------------------------------------------
# The compiled programs.


@functools.partial(jax.jit, static_argnames=('model', 'target_fn', 'apply_kwargs', 'name'))
def _guided_grads(model, variables, images, cls, *, target_fn, apply_kwargs=(), name='model'):
  """Per-image guided gradient of the target w.r.t. the input `[B, H, W, C]`: one forward
  and one (guided) backward pass."""

  def logits_fn(x):
    return taps.forward(model, variables, x, {}, apply_kwargs=apply_kwargs)[0]

  logits, vjp_fn = jax.vjp(guided_relus(logits_fn, name=name), images)
  cls = jax.vmap(core.predicted)(logits, cls)
  # Per-image cotangents through the batched pass, as in the core: the guided rule acts
  # element-wise, so image i's gradient still depends on image i alone.
  (g,) = vjp_fn(jax.vmap(jax.grad(target_fn))(logits, cls))
  return g


@functools.partial(jax.jit, static_argnames=('raw', 'size'))
def _attribution_map(attr: Array, *, raw: bool, size) -> Array:
  """max_c |attr| (as `gradients`), resized to `size` and min-max normalised unless raw."""
  saliency = jnp.abs(attr).max(-1)
  return saliency if raw else maps.normalize(maps.resize(saliency, size))


# ----------------------------------------------------------------------------
# Public functions.


def guided_backprop_attributions(model, variables, images, *, targets=None, image_size=None,
                                 apply_kwargs=None) -> Array:
  """Signed guided-backprop gradients (Springenberg et al. 2015), as pytorch-grad-cam's
  `GuidedBackpropReLUModel` returns them for each image.

  Args:
    model: a flax.linen Module (a drjax model or any other), or an nnx Module.
    variables: the linen model's variables; None for nnx.
    images: `[B, H, W, C]` as the model takes them, or uint8 RGB (`prepare_images`).
    targets: None = predicted class; int array `[B]`; or callable `logits [K] -> scalar`.
    image_size: if set and different from the images', resize the images to it first.
    apply_kwargs: hashable keyword arguments of the forward pass, e.g. `{'train': False}`.

  Returns:
    float32 `[B, H', W', C]` at the resolution the model saw (`image_size` if set).
  """
  name = type(model).__name__
  model, variables = taps.pure_model(model, variables)
  x, target_fn, cls = core.core_inputs(images, targets, image_size)
  return _guided_grads(model, variables, x, cls, target_fn=target_fn,
                       apply_kwargs=taps.static_kwargs(apply_kwargs), name=name)


def guided_backprop(model, variables, images, *, layer=None, targets=None, raw=False,
                    image_size=None, apply_kwargs=None, reshape=None) -> Array:
  """Guided backpropagation saliency (Springenberg et al. 2015): max_c |guided gradient|.

  One forward and one guided backward pass. `layer` and `reshape` are ignored (the
  attribution is at the input). A model without ReLUs gets a RuntimeWarning (its guided
  gradients are its plain gradients, as in pytorch-grad-cam). Other arguments as `gradcam`.

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (raw: max_c |g| at the model's resolution).
  """
  del layer, reshape
  attr = guided_backprop_attributions(model, variables, images, targets=targets,
                                      image_size=image_size, apply_kwargs=apply_kwargs)
  return _attribution_map(attr, raw=raw, size=tuple(images.shape[-3:-1]))


def guided_gradcam_attributions(model, variables, images, *, layer=None, targets=None,
                                image_size=None, apply_kwargs=None, reshape=None) -> Array:
  """Guided Grad-CAM (Selvaraju et al. 2017, Sec. 3.1): Grad-CAM times guided backprop.

  As pytorch-grad-cam's example (`cam_mask * gb`): the post-processed Grad-CAM map (ReLU,
  bilinear upsampling to the input, min-max to [0, 1]) multiplies every channel of the
  guided gradients. Cost: Grad-CAM's (a forward pass and the backward pass down to `layer`)
  plus `guided_backprop`'s (a forward and a full guided backward pass).

  Args:
    layer: the Grad-CAM layer (None -> `model.default_cam_layer`); `reshape` as `gradcam`.
    Others as `guided_backprop_attributions`.

  Returns:
    float32 `[B, H', W', C]` at the resolution the model saw (`image_size` if set).
  """
  x = core.prepare_images(images, image_size)
  # Two programs, each shared with other methods (Grad-CAM's core with every CAM at this
  # layer, the guided pass with `guided_backprop`); inside a caller's jit they are one.
  cam = methods.gradcam(model, variables, x, layer=layer, targets=targets,
                        apply_kwargs=apply_kwargs, reshape=reshape)
  gb = guided_backprop_attributions(model, variables, x, targets=targets,
                                    apply_kwargs=apply_kwargs)
  return cam[..., None] * gb


def guided_gradcam(model, variables, images, *, layer=None, targets=None, raw=False,
                   image_size=None, apply_kwargs=None, reshape=None) -> Array:
  """Guided Grad-CAM saliency (Selvaraju et al. 2017): max_c |Grad-CAM * guided gradient|.

  Arguments as `gradcam`; the cost is Grad-CAM's plus `guided_backprop`'s
  (`guided_gradcam_attributions`).

  Returns:
    float32 `[B, H, W]` in [0, 1] per image (raw: before resizing and min-max).
  """
  attr = guided_gradcam_attributions(model, variables, images, layer=layer, targets=targets,
                                     image_size=image_size, apply_kwargs=apply_kwargs,
                                     reshape=reshape)
  return _attribution_map(attr, raw=raw, size=tuple(images.shape[-3:-1]))


@jax.jit
def deprocess_image(attributions: Array) -> Array:
  """pytorch-grad-cam's `deprocess_image`, per image: signed attributions -> uint8 RGB.

  Each image is standardised over all its pixels and channels, scaled to a standard
  deviation of 0.1 around 0.5 and clipped to [0, 1] (Keras Grad-CAM's visualisation, which
  pytorch-grad-cam follows).

  Args:
    attributions: `[B, H, W, C]` (e.g. `guided_backprop_attributions`), or one `[H, W, C]`.

  Returns:
    uint8 of the same shape.
  """
  x = jnp.asarray(attributions, jnp.float32)
  axes = tuple(range(x.ndim - 3, x.ndim))
  x = x - x.mean(axis=axes, keepdims=True)
  x = x / (x.std(axis=axes, keepdims=True) + 1e-5)
  return (jnp.clip(x * 0.1 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)
