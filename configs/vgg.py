r"""VGG16, one of the paper's three compared backbones (section 2.3, Table 1).

  python scripts/train.py --config configs/vgg.py                # default CPU run
  python scripts/train.py --config configs/vgg.py:smoke          # seconds, tiny model (tests)
  python scripts/train.py --config configs/vgg.py:paper --config.input.manual_dir=...
  python scripts/train.py --config configs/vgg.py:study224       # Table 1 at 224 px (GPU)

Recipe: ImageNet VGG16 (no BatchNorm) with a new 5-way last `classifier` layer;
trainable are the last block containing convolutions, conv5_1-conv5_3
(torchvision `features/24`, `features/26`, `features/28`), and the classifier
(its three linear layers, `classifier/0`, `/3`, `/6`), everything else frozen;
the same optimizer, data and split as configs/densenet.py.

Default run: the same data and schedule as configs/densenet.py (800 synthetic images at
64 px, batch 16, 300 steps); VGG16 costs about 5x DenseNet121's FLOPs per image. Without
BatchNorm and from a random init it does not learn on this budget (its loss stays at ln 5
and it predicts one grade): it needs the ImageNet weights the paper starts from. `:paper`
is EyePACS at 224 px, batch 256 (see configs/densenet.py).

`:study224` is configs/densenet.py:study224's data and schedule (8000 synthetic images at
224 px, batch 32, 6000 steps, every layer from a random init) with Adam peaking at 1e-4
instead of 1e-3: a VGG without BatchNorm stalls at ln 5 from a random init at 1e-3 (above).
Whether it learns at 1e-4 in 6000 steps is untested; if its loss stays at ln 5 the run says
so in Table 1 (kappa 0).
"""

from drjax import recipe


def get_config(arg=None):
  config = recipe.get_config(
      arg, model='vgg16', smoke_model='vgg_tiny',
      trainable=('classifier/.*', 'features/(24|26|28)/.*'),
      image_size=64, num_images=800, batch_size=16, num_steps=300, eval_every=100,
      checkpoint_every=100)
  if arg == 'smoke':
    # vgg_tiny numbers its features differently (it has BatchNorms).
    config.trainable = ('classifier/.*',)
  elif arg == 'study224':
    # No BatchNorm: from a random init Adam at 1e-3 leaves VGG16 at chance.
    config.optimizer.lr = 1e-4
  config.lock()
  return config
