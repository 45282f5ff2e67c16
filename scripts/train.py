r"""Trains and evaluates a DR grading backbone (drjax.train.train_and_evaluate).

  python scripts/train.py --config configs/densenet.py [--workdir DIR] \
      [--config.optimizer.lr=3e-4 --config.input.dataset=idrid ...]

Every config field is an absl flag (`--config.FIELD=VALUE`); a mistyped field is
an error. Without --workdir the run goes to workdirs/<model>_<UTC timestamp>.
Re-running with the same --workdir resumes from its latest checkpoint.

Several processes (hosts) train one model together: start the same command on
each with --coordinator_address=HOST0:PORT --num_processes=N --process_id=I, or
under `srun`/`mpirun`, where all three are detected (see drjax/distributed.py).
"""

import datetime
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from drjax import distributed, runtime, train

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/densenet.py[:smoke].',
                                lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Output directory (resumes if it holds a checkpoint). Default: '
                    'workdirs/<model>_<UTC timestamp>.')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-process runs: host:port of process 0 (env DRJAX_COORDINATOR_ADDRESS); '
                    'detected under srun/mpirun.')
flags.DEFINE_integer('num_processes', None,
                     'Multi-process runs: number of processes (env DRJAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None,
                     'Multi-process runs: rank of this process, 0..N-1 (env DRJAX_PROCESS_ID).')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                  'auto: join a multi-process run when the flags/env/srun/mpirun ask for more '
                  'than one process; on: always call jax.distributed.initialize (TPU pods, '
                  'Kubernetes); off: never.')
flags.DEFINE_integer('heartbeat_timeout', 100,
                     'Multi-process runs: seconds after which a silent process is declared dead '
                     'and the others stop with an error.')
flags.DEFINE_integer('initialization_timeout', 300,
                     'Multi-process runs: seconds to wait for all processes to connect.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before anything touches a device.
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         mode=FLAGS.distributed, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
                         initialization_timeout_seconds=FLAGS.initialization_timeout)
  config = FLAGS.config
  workdir = FLAGS.workdir
  if workdir is None:
    stamp = datetime.datetime.now(datetime.UTC).strftime('%Y%m%d_%H%M%S')
    stamp = distributed.broadcast_str('workdir_stamp', stamp)  # one workdir for all processes
    workdir = str(pathlib.Path('workdirs') / f'{config.model}_{stamp}')
  logging.info('workdir: %s', workdir)
  print(f'workdir: {workdir}', flush=True)
  with distributed.peer_failure_context():
    train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  runtime.run(main)
