"""torch-exact building blocks shared by the torchvision ports.

Each layer matches its `torch.nn` counterpart in output shape (explicit symmetric padding,
floor-mode pooling) and, up to float32 rounding, in value, so converted torchvision weights
give torchvision's logits at any input size torchvision accepts.
"""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

# He et al. 2015, "Delving deep into rectifiers", as torch.nn.init.kaiming_normal_.
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def conv(features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
         use_bias: bool = False, name: str | None = None, dtype: Dtype = jnp.float32,
         kernel_init=kaiming_normal_fan_in,
         conv_general_dilated: Callable | None = None) -> nn.Conv:
  """torch.nn.Conv2d(kernel_size, stride, padding) with symmetric explicit padding.

  'SAME' padding would pad asymmetrically for even strides and odd inputs; torch always
  pads `padding` pixels on every side and floors the output size. `conv_general_dilated`
  replaces `lax.conv_general_dilated` (None: lax's own), as flax's `nn.Conv` allows.
  """
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                 kernel_init=kernel_init, dtype=dtype, name=name,
                 conv_general_dilated=conv_general_dilated)


def batch_norm(train: bool, *, name: str | None = None, dtype: Dtype = jnp.float32,
               zero_scale: bool = False) -> nn.BatchNorm:
  """torch.nn.BatchNorm2d defaults: eps=1e-5, momentum 0.1 (flax's 0.9).

  One difference remains in train mode: torch updates the running variance with the
  unbiased batch variance, flax with the biased one (a factor N/(N-1)). `zero_scale`
  initialises the scale (gamma) to 0 instead of 1.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones)


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
  """torch.nn.MaxPool2d(window, stride, padding), ceil_mode=False: pads with -inf."""
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def avg_pool(x: jnp.ndarray, window: int, stride: int) -> jnp.ndarray:
  """torch.nn.AvgPool2d(window, stride) without padding, ceil_mode=False."""
  return nn.avg_pool(x, (window, window), strides=(stride, stride), padding='VALID')


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging matrix of torch's adaptive average pooling along one axis.

  torch's window i spans [floor(i * in / out), ceil((i + 1) * in / out)), so the windows
  overlap when in % out != 0 and repeat pixels when in < out (a 2x2 map pooled to 7x7
  replicates each pixel).
  """
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil division
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
  """torch.nn.AdaptiveAvgPool2d(output_size) for NHWC `x` [B, H, W, C] -> [B, h, w, C]."""
  _, height, width, _ = x.shape
  out_h, out_w = output_size
  if (height, width) == (out_h, out_w):
    return x
  rows = jnp.asarray(_adaptive_pool_matrix(height, out_h), x.dtype)
  cols = jnp.asarray(_adaptive_pool_matrix(width, out_w), x.dtype)
  return jnp.einsum('ih,jw,bhwc->bijc', rows, cols, x)
