"""pytorch-grad-cam 1.5.7's further CAM methods, each with `gradcam`'s signature: Grad-CAM
element-wise, Eigen-CAM, Eigen-Grad-CAM, KPCA-CAM, FEM, ShapleyCAM, Finer-CAM and RandomCAM.

The gradient methods run on the shared core (`core.acts_and_grads`); the class-agnostic ones
(Eigen-CAM, KPCA-CAM, FEM, RandomCAM) on a forward pass alone; ShapleyCAM on a second-order
core (the gradient and its derivative along the activations, from one linearisation).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from drjax.gradcam import core, maps, methods, taps

Array = jax.Array


# ----------------------------------------------------------------------------
# Gradient methods on the shared core.


def gradcam_elementwise(model, variables, images, *, layer=None, targets=None, raw=False,
                        image_size=None, apply_kwargs=None, reshape=None):
  """Grad-CAM element-wise (pytorch-grad-cam's GradCAMElementWise, Gildenblat et al. 2021).

  sum_c relu(g * A): HiResCAM (Draelos & Carin 2020) with each element clipped before the
  channel sum. Arguments as `gradcam`.
  """
  return methods._gradient_cam(maps.gradcam_elementwise_map, model, variables, images, layer,
                               targets, raw, image_size, apply_kwargs, reshape)


def eigengradcam(model, variables, images, *, layer=None, targets=None, raw=False,
                 image_size=None, apply_kwargs=None, reshape=None):
  """Eigen-Grad-CAM (pytorch-grad-cam's EigenGradCAM, after Muhammad & Yeasin 2020).

  The first principal component of g * A over positions (`maps.eigengradcam_map`, with
  Eigen-CAM's sign rule). Arguments as `gradcam`.
  """
  return methods._gradient_cam(maps.eigengradcam_map, model, variables, images, layer, targets,
                               raw, image_size, apply_kwargs, reshape)


# ----------------------------------------------------------------------------
# Class-agnostic methods: one forward pass, no gradient.


@functools.partial(jax.jit, static_argnames=('model', 'layer', 'apply_kwargs', 'reshape'))
def _layer_acts(model, variables, images, *, layer, apply_kwargs=(), reshape=None):
  """A layer's activations `[B, h, w, C]` from a forward pass (the head above is never used)."""
  taps.layer_shapes(model, variables, images, (layer,), apply_kwargs, reshape)
  _, acts = taps.forward(model, variables, images, {layer: None}, apply_kwargs=apply_kwargs)
  return taps.grid(acts, reshape)[layer]


@functools.partial(jax.jit, static_argnames=('map_fn', 'size', 'params'))
def _map_program(map_fn, *arrays, size, params=()):
  """`map_fn(*arrays, **params)` and, unless `size` is None (raw), its post-processing."""
  cam = map_fn(*arrays, **dict(params))
  return cam if size is None else maps.postprocess(cam, size)


def _activation_cam(map_fn, params, model, variables, images, layer, targets, raw, image_size,
                    apply_kwargs, reshape, *extra):
  size = tuple(images.shape[-3:-1])
  model, variables, (name,), apply_kwargs = core.model_inputs(model, variables, layer, apply_kwargs)
  # Targets are checked like everywhere else, though these maps do not depend on a class.
  images, _, _ = core.core_inputs(images, targets, image_size)
  acts = _layer_acts(model, variables, images, layer=name, apply_kwargs=apply_kwargs,
                     reshape=reshape)
  return _map_program(map_fn, acts, *extra, size=None if raw else size, params=params)


def eigencam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None):
  """Eigen-CAM (Muhammad & Yeasin 2020): the activations' first principal component.

  Class-agnostic: `targets` is checked but unused, and no gradient is computed (one
  forward pass). The SVD's arbitrary sign is fixed by Seg-Eigen-CAM's rule (Chung & Ying
  2025): see `maps.eigencam_map`. Arguments as `gradcam`.
  """
  return _activation_cam(maps.eigencam_map, (), model, variables, images, layer, targets, raw,
                         image_size, apply_kwargs, reshape)


def kpcacam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
            apply_kwargs=None, reshape=None, kernel: str = 'sigmoid',
            gamma: float | None = None):
  """KPCA-CAM (Karmani et al. 2024): the activations' first kernel principal component.

  Class-agnostic, one forward pass, no gradient (`maps.kpca_map`).

  Args:
    kernel: one of `maps.KPCA_KERNELS`; 'sigmoid', tanh(gamma <a, b> + 1), as KPCA_CAM.
    gamma: the kernel's scale; None -> 1 / C (scikit-learn's default).
    Others as `gradcam` (`targets` is checked but unused).
  """
  if kernel not in maps.KPCA_KERNELS:
    raise ValueError(f'Unknown KPCA kernel {kernel!r}; valid: {", ".join(maps.KPCA_KERNELS)}')
  params = (('gamma', None if gamma is None else float(gamma)), ('kernel', kernel))
  return _activation_cam(maps.kpca_map, params, model, variables, images, layer, targets, raw,
                         image_size, apply_kwargs, reshape)


def fem(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
        apply_kwargs=None, reshape=None, k: float = 2.0):
  """FEM, Feature Explanation Method (Fuad et al. 2020): k-sigma channel weights.

  Class-agnostic, one forward pass, no gradient (`maps.fem_map`).

  Args:
    k: the threshold in standard deviations above each channel's mean (pytorch-grad-cam's 2).
    Others as `gradcam` (`targets` is checked but unused).
  """
  return _activation_cam(maps.fem_map, (('k', float(k)),), model, variables, images, layer,
                         targets, raw, image_size, apply_kwargs, reshape)


def _random_map(acts, rng):
  weights = jax.random.uniform(rng, acts.shape[:1] + acts.shape[-1:], acts.dtype, -1.0, 1.0)
  return maps.randomcam_map(acts, weights)


def randomcam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
              apply_kwargs=None, reshape=None, rng: Array | int = 0):
  """RandomCAM, the chance baseline (pytorch-grad-cam's RandomCAM): random channel weights.

  Weights uniform in [-1, 1), one per image and channel, drawn from `rng` (pytorch-grad-cam
  draws from numpy's global state): the same `rng` and batch give the same maps. One forward
  pass, no gradient.

  Args:
    rng: a PRNG key or an int seed. The weights depend on it and on the batch position, so
      pass a fresh one per batch (e.g. `jax.random.fold_in(rng, batch_index)`) to draw
      independent weights over a dataset.
    Others as `gradcam` (`targets` is checked but unused).
  """
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(rng)
  return _activation_cam(_random_map, (), model, variables, images, layer, targets, raw,
                         image_size, apply_kwargs, reshape, rng)


