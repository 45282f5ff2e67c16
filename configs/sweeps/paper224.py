r"""The paper's comparison (Table 1, Figures 1-3) at its 224 px: the three backbones' `:study224`.

  python scripts/sweep.py --root=runs/paper224 --sweep=configs/sweeps/paper224.py
  python scripts/compare.py --root=runs/paper224

8000 synthetic fundus images at 224 px, 6000 steps each, every layer from a random init (see
configs/densenet.py); sized for a GPU: on a 2-core CPU the three runs take days.
"""


def get_sweep():
  return [dict(config=f'configs/{name}.py:study224') for name in ('densenet', 'resnet', 'vgg')]
