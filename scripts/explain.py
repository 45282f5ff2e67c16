r"""Grad-CAM (or another CAM method) heatmaps for fundus images of a trained run.

  python scripts/explain.py --workdir RUN --images FILES_OR_DIR [--masks DIR] \
      --method gradcam --layer denseblock4 --out DIR

Writes, per image, the paper's Figure 5 (fundus | heatmap | overlay) as
`<stem>_<method>.png`, all heatmaps as `heatmaps_<method>.npz` ([S, S] float32 in
[0, 1] per image stem) and `scores_<method>.json` (predicted grade, and with
--masks the localisation scores per lesion type, see drjax.localize). Images are
cropped to the field of view and resized to the run's input size, as in
training. Masks: `<stem>.npz` with 'masks' [H, W, 5] (MA, HE, EX, SE, NV) or
IDRiD-style `<stem>_MA.tif`, `<stem>_HE.tif`, ... anywhere under DIR.
"""

from absl import flags

from drjax import evaluate, explain, gradcam, runtime

flags.DEFINE_string('workdir', None, 'Training run (drjax.evaluate.load_run).', required=True)
flags.DEFINE_list('images', None, 'Image files and/or folders.', required=True)
flags.DEFINE_string('masks', None, 'Folder of lesion masks (optional).')
flags.DEFINE_string('method', 'gradcam', 'A key of drjax.gradcam.METHODS.')
flags.DEFINE_string('layer', None, 'Stage name; default: the model\'s default CAM layer.')
flags.DEFINE_string('target', 'predicted',
                    "'predicted', 'referable' (P(grade >= 2)) or a grade 0-4.")
flags.DEFINE_float('tolerance', 15, 'Pointing-game tolerance in pixels.')
flags.DEFINE_string('out', None, 'Output folder.', required=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config, model, variables = evaluate.load_run(FLAGS.workdir)
  targets = {'predicted': None, 'referable': gradcam.referable_dr_target}.get(FLAGS.target)
  if targets is None and FLAGS.target != 'predicted':
    targets = [int(FLAGS.target)]
  report = explain.explain(
      model, variables, explain.list_images(FLAGS.images), FLAGS.out,
      image_size=config.input.image_size, method=FLAGS.method, layer=FLAGS.layer,
      masks_dir=FLAGS.masks, targets=targets, tolerance=FLAGS.tolerance,
      btgraham=bool(config.input.get('btgraham', False)))
  print(f'{len(report["images"])} images -> {FLAGS.out}')
  if 'mean' in report:
    for lesion, s in report['mean'].items():
      print(f'  {lesion}: n={s["n"]} pointing={s["pointing"]:.3f} mass={s["mass"]:.3f} '
            f'auroc={s["auroc"]:.3f} ap={s["ap"]:.3f}')


if __name__ == '__main__':
  runtime.run(main)
