"""Model registry: flax linen ports of torchvision's DenseNet, ResNet and VGG.

    model = models.get_model('densenet121', num_classes=5)
    variables = models.init_variables(model, rng)   # {'params', 'batch_stats'}
    logits = model.apply(variables, images, train=False)

Every model exposes `stage_names` (its named taps, in forward order), `cut_points` (where
drjax.trunk_cache can cut its forward pass), `default_cam_layer` and `head_path`; see each
module's docstring for the stages.
"""

from collections.abc import Callable

from flax import linen as nn

from drjax import errors
from drjax.models import densenet, resnet, vgg
from drjax.models.common import init_variables, normalize

__all__ = ['MODEL_NAMES', 'get_model', 'init_variables', 'normalize']

_MODELS: dict[str, Callable[..., nn.Module]] = {
    'densenet121': densenet.DenseNet121,
    'densenet161': densenet.DenseNet161,
    'densenet169': densenet.DenseNet169,
    'densenet201': densenet.DenseNet201,
    'resnet18': resnet.ResNet18,
    'resnet34': resnet.ResNet34,
    'resnet50': resnet.ResNet50,
    'resnet101': resnet.ResNet101,
    'resnet152': resnet.ResNet152,
    'vgg11': vgg.VGG11,
    'vgg13': vgg.VGG13,
    'vgg16': vgg.VGG16,
    'vgg19': vgg.VGG19,
    'vgg11_bn': vgg.VGG11BN,
    'vgg13_bn': vgg.VGG13BN,
    'vgg16_bn': vgg.VGG16BN,
    'vgg19_bn': vgg.VGG19BN,
    'densenet_tiny': densenet.DenseNetTiny,
    'resnet_tiny': resnet.ResNetTiny,
    'vgg_tiny': vgg.VGGTiny,
}

MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def get_model(name: str, num_classes: int = 5, **kwargs) -> nn.Module:
  """Builds the named model.

  Args:
    name: one of MODEL_NAMES.
    num_classes: size of the classification head.
    **kwargs: other fields of the model class, e.g. `dtype=jnp.bfloat16`, or
      `conv_general_dilated=drjax.kernels.cpu_conv.make()` for the CPU convolutions.

  Returns:
    An unbound flax linen Module.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
  """
  if name not in _MODELS:
    raise errors.ConfigError(f'Unknown model {name!r}; expected one of: {", ".join(MODEL_NAMES)}')
  return _MODELS[name](num_classes=num_classes, **kwargs)
