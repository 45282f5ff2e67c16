"""Pieces shared by the model ports: ImageNet normalisation and named-stage taps."""

import jax.numpy as jnp
from flax import linen as nn

# torchvision's ImageNet statistics, for images scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 or [0, 255] float images [B, H, W, 3] -> float32 ImageNet-normalised."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def tap(module: nn.Module, name: str, x: jnp.ndarray) -> jnp.ndarray:
  """Marks `x` as the named stage `name`, reachable without hooks.

  The activation is sown into the 'intermediates' collection and passes through
  `Module.perturb`, so the gradient of any output with respect to it is the
  gradient with respect to the 'perturbations' entry of the same name. Both are
  no-ops unless the caller asks for those collections.
  """
  x = module.perturb(name, x)
  module.sow('intermediates', name, x)
  return x
