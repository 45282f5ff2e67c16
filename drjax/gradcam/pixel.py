"""Pixel attributions, for comparison with the CAMs: gradients, SmoothGrad and Integrated
Gradients. They take the same arguments as the CAM methods and ignore `layer` and `reshape`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from drjax.gradcam import core, maps, taps


@functools.partial(jax.jit, static_argnames=('model', 'target_fn', 'apply_kwargs'))
def _input_grads(model, variables, images, cls, *, target_fn, apply_kwargs=()):
  """Per-image gradient of the target w.r.t. the input: `[B, H, W, C]`, and classes."""

  def logits_fn(x):
    return taps.forward(model, variables, x, {}, apply_kwargs=apply_kwargs)[0]

  logits, vjp_fn = jax.vjp(logits_fn, images)
  cls = jax.vmap(core.predicted)(logits, cls)
  (g,) = vjp_fn(jax.vmap(jax.grad(target_fn))(logits, cls))   # per image, as in the core
  return g, cls


def _pixel_inputs(model, variables, images, targets, image_size, apply_kwargs):
  """-> (model, variables, images, target_fn, cls, apply_kwargs) for `_input_grads`."""
  model, variables = taps.pure_model(model, variables)
  images, target_fn, cls = core.core_inputs(images, targets, image_size)
  return model, variables, images, target_fn, cls, taps.static_kwargs(apply_kwargs)


def _pixel_out(saliency, raw, size):
  return saliency if raw else maps.normalize(maps.resize(saliency, size))


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
  attr = integrated_gradients_attributions(model, variables,
                                           core.prepare_images(images, image_size),
                                           targets=targets, steps=steps, baseline=baseline,
                                           apply_kwargs=apply_kwargs)
  return _pixel_out(jnp.abs(attr).sum(-1), raw, size)


def integrated_gradients_attributions(model, variables, images, *, targets=None, steps=32,
                                      baseline=None, apply_kwargs=None):
  """Signed IG attributions `[B, H, W, C]`; they sum to about score(x) - score(x') (eq. 1)."""
  model, variables, x, target_fn, cls, kwargs = _pixel_inputs(model, variables, images, targets,
                                                              None, apply_kwargs)
  x0 = jnp.zeros_like(x) if baseline is None else core.prepare_images(baseline, x.shape[1:3])
  grads_fn = functools.partial(_input_grads, model, variables, target_fn=target_fn,
                               apply_kwargs=kwargs)
  _, cls = grads_fn(x, cls)
  total = 0.0
  for k in range(steps):
    alpha = (k + 0.5) / steps
    total = total + grads_fn(x0 + alpha * (x - x0), cls)[0]
  return (x - x0) * total / steps
