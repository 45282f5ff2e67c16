"""What the model ports share: ImageNet normalisation, named-stage taps, cut points and
initialisation."""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

# torchvision's ImageNet statistics, for images scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The collection through which a forward pass is cut in two at a cut point (`cut`).
TRUNK = 'trunk'


def normalize(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 or [0, 255] float images [B, H, W, 3] -> float32 ImageNet-normalised."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def tap(module: nn.Module, name: str, x: jnp.ndarray) -> jnp.ndarray:
  """Marks `x` as the named stage `name`, reachable without hooks.

  When the caller makes the collections mutable, `x` gets a zero 'perturbations' entry added
  (so the gradient of any output with respect to that entry is its gradient with respect to
  the stage, as flax's `Module.perturb`) and is stored in 'intermediates' as a 1-tuple (as
  `Module.sow`). A 'perturbations' entry passed in with the variables is added to `x` either
  way (how Grad-CAM reaches the stage); without one, and during `init`, `x` passes unchanged.
  Unlike `perturb` and `sow`, the name is not reserved in the module's scope: ResNet's
  'layer1' tap shares its name with the 'layer1' submodule that holds the parameters.
  Every stage is also a cut point (`cut`).
  """
  scope = module.scope
  if module.is_initializing():
    return x
  x = cut(module, name, x)
  if scope.is_mutable_collection('perturbations') and not scope.has_variable(
      'perturbations', name):
    scope.put_variable('perturbations', name, jnp.zeros_like(x))
  if scope.has_variable('perturbations', name):
    x = x + scope.get_variable('perturbations', name)
  if scope.is_mutable_collection('intermediates'):
    scope.put_variable('intermediates', name, (x,))
  return x


def cut(module: nn.Module, name: str, x: jnp.ndarray) -> jnp.ndarray:
  """Marks `x` as cut point `name`, where the forward pass can be split (drjax.trunk_cache).

  With the 'trunk' collection mutable, `x` is stored there under `name` (how the trunk's
  output is computed). A 'trunk' entry `name` passed in with the variables replaces `x`, cast
  to its dtype (how a cached output is fed back: everything before the point is then dead
  code, which XLA drops). Otherwise, and during `init`, `x` passes unchanged.
  """
  scope = module.scope
  if module.is_initializing():
    return x
  if scope.has_variable(TRUNK, name):
    fed = scope.get_variable(TRUNK, name)
    if fed.shape != x.shape:
      raise ValueError(f'cut point {name!r} is fed shape {fed.shape}, but the forward pass '
                       f'has {x.shape} there')
    return fed.astype(x.dtype)
  if scope.is_mutable_collection(TRUNK):
    scope.put_variable(TRUNK, name, x)
  return x


def cutting(module: nn.Module) -> bool:
  """Whether this forward pass stores or is fed cut points (else `cut` changes nothing)."""
  return not module.is_initializing() and (module.scope.is_mutable_collection(TRUNK)
                                           or TRUNK in module.variables)


def init_variables(model: nn.Module, rng: jax.Array,
                   image_size: int | Sequence[int] = 32) -> dict:
  """`model.init` on one zero image, as exactly `{'params', 'batch_stats'}`.

  'batch_stats' is empty for models without BatchNorm, so that train steps and checkpoints
  handle every architecture alike.
  """
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  images = jnp.zeros((1, height, width, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, images)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
