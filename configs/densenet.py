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

`:cpu224` is the paper's 224 px input (denseblock4 a 7x7 map) sized for a 2-core CPU, the
CAM study's classifier and Table 1's DenseNet121 row at 224 px (drjax/recipe.py says why):

  python scripts/train.py --config configs/densenet.py:cpu224
      # 2400 synthetic images (1920 train), batch 16, 600 steps, the default run's schedule and
      # flips, every layer from a random init; docs/cpu224_trials.md has the trials behind it.

The other 224 px variants are sized for a GPU; on a 2-core CPU each is many hours. All use
the paper's augmentations (at 224 px a lesion is 4-7 px wide and survives a rotation);
drjax/recipe.py says why each size was chosen:

  python scripts/train.py --config configs/densenet.py:study224
      # 8000 synthetic images (6400 train), batch 32, 6000 steps, Adam 1e-3 cosine, every
      # layer from a random init: the GPU-sized CAM study classifier and Table 1 at 224 px
      # (configs/sweeps/paper224.py). Its target: validation kappa >= 0.85, referable AUC >= 0.95.
  python scripts/train.py --config configs/densenet.py:idrid224 \
      --config.input.manual_dir=/path/to/idrid
      # IDRiD grading (330 train / 83 validation photographs), uniform sampling, batch 32,
      # 3000 steps, every layer from a random init: the baseline of transfer224. Expect a weak
      # classifier (kappa well below study224's): 330 images are little to learn from scratch.
  python scripts/train.py --config configs/densenet.py:pretrain224
      # the stand-in for ImageNet pretraining: 20000 synthetic images, batch 64, 10000 steps,
      # every layer from a random init. Export it for transfer224:
      #   python scripts/export_weights.py --workdir RUN --output WEIGHTS_DIR
  python scripts/train.py --config configs/densenet.py:transfer224 \
      --config.input.manual_dir=/path/to/idrid --config.weights.path=WEIGHTS_DIR
      # IDRiD with the paper's frozen recipe (head + norm5 + denselayer14-16 trainable, Adam 1e-4
      # constant) from WEIGHTS_DIR, with a new head (export_weights drops the old one unless
      # --keep_head). Without --config.weights.path it stops with an error. Expect it to beat
      # idrid224 if the synthetic features transfer.

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
      checkpoint_every=100, variants=recipe.VARIANTS)
  if arg == 'smoke':
    # densenet_tiny has a single layer in denseblock4.
    config.trainable = ('classifier/.*', 'features/norm5/.*', 'features/denseblock4/.*')
  config.lock()
  return config
