r"""DenseNet121, the paper's chosen model (sections 2.3 and 2.3.3).

  python scripts/train.py --config configs/densenet.py            # default CPU run
  python scripts/train.py --config configs/densenet.py:smoke      # seconds, tiny model (tests)
  python scripts/train.py --config configs/densenet.py:paper \
      --config.input.manual_dir=/path/to/eyepacs                  # full scale, see below

Recipe: ImageNet DenseNet121 with a new 5-way `classifier`; trainable are the head, `norm5`
and the last three dense layers of `denseblock4` (denselayer14-16), everything else frozen
(frozen BatchNorms use their running statistics); Adam, cross-entropy, 80/20 split, the
paper's per-grade oversampling weights (0.1, 1, 0.5, 3, 4).

Default run: 800 synthetic fundus images at 64 px, batch 16, 300 steps, sized for a 2-core
CPU (expect validation kappa about 0.7 in about 5 minutes). Without ImageNet weights it
warns loudly and trains every layer from a random init (`weights.random_init_trains_all`),
so it departs from the paper in two places that let a few CPU minutes learn: Adam peaks at
1e-3 with a 20-step warm-up and cosine decay (paper: constant 1e-4), and only the lossless
flips augment (at 64 px a rotation or shift smears the 1-2 px lesions the grades are read
from). With ImageNet weights (drjax.weights.resolve) the paper's freezing applies.

`:paper` is the paper's full scale: EyePACS at 224 px, batch 256, about 100 epochs, constant
Adam 1e-4 and all of the paper's augmentations (`drjax.data.augment.default_config()`).

Trainable layers are one flag: `--config.trainable="('.*',)"` (everything),
`--config.trainable="('classifier/.*',)"` (head only).
"""

from drjax import recipe


def get_config(arg=None):
  config = recipe.get_config(
      arg, model='densenet121', smoke_model='densenet_tiny',
      trainable=(
          'classifier/.*',
          'features/norm5/.*',
          'features/denseblock4/denselayer1[4-6]/.*',
      ),
      image_size=64, num_images=800, batch_size=16, num_steps=300, eval_every=100,
      checkpoint_every=100)
  if arg == 'smoke':
    # densenet_tiny has a single layer in denseblock4.
    config.trainable = ('classifier/.*', 'features/norm5/.*', 'features/denseblock4/.*')
  config.lock()
  return config
