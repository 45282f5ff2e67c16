r"""Reproduces the paper's Table 1 and Figures 1-3 from finished training runs.

  python scripts/compare.py --workdirs runs/densenet runs/resnet runs/vgg --out=runs/compare
  python scripts/compare.py --root=/tmp/paper          # every run under a sweep root

Writes OUT/table1.md (sensitivity, specificity, accuracy, AUC, kappa per backbone, and the
paper's figures for reference) and OUT/loss_curves.png (raw + TensorBoard-smoothed
training loss, one panel per run). OUT defaults to ROOT/compare, or ./compare.
"""

import os

from absl import app, flags

from drjax import compare, runtime, sweep

_WORKDIRS = flags.DEFINE_list(
    'workdirs', [], 'Run workdirs, comma- or space-separated (--workdirs A B C).')
_ROOT = flags.DEFINE_string('root', None, 'Use every run workdir directly under this directory.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_SMOOTHING = flags.DEFINE_float('smoothing', 0.6, 'TensorBoard smoothing weight in [0, 1).')
_THRESHOLD = flags.DEFINE_integer(
    'threshold_grade', None, 'Binary problem grade >= T for Table 1 (default: the first one '
    'each run reported, i.e. referable DR, grade >= 2).')


def main(argv):
  # absl leaves `B C` of `--workdirs A B C` as positional arguments: they are workdirs too.
  workdirs = list(_WORKDIRS.value) + list(argv[1:])
  if _ROOT.value:
    workdirs += sweep.find_workdirs(_ROOT.value)
  if not workdirs:
    raise app.UsageError('give --workdirs and/or --root')
  missing = [w for w in workdirs if not os.path.isdir(w)]
  if missing:
    raise app.UsageError(f'not a directory: {missing}')
  out = _OUT.value or os.path.join(_ROOT.value or '.', 'compare')
  result = compare.compare(workdirs, out, smoothing=_SMOOTHING.value,
                           threshold_grade=_THRESHOLD.value)
  print(result['table'])
  print(f"table: {result['table_path']}\nfigure: {result['figure_path']}")


if __name__ == '__main__':
  runtime.run(main)
