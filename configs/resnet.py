r"""ResNet101, one of the paper's three compared backbones (section 2.3, Table 1).

  python scripts/train.py --config configs/resnet.py             # default CPU run
  python scripts/train.py --config configs/resnet.py:smoke       # seconds, tiny model (tests)
  python scripts/train.py --config configs/resnet.py:paper --config.input.manual_dir=...
  python scripts/train.py --config configs/resnet.py:study224    # Table 1 at 224 px (GPU)

Recipe: ImageNet ResNet101 with a new 5-way `fc`; trainable are the last block
containing convolutions (`layer4`) and `fc`, everything else frozen (frozen
BatchNorms use their running statistics); the same optimizer, data and split as
configs/densenet.py (the paper selects them identically for the three backbones).

Default run: the same data and schedule as configs/densenet.py (800 synthetic images at
64 px, batch 16, 300 steps). From a random init every residual branch starts at 0
(`weights.zero_init_residual`, torchvision's zero_init_residual), without which ResNet101
does not learn in a few hundred steps. It costs about 2.5x DenseNet121's FLOPs per image.
`:paper` is EyePACS at 224 px, batch 256 (see configs/densenet.py).

`:study224` is configs/densenet.py:study224's data and schedule (8000 synthetic images at
224 px, batch 32, 6000 steps, every layer from a random init, zero-initialised residual
branches), for Table 1 at 224 px (configs/sweeps/paper224.py). Expect it near DenseNet121's
kappa; it costs about 2.5x its time.
"""

from drjax import recipe


def get_config(arg=None):
  config = recipe.get_config(
      arg, model='resnet101', smoke_model='resnet_tiny',
      trainable=('fc/.*', 'layer4/.*'),
      image_size=64, num_images=800, batch_size=16, num_steps=300, eval_every=100,
      checkpoint_every=100)
  config.weights.zero_init_residual = True  # only used without pretrained weights
  config.lock()
  return config
