"""The training recipe shared by the three backbone configs (paper 2.3: same hyper-parameters).

Not a config itself: `configs/densenet.py`, `configs/resnet.py` and `configs/vgg.py`
call `get_config(arg, model=..., trainable=..., ...)` and lock the result. It lives
in the package so that the config files, which are loaded by path, can import it.
"""

from collections.abc import Sequence

import ml_collections as mlc

from drjax import trunk_cache, weights
from drjax.data import augment, pipeline

# The named variants a config file can offer (`configs/densenet.py:study224`), each the
# default run with the changes of its function below.
VARIANTS = ('smoke', 'paper', 'cpu224', 'study224', 'idrid224', 'pretrain224', 'transfer224')


def get_config(arg: str | None, *, model: str, trainable: Sequence[str], smoke_model: str,
               image_size: int, num_images: int, batch_size: int, num_steps: int,
               eval_every: int, checkpoint_every: int,
               variants: Sequence[str] = ('smoke', 'paper', 'study224')) -> mlc.ConfigDict:
  """The shared recipe; the keyword arguments are the per-backbone values.

  Args:
    arg: None for the default run, else one of `variants`: 'smoke' (a seconds-long run of
      the tiny variant, for tests), 'paper' (the paper's full-scale recipe on EyePACS),
      'study224' (synthetic fundus at 224 px, the CAM study's classifier), 'idrid224'
      (IDRiD grading from a random init), 'pretrain224' (a large synthetic set, every
      layer: the stand-in for ImageNet pretraining), 'transfer224' (IDRiD, the paper's
      frozen recipe from the weights given in `weights.path`).
    model: `drjax.models` name.
    trainable: regexes of the trainable parameter paths (`drjax.freeze`).
    smoke_model: tiny variant used by 'smoke'.
    image_size, num_images, batch_size, num_steps, eval_every, checkpoint_every:
      the default (CPU-sized) run.
    variants: the arguments this backbone's config file offers (a subset of VARIANTS).

  Returns:
    An unlocked ConfigDict (the caller locks it).
  """
  if arg not in (None, '', *variants):
    raise ValueError(f'config argument must be empty or one of {", ".join(variants)}; '
                     f'got {arg!r}')
  c = mlc.ConfigDict()
  c.model = model
  c.num_classes = 5

  c.input = pipeline.default_config()  # synthetic_fundus by default: runs anywhere, offline
  c.input.image_size = image_size
  c.input.num_images = num_images
  c.input.num_workers = 2
  c.input.prefetch = 2

  # The paper's augmentations (rotation, flips, translation, grayscale, colour) are
  # ':paper''s. The default run keeps the lossless flips only: at 64 px a bilinear
  # rotation or shift smears the 1-2 px microaneurysms and dots the grades are read from.
  c.augment = augment.default_config()
  c.augment.update(rotation_deg=0.0, translate_frac=0.0, grayscale_prob=0.0, brightness=0.0,
                   contrast=0.0, saturation=0.0, hue=0.0)
  c.augment_enabled = True  # False: no augmentation in the train step

  c.optimizer = mlc.ConfigDict()
  c.optimizer.name = 'adam'  # paper: Adam, learning rate 1e-4 (constant), cross-entropy loss
  # The default run is ~300 steps on a CPU, mostly from a random init (no ImageNet
  # weights offline): a 10x larger peak rate with warm-up and cosine decay learns there in
  # minutes where the paper's constant 1e-4 does not. ':paper' restores 1e-4, constant.
  c.optimizer.lr = 1e-3
  c.optimizer.schedule = 'cosine'  # or 'constant' (paper); both warm up linearly
  c.optimizer.warmup_steps = 20
  c.batch_size = batch_size  # paper: 256
  c.eval_batch_size = batch_size
  c.num_steps = num_steps

  # Paper: the last block containing convolutions and the new head train, the
  # rest is frozen. '.*' trains everything; the head pattern alone is linear probing.
  c.trainable = tuple(trainable)
  # Frozen stages' BatchNorms use their running (ImageNet) statistics and are not
  # updated, as in PyTorch with those modules in eval(); False: batch statistics.
  c.frozen_bn_inference = True
  # The frozen trunk's output computed once per image and view and read from disk, so that a
  # step costs only the trainable layers (drjax.trunk_cache); on in the frozen recipes.
  c.trunk_cache = trunk_cache.default_config()
  c.mixed_precision = 'float32'  # or 'bfloat16': bf16 compute, float32 master weights
  # The XLA:CPU convolutions (drjax.kernels.cpu_conv) when running on a CPU, where they train
  # faster at 224 px (benchmarks/README.md); ignored on other backends.
  c.cpu_conv = True

  c.weights = mlc.ConfigDict()
  c.weights.pretrained = True  # look up ImageNet weights (drjax.weights.resolve)
  c.weights.path = ''  # explicit converted-weights dir or torchvision .pth; '' = look up
  # Without ImageNet weights a frozen random trunk is pointless: train all layers.
  c.weights.random_init_trains_all = True
  # ResNets only: start every residual branch at 0 (torchvision's zero_init_residual);
  # matters only for a random init, which pretrained weights replace.
  c.weights.zero_init_residual = False

  c.seed = 0
  c.log_every = 10
  c.eval_every = eval_every
  c.checkpoint_every = checkpoint_every
  c.keep_checkpoints = 3
  c.progress_bar = True
  c.gradcam = mlc.ConfigDict()
  c.gradcam.num_images = 4  # validation images in workdir/gradcam/panel.png (0: none)

  if arg == 'smoke':
    _shrink_to_smoke(c, smoke_model)
  elif arg:
    _VARIANT_FNS[arg](c)
  return c


