"""Model registry: flax linen ports of torchvision's DenseNet, ResNet and VGG.

    model = models.get_model('densenet121', num_classes=5)
    variables = model.init(rng, images, train=False)  # {'params', 'batch_stats'}
    logits = model.apply(variables, images, train=False)

Every model exposes `stage_names` (its named taps, in forward order),
`default_cam_layer` and `head_path`; see each module's docstring for the stages.
For many forward passes with the same weights (Grad-CAM over a dataset),
`with_winograd_kernels` computes what the CPU convolutions derive from the weights once.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from drjax.models import densenet, layers, resnet, vgg

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
    **kwargs: other fields of the model class, e.g. `dtype=jnp.bfloat16`.

  Returns:
    An unbound flax linen Module.

  Raises:
    ValueError: for an unknown name (the message lists the valid ones).
  """
  if name not in _MODELS:
    raise ValueError(f'Unknown model {name!r}; expected one of: {", ".join(MODEL_NAMES)}')
  return _MODELS[name](num_classes=num_classes, **kwargs)


def with_winograd_kernels(model: nn.Module, variables: dict) -> dict:
  """`variables` plus the 'winograd' collection, for many forward passes with these weights.

  On a CPU most 3x3 stride-1 convolutions with 64 or more input channels run as
  Winograd F(2x2, 3x3) (`layers._winograd_path`), whose 16 transformed kernels are
  otherwise computed from `params` in every call, on every device: 130 MB a device for
  ResNet101. With the collection each convolution reads them instead. ResNet101 at
  224 px, batch 4 split over two one-core devices, paired calls: the forward 310 -> 296
  ms, Grad-CAM 322 -> 306 ms. The outputs are the same (bitwise in the tests), and
  gradients with respect to `params` still go through the transform.
  `drjax.cam_study.compute_heatmaps`, `drjax.train.evaluate` and the Grad-CAM and eval
  benchmarks use it; `apply` takes the result as it takes `variables`.

  The kernels are those of `variables['params']` as passed: after changing the
  parameters, call it again (training never carries the collection). On other
  backends, and for models without such convolutions, `variables` come back as they
  are. The collection holds (16/9)x the parameters of those convolutions.

  Args:
    model: a drjax model.
    variables: its `{'params', 'batch_stats'}` (any earlier 'winograd' is replaced).

  Returns:
    `variables` with 'winograd' added where the model has Winograd convolutions.
  """
  variables = {k: v for k, v in variables.items() if k != layers.WINOGRAD_COLLECTION}
  if jax.default_backend() != 'cpu':  # Winograd is the CPU path only
    return variables
  return {**variables, **_winograd_collection(model, variables)}


@functools.partial(jax.jit, static_argnames='model')
def _winograd_collection(model: nn.Module, variables: dict) -> dict:
  # Which convolutions take Winograd follows from their kernels alone, so any image that
  # every stage of the three architectures accepts will do; XLA drops the forward pass
  # itself, as nothing reads its output.
  images = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return model.apply(variables, images, train=False, mutable=[layers.WINOGRAD_COLLECTION])[1]
