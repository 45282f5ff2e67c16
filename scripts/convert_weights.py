r"""Converts a torchvision checkpoint into drjax variables (see drjax.weights).

  python scripts/convert_weights.py --arch densenet121 \
      --torch_checkpoint ~/.cache/torch/hub/checkpoints/densenet121-a639ec97.pth \
      --output /tmp/densenet121

writes /tmp/densenet121/variables.msgpack, which `drjax.weights.load('densenet121',
'/tmp/densenet121')` reads back (and `weights.path` in a training config accepts).
`.safetensors` checkpoints are read without torch. By default the checkpoint's
own head (ImageNet's 1000 classes) is kept; `--num_classes 5` drops a head of
another size, to be initialised freshly when training.
"""

from absl import flags, logging

from drjax import models, runtime, weights

flags.DEFINE_enum('arch', None, list(models.MODEL_NAMES), 'Architecture.', required=True)
flags.DEFINE_string('torch_checkpoint', None, 'torchvision state_dict (.pth or .safetensors).',
                    required=True)
flags.DEFINE_string('output', None, 'Output directory.', required=True)
flags.DEFINE_integer('num_classes', None, 'Head size to keep (default: the checkpoint\'s).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  state_dict = weights.read_state_dict(FLAGS.torch_checkpoint)
  num_classes = FLAGS.num_classes or weights.checkpoint_num_classes(FLAGS.arch, state_dict)
  variables = weights.from_torchvision(FLAGS.arch, state_dict, num_classes=num_classes)
  path = weights.save(variables, FLAGS.output, arch=FLAGS.arch)
  logging.info('Wrote %s', path)


if __name__ == '__main__':
  runtime.run(main)