# ----------------------------------------------------------------------------
# ShapleyCAM: a second-order core.


@functools.partial(jax.jit, static_argnames=('model', 'layer', 'target_fn', 'apply_kwargs',
                                             'reshape'))
def _grads_and_hvp(model, variables, images, cls, *, layer, target_fn, apply_kwargs=(),
                   reshape=None):
  """-> (acts, grads, H @ acts, is_zero): the core's gradient and its Hessian-vector product."""
  shapes = taps.layer_shapes(model, variables, images, (layer,), apply_kwargs, reshape)
  zero = jnp.zeros(shapes[layer].shape, shapes[layer].dtype)

  def grad_fn(delta):
    def forward(d):
      return taps.forward(model, variables, images, {layer: d}, apply_kwargs=apply_kwargs)

    # As the core: a vjp w.r.t. the layer's perturbation alone, per-image targets.
    logits, vjp_fn, acts = jax.vjp(forward, delta, has_aux=True)
    labels = jax.vmap(core.predicted)(logits, cls)
    (grads,) = vjp_fn(jax.vmap(jax.grad(target_fn))(logits, labels))
    return grads, acts[layer]

  # Forward-over-reverse: the derivative of the gradient along the activations is H A
  # (H is symmetric, so it equals pytorch-grad-cam's vjp of the gradient with A); the trunk
  # below the layer does not depend on the perturbation, so it carries no tangents.
  grads, hvp_fn, acts = jax.linearize(grad_fn, zero, has_aux=True)
  hvp = hvp_fn(acts)
  acts, grads, hvp = (x if reshape is None else reshape(x) for x in (acts, grads, hvp))
  return acts, grads, hvp, jnp.all(grads == 0, axis=(1, 2, 3))


