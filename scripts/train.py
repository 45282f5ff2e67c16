r"""Trains and evaluates a DR grading backbone (drjax.train.train_and_evaluate).

  python scripts/train.py --config configs/densenet.py [--workdir DIR] \
      [--config.optimizer.lr=3e-4 --config.input.dataset=idrid ...]

Every config field is an absl flag (`--config.FIELD=VALUE`); a mistyped field is
an error. Without --workdir the run goes to workdirs/<model>_<UTC timestamp>.
Re-running with the same --workdir resumes from its latest checkpoint.
"""

import datetime
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/densenet.py[:smoke].',
                                lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Output directory (resumes if it holds a checkpoint). Default: '
                    'workdirs/<model>_<UTC timestamp>.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from drjax import train

  config = FLAGS.config
  workdir = FLAGS.workdir
  if workdir is None:
    stamp = datetime.datetime.now(datetime.UTC).strftime('%Y%m%d_%H%M%S')
    workdir = str(pathlib.Path('workdirs') / f'{config.model}_{stamp}')
  logging.info('workdir: %s', workdir)
  print(f'workdir: {workdir}', flush=True)
  train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main)
