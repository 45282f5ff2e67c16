"""A toy linen model that follows the drjax models' tap contract, for the Grad-CAM tests."""

from typing import ClassVar

from flax import linen as nn

from drjax.models.common import tap

TOY_SIZE = 32  # the `toy` fixture's image size (tests/conftest.py)


class ToyNet(nn.Module):
  """Three conv stages, BN, global average pool and a linear head, with taps."""

  num_classes: int = 5
  stage_names: ClassVar[tuple[str, ...]] = ('stem', 'stage1', 'stage2')
  default_cam_layer: ClassVar[str] = 'stage2'

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = tap(self, 'stem', nn.relu(nn.Conv(4, (3, 3), name='conv0')(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = tap(self, 'stage1', nn.relu(nn.Conv(8, (3, 3), name='conv1')(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.Conv(8, (3, 3), name='conv2')(x)
    x = nn.BatchNorm(use_running_average=not train, name='norm')(x)
    x = tap(self, 'stage2', nn.relu(x))
    return nn.Dense(self.num_classes, name='head')(x.mean(axis=(1, 2)))
