r"""DenseNet121, the paper's chosen model (sections 2.3 and 2.3.3).

  python scripts/train.py --config configs/densenet.py            # default CPU run
  python scripts/train.py --config configs/densenet.py:smoke      # seconds, tiny model (tests)
  python scripts/train.py --config configs/densenet.py:paper \
      --config.input.manual_dir=/path/to/eyepacs                  # full scale, see below

Recipe: ImageNet DenseNet121 with a new 5-way `classifier`; trainable are the
head, `norm5` and the last three dense layers of `denseblock4`
(denselayer14-16), everything else frozen (frozen BatchNorms use their running
statistics); Adam, cross-entropy, 80/20 split, the paper's per-grade
oversampling weights (0.1, 1, 0.5, 3, 4).

Default run: 800 synthetic fundus images at 64 px, batch 16, 300 steps, sized
for a 2-core CPU, where XLA's compilation of the full DenseNet121 train step
alone takes over a minute. It departs from the paper in two places, both so that
a few minutes of CPU learn (README, "The default run"): Adam peaks at 1e-3 with
a 20-step warm-up and cosine decay (paper: constant 1e-4), and only the lossless
flips augment the 64 px images (paper: also rotation, translation, grayscale and
colour). Without ImageNet weights (none are shipped; drjax.weights.resolve
looks them up) the run warns loudly and trains all layers from a random init
(`weights.random_init_trains_all`); with them the paper's freezing applies.

Full scale (paper): `:paper` = EyePACS at 224 px, batch 256, ~100 epochs, constant
Adam 1e-4 and all the paper's augmentations; the same as `--config.input.dataset=eyepacs
--config.input.image_size=224 --config.batch_size=256 --config.eval_batch_size=256
--config.num_steps=11000 --config.optimizer.lr=1e-4 --config.optimizer.schedule=constant
--config.optimizer.warmup_steps=0` plus the augmentation fields of
`drjax.data.augment.default_config()`.

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
