r"""Evaluates a saved training run on a split of its dataset, or of another configured one.

  python scripts/evaluate.py --workdir RUN [--split validation|test|train] [--out FILE]
  # another dataset: take the `input` block of a config file, with overrides
  python scripts/evaluate.py --workdir RUN --config configs/densenet.py \
      --config.input.dataset=idrid --config.input.manual_dir=/path/to/idrid

Writes drjax.metrics.classification_report (5-class accuracy, confusion matrix,
quadratic weighted kappa, per-grade and referable/any-DR sensitivity, specificity,
accuracy, AUC) as JSON, by default to RUN/eval_<dataset>_<split>.json, and prints
the headline numbers.
"""

import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

from drjax import evaluate, runtime

flags.DEFINE_string('workdir', None, 'Training run directory (scripts/train.py).',
                    required=True)
flags.DEFINE_enum('split', 'validation', ['validation', 'test', 'train'],
                  'Split of the dataset (validation = the held-out 20% of the run).')
config_flags.DEFINE_config_file(
    'config', None, 'Optional config file whose `input` block (with --config.input.* '
    'overrides) replaces the run\'s, to evaluate on another dataset.', lock_config=True)
flags.DEFINE_integer('batch_size', None, 'Evaluation batch size (default: the run\'s).')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
flags.DEFINE_string('out', None, 'Output JSON (default: RUN/eval_<dataset>_<split>.json).')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  report = evaluate.evaluate_run(FLAGS.workdir, split=FLAGS.split,
                              config_input=FLAGS.config.input if FLAGS.config else None,
                              batch_size=FLAGS.batch_size, step=FLAGS.step)
  out = FLAGS.out or str(pathlib.Path(FLAGS.workdir) /
                         f'eval_{report["dataset"]}_{FLAGS.split}.json')
  pathlib.Path(out).write_text(json.dumps(report, indent=2, sort_keys=True))
  print(f'{report["dataset"]}/{FLAGS.split} ({report["num_examples"]} images): '
        f'kappa={report["kappa"]:.3f} accuracy={report["accuracy"]:.3f} '
        f'referable sens={report["referable"]["sensitivity"]:.3f} '
        f'spec={report["referable"]["specificity"]:.3f} -> {out}', flush=True)


if __name__ == '__main__':
  runtime.run(main)
