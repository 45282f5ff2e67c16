"""VGG (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks"), a port of torchvision's.

Parameter paths mirror torchvision's Sequential indices (`features/28/kernel`,
`classifier/0/kernel`, ..., `classifier/6/kernel`). torchvision pools the
features to 7x7 with AdaptiveAvgPool2d before the classifier, so any input size
works (at 64 px the 2x2 map is replicated to 7x7), and the first classifier
layer sees the features flattened in NHWC order here (drjax.weights permutes
torchvision's NCHW-flattened weight accordingly).

Named stages (drjax.models.common.tap), in forward order: 'conv1_1', 'conv1_2',
'block1', 'conv2_1', ..., 'block5'. 'convB_I' is the post-ReLU output of the
I-th convolution of block B (after its BatchNorm in the *_bn variants); 'blockB'
is the same tensor as the block's last conv, before the block's max-pool. Cut points
(`cut_points`, drjax.trunk_cache) are the stages plus 'poolB', block B after its max-pool.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from drjax.models import common, layers

TapFn = Callable[[str, jnp.ndarray], jnp.ndarray]

# torchvision's cfgs: channels of each 3x3 conv, 'M' a 2x2 max-pool ending a block.
CFGS = {
    'A': (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    'B': (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    'D': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512,
          'M'),
    'E': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512,
          512, 512, 512, 'M'),
    'tiny': (8, 'M', 8, 'M', 16, 16, 'M', 16, 'M', 16, 'M'),
}


def _stage_names(cfg: Sequence[int | str], pools: bool = False) -> tuple[str, ...]:
  """The stages in forward order; with `pools`, each block's 'poolB' after its 'blockB'."""
  names, block, conv = [], 1, 1
  for v in cfg:
    if v == 'M':
      names += [f'block{block}'] + ([f'pool{block}'] if pools else [])
      block, conv = block + 1, 1
    else:
      names.append(f'conv{block}_{conv}')
      conv += 1
  return tuple(names)


class _Features(nn.Module):
  """torchvision's `VGG.features` Sequential; children named by their torch index."""
  cfg: Sequence[int | str]
  batch_norm: bool
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, tap_fn: TapFn,
               cut_fn: TapFn | None = None) -> jnp.ndarray:
    index, block, conv = 0, 1, 1
    for v in self.cfg:
      if v == 'M':
        x = tap_fn(f'block{block}', x)
        x = layers.max_pool(x, 2, 2)
        if cut_fn is not None:
          x = cut_fn(f'pool{block}', x)
        index, block, conv = index + 1, block + 1, 1
        continue
      x = layers.conv(v, 3, padding=1, use_bias=True, name=str(index),
                      kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype,
                      conv_general_dilated=self.conv_general_dilated)(x)
      index += 1
      if self.batch_norm:
        x = layers.batch_norm(train, name=str(index), dtype=self.dtype)(x)
        index += 1
      x = tap_fn(f'conv{block}_{conv}', nn.relu(x))
      index, conv = index + 1, conv + 1  # the ReLU takes a Sequential index too
    return x


class _Classifier(nn.Module):
  """torchvision's `VGG.classifier`: Linear '0', ReLU, Dropout, Linear '3', ReLU, Dropout, '6'."""
  hidden: int
  num_classes: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    dense = functools.partial(_dense, dtype=self.dtype)
    x = nn.relu(dense(self.hidden, name='0')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.relu(dense(self.hidden, name='3')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(self.num_classes, name='6')(x)


def _dense(features: int, dtype: Any, name: str | None = None) -> nn.Dense:
  """torchvision's VGG Linear: normal(0, 0.01) weights, zero biases."""
  return nn.Dense(features, kernel_init=nn.initializers.normal(0.01), dtype=dtype, name=name)


class VGG(nn.Module):
  """torchvision.models.VGG.

  Attributes:
    cfg: conv channels and 'M' pools (one of CFGS).
    batch_norm: whether each conv is followed by BatchNorm (the *_bn variants).
    hidden: width of the two hidden classifier layers.
    num_classes: size of the last classifier layer ('classifier/6').
    dropout: dropout rate of the classifier in train mode (uses the 'dropout' rng).
    pool_size: AdaptiveAvgPool2d output size before the classifier.
    dtype: computation dtype (parameters stay float32; logits are float32).
    conv_general_dilated: the convolution primitive of every conv (None: lax's).
  """
  cfg: Sequence[int | str] = CFGS['D']
  batch_norm: bool = False
  hidden: int = 4096
  num_classes: int = 1000
  dropout: float = 0.5
  pool_size: int = 7
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  head_path = ('classifier', '6')  # replaced when fine-tuning (drjax.weights)

  @property
  def stage_names(self) -> tuple[str, ...]:
    return _stage_names(self.cfg)

  @property
  def cut_points(self) -> tuple[str, ...]:
    """Every cut point (drjax.models.common.cut), in forward order."""
    return _stage_names(self.cfg, pools=True)

  @property
  def default_cam_layer(self) -> str:
    return self.stage_names[-1]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits [B, num_classes] (float32) for ImageNet-normalised images [B, H, W, 3]."""
    x = jnp.asarray(x, self.dtype)
    x = _Features(tuple(self.cfg), self.batch_norm, self.dtype, self.conv_general_dilated,
                  name='features')(
        x, train, functools.partial(common.tap, self),
        functools.partial(common.cut, self) if common.cutting(self) else None)
    x = layers.adaptive_avg_pool(x, (self.pool_size, self.pool_size))
    x = x.reshape(x.shape[0], -1)  # NHWC order; see drjax.weights for the permutation.
    x = _Classifier(self.hidden, self.num_classes, self.dropout, self.dtype,
                    name='classifier')(x, train)
    return jnp.asarray(x, jnp.float32)


VGG11 = functools.partial(VGG, cfg=CFGS['A'])
VGG13 = functools.partial(VGG, cfg=CFGS['B'])
VGG16 = functools.partial(VGG, cfg=CFGS['D'])
VGG19 = functools.partial(VGG, cfg=CFGS['E'])
VGG11BN = functools.partial(VGG, cfg=CFGS['A'], batch_norm=True)
VGG13BN = functools.partial(VGG, cfg=CFGS['B'], batch_norm=True)
VGG16BN = functools.partial(VGG, cfg=CFGS['D'], batch_norm=True)
VGG19BN = functools.partial(VGG, cfg=CFGS['E'], batch_norm=True)
# Same five blocks and stage names (with BatchNorm, to cover both paths), a few channels.
VGGTiny = functools.partial(VGG, cfg=CFGS['tiny'], batch_norm=True, hidden=32)