def _shrink_to_smoke(c: mlc.ConfigDict, smoke_model: str) -> None:
  """A seconds-long run of the tiny variant, for tests."""
  c.model = smoke_model
  c.input.image_size = 32
  c.input.num_images = 48
  c.input.num_workers = 1
  c.input.prefetch = 1
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_steps = 6
  c.optimizer.warmup_steps = 1
  c.log_every = 2
  c.eval_every = 3
  c.checkpoint_every = 3
  c.weights.pretrained = False
  c.progress_bar = False
  c.gradcam.num_images = 2


def _paper_scale(c: mlc.ConfigDict) -> None:
  """Sections 2.3-2.3.3 at full scale: EyePACS at 224 px, batch 256, constant Adam 1e-4 and all
  of the paper's augmentations."""
  c.optimizer.update(lr=1e-4, schedule='constant', warmup_steps=0)
  c.augment = augment.default_config()
  c.input.dataset = 'eyepacs'
  c.input.image_size = 224
  c.input.stored_size = 512  # read the set scripts/prepare_data.py writes, resized on read
  c.input.num_workers = 16
  c.input.prefetch = 16
  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_steps = 11_000  # ~100 epochs of the 80% EyePACS train split (28.1k images)
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.trunk_cache.enabled = True  # 8 views of each training image (drjax.trunk_cache)


def _at_224(c: mlc.ConfigDict, *, batch_size: int, num_steps: int, warmup_steps: int,
            eval_every: int, checkpoint_every: int) -> None:
  """224 px (the paper's size: denseblock4 7x7), sized for a GPU, the paper's augmentations.

  At 224 px a 1-2 px lesion of the 64 px run is 4-7 px wide and survives a bilinear rotation
  or shift, so the paper's rotation, flips, translation, grayscale and colour jitter come back.
  """
  c.input.image_size = 224
  c.input.num_workers = 8
  c.input.prefetch = 8
  c.augment = augment.default_config()
  c.batch_size = batch_size
  c.eval_batch_size = 64
  c.num_steps = num_steps
  c.optimizer.update(lr=1e-3, schedule='cosine', warmup_steps=warmup_steps)
  c.log_every = 50
  c.eval_every = eval_every
  c.checkpoint_every = checkpoint_every
  c.gradcam.num_images = 8


def _from_scratch(c: mlc.ConfigDict) -> None:
  """A random init whatever weights the machine holds, every layer trained (said, not implied)."""
  c.weights.pretrained = False
  c.trainable = ('.*',)


