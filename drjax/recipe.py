"""The training recipe shared by the three backbone configs (paper 2.3: same hyper-parameters).

Not a config itself: `configs/densenet.py`, `configs/resnet.py` and `configs/vgg.py`
call `get_config(arg, model=..., trainable=..., ...)` and lock the result. It lives
in the package so that the config files, which are loaded by path, can import it.
"""

from collections.abc import Sequence

import ml_collections as mlc

from drjax.data import augment, pipeline


def get_config(arg: str | None, *, model: str, trainable: Sequence[str], smoke_model: str,
               image_size: int, num_images: int, batch_size: int, num_steps: int,
               eval_every: int, checkpoint_every: int) -> mlc.ConfigDict:
  """The shared recipe; the keyword arguments are the per-backbone values.

  Args:
    arg: None for the default run, 'smoke' for a seconds-long run of the tiny
      variant (tests), 'paper' for the paper's full-scale recipe on EyePACS.
    model: `drjax.models` name.
    trainable: regexes of the trainable parameter paths (`drjax.freeze`).
    smoke_model: tiny variant used by 'smoke'.
    image_size, num_images, batch_size, num_steps, eval_every, checkpoint_every:
      the default (CPU-sized) run.

  Returns:
    An unlocked ConfigDict (the caller locks it).
  """
  if arg not in (None, '', 'smoke', 'paper'):
    raise ValueError(f"config argument must be empty, 'smoke' or 'paper', got {arg!r}")
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
  c.mixed_precision = 'float32'  # or 'bfloat16': bf16 compute, float32 master weights
  # The XLA:CPU convolutions (drjax.kernels.cpu_conv) when running on a CPU, where they train
  # 1.3-2.2x faster at 224 px (benchmarks/README.md); ignored on other backends.
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
  elif arg == 'paper':
    _paper_scale(c)
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
