r"""Writes a finished training run's variables as a weights directory (drjax.weights.export_run).

  python scripts/export_weights.py --workdir RUN --output WEIGHTS_DIR [--keep_head] [--step N]
  python scripts/train.py --config configs/densenet.py:transfer224 \
      --config.weights.path=WEIGHTS_DIR --config.input.manual_dir=/path/to/idrid

writes WEIGHTS_DIR/variables.msgpack, which `--config.weights.path` (drjax.weights.resolve)
loads. The run's 5-way head is dropped unless --keep_head, so that the fine-tune puts a new,
freshly initialised head on the pretrained trunk, as the paper does on ImageNet's.
"""

from absl import flags

from drjax import runtime, weights

flags.DEFINE_string('workdir', None, 'A finished run of scripts/train.py.', required=True)
flags.DEFINE_string('output', None, 'The weights directory to write.', required=True)
flags.DEFINE_bool('keep_head', False, 'Keep the run\'s classification head.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  path = weights.export_run(FLAGS.workdir, FLAGS.output, keep_head=FLAGS.keep_head,
                            step=FLAGS.step)
  print(f'weights: {path}')


if __name__ == '__main__':
  runtime.run(main)
