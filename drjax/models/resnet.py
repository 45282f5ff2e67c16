"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition"), a port of torchvision's.

torchvision's variant ("v1.5") strides the 3x3 convolution of the bottleneck, not the first
1x1. Parameter paths mirror torchvision's module names (`layer4/2/conv3/kernel`,
`layer1/0/downsample/0/kernel`, `fc/kernel`).

Named stages (drjax.models.common.tap), in forward order: 'stem' (conv1 + bn1 + relu +
maxpool, the input of layer1), 'layer1', 'layer2', 'layer3', 'layer4'. Cut points
(`cut_points`, drjax.trunk_cache) are the stages plus 'layerL/I', the output of block I.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import linen as nn

from drjax.models import common, layers


class _Downsample(nn.Module):
  """The projection shortcut: torchvision's Sequential(conv1x1, BatchNorm2d) -> '0', '1'."""
  features: int
  stride: int
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = layers.conv(self.features, 1, stride=self.stride, name='0',
                    kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype,
                    conv_general_dilated=self.conv_general_dilated)(x)
    return layers.batch_norm(train, name='1', dtype=self.dtype)(x)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or projection) shortcut."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  zero_init_residual: bool = False  # bn2's scale starts at 0: the block starts as identity
  conv_general_dilated: Callable | None = None
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    conv = functools.partial(layers.conv, kernel_init=layers.kaiming_normal_fan_out,
                             dtype=self.dtype, conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(layers.batch_norm, train, dtype=self.dtype)
    out = nn.relu(norm(name='bn1')(conv(self.planes, 3, stride=self.stride, padding=1,
                                        name='conv1')(x)))
    out = norm(name='bn2', zero_scale=self.zero_init_residual)(
        conv(self.planes, 3, padding=1, name='conv2')(out))
    return nn.relu(out + _shortcut(self, x, train))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with an identity (or projection) shortcut."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  zero_init_residual: bool = False  # bn3's scale starts at 0: the block starts as identity
  conv_general_dilated: Callable | None = None
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    conv = functools.partial(layers.conv, kernel_init=layers.kaiming_normal_fan_out,
                             dtype=self.dtype, conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(layers.batch_norm, train, dtype=self.dtype)
    out = nn.relu(norm(name='bn1')(conv(self.planes, 1, name='conv1')(x)))
    out = nn.relu(norm(name='bn2')(conv(self.planes, 3, stride=self.stride, padding=1,
                                        name='conv2')(out)))
    out = norm(name='bn3', zero_scale=self.zero_init_residual)(
        conv(self.planes * self.expansion, 1, name='conv3')(out))
    return nn.relu(out + _shortcut(self, x, train))


def _shortcut(block: BasicBlock | Bottleneck, x: jnp.ndarray, train: bool) -> jnp.ndarray:
  """`x`, projected where the block changes the resolution or the width."""
  if block.stride == 1 and x.shape[-1] == block.planes * block.expansion:
    return x
  return _Downsample(block.planes * block.expansion, block.stride, block.dtype,
                     block.conv_general_dilated, parent=block, name='downsample')(x, train)


class _Layer(nn.Module):
  """torchvision's `layerN` Sequential of blocks named '0', '1', ..."""
  block: Any
  planes: int
  num_blocks: int
  stride: int
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  conv_general_dilated: Callable | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool,
               cut_fn: Callable[[str, jnp.ndarray], jnp.ndarray] | None = None) -> jnp.ndarray:
    for i in range(self.num_blocks):
      x = self.block(self.planes, self.stride if i == 0 else 1, self.dtype,
                     self.zero_init_residual, self.conv_general_dilated, name=str(i))(x, train)
      if cut_fn is not None and i + 1 < self.num_blocks:  # the last one is the layer's stage
        x = cut_fn(f'{self.name}/{i}', x)
    return x


class ResNet(nn.Module):
  """torchvision.models.ResNet (groups=1, no dilation).

  Attributes:
    block: BasicBlock or Bottleneck.
    stage_sizes: number of blocks in layer1..layer4.
    widths: `planes` of layer1..layer4 (the stem has widths[0] channels).
    num_classes: size of the `fc` head.
    dtype: computation dtype (parameters stay float32; logits are float32).
    zero_init_residual: torchvision's option of the same name (Goyal et al. 2017): the last
      BatchNorm of every residual branch starts with scale 0, so that each block starts as
      the identity, which helps a deep ResNet train from scratch.
    conv_general_dilated: the convolution primitive of every conv (None: lax's).
  """
  block: Any = Bottleneck
  stage_sizes: Sequence[int] = (3, 4, 23, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 1000
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  conv_general_dilated: Callable | None = None

  head_path = ('fc',)  # replaced when fine-tuning (drjax.weights)

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ('stem',) + tuple(f'layer{i + 1}' for i in range(len(self.stage_sizes)))

  @property
  def cut_points(self) -> tuple[str, ...]:
    """Every cut point (drjax.models.common.cut), in forward order."""
    names = ['stem']
    for i, num_blocks in enumerate(self.stage_sizes):
      names += [f'layer{i + 1}/{j}' for j in range(num_blocks - 1)] + [f'layer{i + 1}']
    return tuple(names)

  @property
  def default_cam_layer(self) -> str:
    return f'layer{len(self.stage_sizes)}'

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits [B, num_classes] (float32) for ImageNet-normalised images [B, H, W, 3]."""
    x = jnp.asarray(x, self.dtype)
    x = layers.conv(self.widths[0], 7, stride=2, padding=3, name='conv1',
                    kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype,
                    conv_general_dilated=self.conv_general_dilated)(x)
    x = nn.relu(layers.batch_norm(train, name='bn1', dtype=self.dtype)(x))
    x = common.tap(self, 'stem', layers.max_pool(x, 3, 2, 1))
    cut_fn = functools.partial(common.cut, self) if common.cutting(self) else None
    for i, (num_blocks, planes) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      x = _Layer(self.block, planes, num_blocks, 1 if i == 0 else 2, self.dtype,
                 self.zero_init_residual, self.conv_general_dilated,
                 name=f'layer{i + 1}')(x, train, cut_fn)
      x = common.tap(self, f'layer{i + 1}', x)
    x = jnp.mean(x, axis=(1, 2))  # adaptive_avg_pool2d(., (1, 1))
    x = nn.Dense(self.num_classes, kernel_init=layers.torch_linear_init, dtype=self.dtype,
                 name='fc')(x)
    return jnp.asarray(x, jnp.float32)


ResNet18 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 8, 36, 3))
# Same four-layer structure and stage names, a few channels: for fast tests.
ResNetTiny = functools.partial(ResNet, block=BasicBlock, stage_sizes=(1, 1, 1, 1),
                               widths=(8, 16, 16, 32))