def shapleycam(model, variables, images, *, layer=None, targets=None, raw=False,
               image_size=None, apply_kwargs=None, reshape=None):
  """ShapleyCAM (Cai 2025): Grad-CAM weights from the gradient and a Hessian term.

  Channel weights mean_ij(g - (H A) / 2), H the Hessian of the target w.r.t. the layer's
  output (`maps.shapleycam_map`). With a raw-logit target and a piecewise-linear head
  (BatchNorm, ReLU, pooling, Linear) H A is 0 and this is Grad-CAM; the paper pairs it with
  targets through the softmax (e.g. `referable_dr_target`). Cost: a forward pass, then about
  twice Grad-CAM's work above the layer (its forward and backward, and their forward-mode
  derivative); with a raw-logit target JAX's symbolic zeros drop the second-order term when
  tracing, so it costs what Grad-CAM does. Arguments as `gradcam`.
  """
  size = tuple(images.shape[-3:-1])
  model, variables, (name,), apply_kwargs = core.model_inputs(model, variables, layer, apply_kwargs)
  images, target_fn, cls = core.core_inputs(images, targets, image_size)
  acts, grads, hvp, is_zero = _grads_and_hvp(model, variables, images, cls, layer=name,
                                             target_fn=target_fn, apply_kwargs=apply_kwargs,
                                             reshape=reshape)
  cam = _map_program(maps.shapleycam_map, acts, grads, hvp, size=None if raw else size)
  core.warn_zero_grads({name: is_zero})
  return cam


# ----------------------------------------------------------------------------
# Finer-CAM: Grad-CAM of a target that compares the class with its nearest rivals.


@dataclasses.dataclass(frozen=True)
class FinerTarget:
  """Finer-CAM's target (pytorch-grad-cam's FinerWeightedTarget) for one image's logits.

  The compared classes are those whose logits are closest to the target class's, at the
  given ranks of that order (1 = the closest other class); with p the softmax, the target
  is sum_j p_j (z_c - alpha z_j) / (sum_j p_j + 1e-9), differentiated through p as well.
  Ranks past the number of classes are dropped, as in pytorch-grad-cam. Hashable by value,
  so the core compiles once per setting.
  """
  alpha: float = 1.0
  comparison_categories: tuple[int, ...] = (1, 2, 3)

  def __call__(self, logits: Array, cls: Array) -> Array:
    ranks = tuple(r for r in self.comparison_categories if r < logits.shape[-1])
    if not ranks:
      raise ValueError(f'Finer-CAM needs a class to compare with: comparison_categories '
                       f'{self.comparison_categories} are all >= the {logits.shape[-1]} classes')
    main = logits[cls]
    # The target class ranks first even if another class ties with its logit.
    order = jnp.argsort(jnp.abs(logits - main).at[cls].set(-1.0))
    others = order[jnp.asarray(ranks)]
    prob = jax.nn.softmax(logits)[others]
    return (prob * (main - self.alpha * logits[others])).sum() / (prob.sum() + 1e-9)


def finercam(model, variables, images, *, layer=None, targets=None, raw=False, image_size=None,
             apply_kwargs=None, reshape=None, alpha: float = 1.0,
             comparison_categories=(1, 2, 3)):
  """Finer-CAM (Zhang et al. 2025): Grad-CAM of the target class against its nearest classes.

  Grad-CAM (pytorch-grad-cam's default base method) of `FinerTarget`, which weighs the
  target's logit against the most similar classes' by their probabilities, so the map shows
  what tells the class apart from its rivals. One forward and one backward pass.

  Args:
    targets: None (the predicted class) or class indices (an int or `[B]`); not a callable,
      as the comparison needs a class.
    alpha: how strongly the compared classes' logits are subtracted (pytorch-grad-cam's 1).
    comparison_categories: ranks of the compared classes by closeness of their logit to
      the target's (1 = closest; pytorch-grad-cam's (1, 2, 3)).
    Others as `gradcam`.
  """
  if callable(targets):
    raise ValueError('finercam compares the target class with its most similar classes, so '
                     'targets must be None (the predicted class) or class indices, not a '
                     'callable')
  comparison = tuple(int(c) for c in comparison_categories)
  if not comparison:
    raise ValueError('finercam needs at least one rank in comparison_categories')
  size = tuple(images.shape[-3:-1])
  model, variables, (name,), apply_kwargs = core.model_inputs(model, variables, layer, apply_kwargs)
  images, _, cls = core.core_inputs(images, targets, image_size)
  target_fn = FinerTarget(float(alpha), comparison)
  acts, grads, _, _, is_zero = core.acts_and_grads(model, variables, images, cls, layers=(name,),
                                                   target_fn=target_fn, apply_kwargs=apply_kwargs,
                                                   reshape=reshape)
  cam = methods._map_program(maps.gradcam_map, acts[name], grads[name],
                             size=None if raw else size)
  core.warn_zero_grads(is_zero)
  return cam