def _cpu224(c: mlc.ConfigDict) -> None:
  """Synthetic fundus at 224 px sized for a 2-core CPU: 2400 images (1920 train, 480 validation).

  Batch 16 for 600 steps (5 epochs), Adam 1e-3 with a 20-step warm-up and cosine decay, the
  default run's flips only, every layer from a random init. The default 800 images overfit at
  224 px; three times as many reach the study's kappa within the hour (docs/cpu224_trials.md).
  """
  c.input.image_size = 224
  c.input.num_images = 2400
  c.num_steps = 600
  c.eval_every = 150
  c.checkpoint_every = 150
  c.gradcam.num_images = 8
  _from_scratch(c)


def _study224(c: mlc.ConfigDict) -> None:
  """The CAM study's classifier: 8000 synthetic images (6400 train, 1600 validation) at 224 px.

  Batch 32 for 6000 steps is 30 epochs of the training split, Adam 1e-3 with a 300-step
  warm-up and cosine decay: the 64 px run's schedule (kappa ~0.7 after ~7 epochs of 640
  images) with 10x the images and 4x the epochs, which a from-scratch DenseNet needs and the
  paper's augmentations keep from overfitting. From a random init, every layer.
  """
  _at_224(c, batch_size=32, num_steps=6000, warmup_steps=300, eval_every=500,
          checkpoint_every=1000)
  c.input.num_images = 8000
  _from_scratch(c)


def _pretrain224(c: mlc.ConfigDict) -> None:
  """The stand-in for ImageNet pretraining: 20000 synthetic images at 224 px, every layer.

  Batch 64 for 10000 steps (40 epochs of the 16000 training images). The set has its own
  seed, so that the study224 set's images are none of its training images.
  """
  _at_224(c, batch_size=64, num_steps=10_000, warmup_steps=500, eval_every=1000,
          checkpoint_every=1000)
  c.input.num_images = 20_000
  c.input.synthetic_seed = 1
  _from_scratch(c)


def _idrid(c: mlc.ConfigDict) -> None:
  """IDRiD grading (413 training photographs: 330 train, 83 validation; the 103 of its test
  set as the 'test' split when present), built at 224 px from `input.manual_dir`.

  Uniform sampling: IDRiD's grade mix (about 33/5/33/18/12 %) is not EyePACS's (73/7/15/2/2 %),
  whose oversampling weights would over-draw its grade 3 and 4 images 30-40 times more than
  its grade 0 ones. Batch 32 for 3000 steps is about 290 epochs of the 330 training images,
  with the paper's augmentations against overfitting so small a set.
  """
  _at_224(c, batch_size=32, num_steps=3000, warmup_steps=150, eval_every=250,
          checkpoint_every=500)
  c.input.dataset = 'idrid'
  c.input.idrid_task = 'grading'
  c.input.class_weights = (1.0, 1.0, 1.0, 1.0, 1.0)


def _idrid224(c: mlc.ConfigDict) -> None:
  """IDRiD grading from a random init, every layer: transfer224's baseline without pretraining."""
  _idrid(c)
  _from_scratch(c)


def _transfer224(c: mlc.ConfigDict) -> None:
  """IDRiD grading with the paper's frozen recipe, from the weights in `weights.path`.

  The backbone's paper patterns stay trainable (DenseNet121: the head, norm5 and
  denselayer14-16), the rest frozen with its BatchNorms on their running statistics, and the
  paper's Adam 1e-4, constant. `weights.path` must be given (`weights.REQUIRED_PATH` makes an
  empty one an error at run time rather than an ImageNet lookup or a silent random init).
  """
  _idrid(c)
  c.optimizer.update(lr=1e-4, schedule='constant', warmup_steps=0)
  c.weights.pretrained = True
  c.weights.path = weights.REQUIRED_PATH
  c.trunk_cache.enabled = True  # 8 views of each of the 330 training images


_VARIANT_FNS = {
    'paper': _paper_scale,
    'cpu224': _cpu224,
    'study224': _study224,
    'idrid224': _idrid224,
    'pretrain224': _pretrain224,
    'transfer224': _transfer224,
}
