r"""ResNet101, one of the paper's three compared backbones (section 2.3, Table 1).

  python scripts/train.py --config configs/resnet.py             # default CPU run
  python scripts/train.py --config configs/resnet.py:smoke       # seconds, tiny model (tests)
  python scripts/train.py --config configs/resnet.py:paper --config.input.manual_dir=...

Recipe: ImageNet ResNet101 with a new 5-way `fc`; trainable are the last block
containing convolutions (`layer4`) and `fc`, everything else frozen (frozen
BatchNorms use their running statistics); the same optimizer, data and split as
configs/densenet.py (the paper selects them identically for the three backbones).

Default run: the same data and schedule as configs/densenet.py (800 synthetic
images at 64 px, batch 16, 300 steps, Adam peaking at 1e-3, flips only). From a
random init it starts every residual branch at 0 (`weights.zero_init_residual`,
torchvision's zero_init_residual): without it ResNet101 did not learn in 200 CPU
steps (gradient norm ~1500, kappa ~0); with it, the default 300-step run reached
validation kappa 0.67-0.69 (README). ResNet101 needs about 2.5x DenseNet121's FLOPs:
the run took 6 minutes on 2 CPU cores, against DenseNet121's 4 (README, "The paper's
comparison"). `:paper` is EyePACS at 224 px, batch 256 (see configs/densenet.py).
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
