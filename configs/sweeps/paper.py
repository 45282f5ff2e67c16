r"""The paper's comparison (Table 1, Figures 1-3): the three backbones, same recipe.

  python scripts/sweep.py --root=runs/paper --sweep=configs/sweeps/paper.py
  python scripts/compare.py --root=runs/paper

Add `--grid='config.input.dataset=idrid' --grid='config.input.manual_dir=...'` (one value
each) to run it on real data; every config override of scripts/train.py works as a grid axis.
"""


def get_sweep():
  return [dict(config=f'configs/{name}.py') for name in ('densenet', 'resnet', 'vgg')]
