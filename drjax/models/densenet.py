"""DenseNet (Huang et al. 2017, "Densely Connected Convolutional Networks"): torchvision port.

Parameter paths mirror torchvision's module names
(`features/denseblock4/denselayer16/conv2/kernel`, `classifier/kernel`), so converting
torchvision weights is a rename (see drjax.weights).

Named stages (drjax.models.common.tap), in forward order: 'conv0' (conv0 + norm0 + relu0),
'pool0', 'denseblock1', 'transition1', ..., 'transition3', 'denseblock4', 'norm5' (norm5 +
ReLU: the trunk's final features). Cut points (`cut_points`, drjax.trunk_cache) are the stages
plus 'denseblockB/denselayerI': block B's concatenated features after its layer I.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from drjax.models import common, layers

TapFn = Callable[[str, jnp.ndarray], jnp.ndarray]


class _DenseLayer(nn.Module):
  """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 bottleneck producing `growth_rate` new channels."""
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    conv = functools.partial(layers.conv, dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    y = nn.relu(layers.batch_norm(train, name='norm1', dtype=self.dtype)(x))
    y = conv(self.bn_size * self.growth_rate, 1, name='conv1')(y)
    y = nn.relu(layers.batch_norm(train, name='norm2', dtype=self.dtype)(y))
    return conv(self.growth_rate, 3, padding=1, name='conv2')(y)


class _DenseBlock(nn.Module):
  """`num_layers` dense layers, each fed the concatenation of all earlier outputs."""
  num_layers: int
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, cut_fn: TapFn | None = None) -> jnp.ndarray:
    # torch.cat([init, new_1, new_2, ...], 1)'s channel order, written into one buffer of the
    # block's final width instead of concatenated anew by every layer.
    width = x.shape[-1]
    block = jnp.zeros(x.shape[:-1] + (width + self.num_layers * self.growth_rate,), x.dtype)
    block = lax.dynamic_update_slice_in_dim(block, x, 0, axis=-1)
    for i in range(self.num_layers):
      new = _DenseLayer(self.growth_rate, self.bn_size, self.dtype, self.conv_general_dilated,
                        name=f'denselayer{i + 1}')(block[..., :width], train)
      block = lax.dynamic_update_slice_in_dim(block, new.astype(block.dtype), width, axis=-1)
      width += self.growth_rate
      if cut_fn is not None and i + 1 < self.num_layers:  # the last one is the block's stage
        features = block[..., :width]
        fed = cut_fn(f'{self.name}/denselayer{i + 1}', features)
        if fed is not features:
          # A fed cut point: the layers after it must read the fed features alone, in a
          # fresh buffer, so that the ones before it are dead code.
          block = lax.dynamic_update_slice_in_dim(jnp.zeros_like(block), fed, 0, axis=-1)
    return block


class _Transition(nn.Module):
  """BN-ReLU-Conv1x1 halving the channels, then 2x2 average pooling.

  The pooling runs before the convolution (torchvision pools after): both are linear and a
  1x1 convolution acts on each pixel alone, so the result is the same up to float32 rounding
  and the convolution sees a quarter of the pixels.
  """
  features: int
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.relu(layers.batch_norm(train, name='norm', dtype=self.dtype)(x))
    x = layers.avg_pool(x, 2, 2)
    return layers.conv(self.features, 1, name='conv', dtype=self.dtype,
                       conv_general_dilated=self.conv_general_dilated)(x)


class _Features(nn.Module):
  """torchvision's `DenseNet.features` Sequential; stages are tapped by the caller's `tap_fn`."""
  growth_rate: int
  block_config: Sequence[int]
  num_init_features: int
  bn_size: int
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, tap_fn: TapFn,
               cut_fn: TapFn | None = None) -> jnp.ndarray:
    x = layers.conv(self.num_init_features, 7, stride=2, padding=3, name='conv0',
                    dtype=self.dtype, conv_general_dilated=self.conv_general_dilated)(x)
    x = nn.relu(layers.batch_norm(train, name='norm0', dtype=self.dtype)(x))
    x = tap_fn('conv0', x)
    x = tap_fn('pool0', layers.max_pool(x, 3, 2, 1))
    num_features = self.num_init_features
    for i, num_layers in enumerate(self.block_config):
      x = _DenseBlock(num_layers, self.growth_rate, self.bn_size, self.dtype,
                      self.conv_general_dilated, name=f'denseblock{i + 1}')(x, train, cut_fn)
      x = tap_fn(f'denseblock{i + 1}', x)
      num_features += num_layers * self.growth_rate
      if i != len(self.block_config) - 1:
        num_features //= 2
        x = _Transition(num_features, self.dtype, self.conv_general_dilated,
                        name=f'transition{i + 1}')(x, train)
        x = tap_fn(f'transition{i + 1}', x)
    # torchvision applies this ReLU in DenseNet.forward, after the features.
    x = nn.relu(layers.batch_norm(train, name='norm5', dtype=self.dtype)(x))
    return tap_fn('norm5', x)


class DenseNet(nn.Module):
  """torchvision.models.DenseNet (memory_efficient=False, drop_rate=0).

  Attributes:
    growth_rate: channels added by each dense layer (k in the paper).
    block_config: number of dense layers in each of the dense blocks.
    num_init_features: channels of the stem convolution.
    bn_size: bottleneck width multiplier (bn_size * growth_rate channels).
    num_classes: size of the `classifier` head.
    dtype: computation dtype (parameters stay float32; logits are float32).
    conv_general_dilated: the convolution primitive of every conv (None: lax's).
  """
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  num_classes: int = 1000
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  head_path = ('classifier',)  # replaced when fine-tuning (drjax.weights)

  @property
  def stage_names(self) -> tuple[str, ...]:
    names = ['conv0', 'pool0']
    for i in range(len(self.block_config)):
      names.append(f'denseblock{i + 1}')
      if i != len(self.block_config) - 1:
        names.append(f'transition{i + 1}')
    return tuple(names + ['norm5'])

  @property
  def cut_points(self) -> tuple[str, ...]:
    """Every cut point (drjax.models.common.cut), in forward order."""
    names = ['conv0', 'pool0']
    for i, num_layers in enumerate(self.block_config):
      names += [f'denseblock{i + 1}/denselayer{j + 1}' for j in range(num_layers - 1)]
      names.append(f'denseblock{i + 1}')
      if i != len(self.block_config) - 1:
        names.append(f'transition{i + 1}')
    return tuple(names + ['norm5'])

  @property
  def default_cam_layer(self) -> str:
    return f'denseblock{len(self.block_config)}'

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits [B, num_classes] (float32) for ImageNet-normalised images [B, H, W, 3]."""
    x = jnp.asarray(x, self.dtype)
    x = _Features(self.growth_rate, tuple(self.block_config), self.num_init_features,
                  self.bn_size, self.dtype, self.conv_general_dilated, name='features')(
                      x, train, functools.partial(common.tap, self),
                      functools.partial(common.cut, self) if common.cutting(self) else None)
    x = jnp.mean(x, axis=(1, 2))  # adaptive_avg_pool2d(., (1, 1))
    x = nn.Dense(self.num_classes, kernel_init=layers.torch_linear_init, dtype=self.dtype,
                 name='classifier')(x)
    return jnp.asarray(x, jnp.float32)


DenseNet121 = functools.partial(DenseNet, growth_rate=32, block_config=(6, 12, 24, 16),
                                num_init_features=64)
DenseNet161 = functools.partial(DenseNet, growth_rate=48, block_config=(6, 12, 36, 24),
                                num_init_features=96)
DenseNet169 = functools.partial(DenseNet, growth_rate=32, block_config=(6, 12, 32, 32),
                                num_init_features=64)
DenseNet201 = functools.partial(DenseNet, growth_rate=32, block_config=(6, 12, 48, 32),
                                num_init_features=64)
# Same four-block structure and stage names, a few channels: for fast tests.
DenseNetTiny = functools.partial(DenseNet, growth_rate=4, block_config=(1, 2, 1, 1),
                                 num_init_features=8, bn_size=2)
