r"""The lesion-localisation study: CAM method x layer x lesion type, and the area argument.

  python scripts/cam_study.py --workdir RUN --dataset synthetic_fundus --out DIR
  python scripts/cam_study.py --workdir RUN --dataset idrid \
      --idrid_dir /path/to/idrid --out DIR

Several --workdir runs (DenseNet, ResNet, VGG) give one section each. Writes
DIR/report.md (tables + conclusion computed from them), DIR/<arch>/results.json
and DIR/<arch>/figure_grid.png. The controls (on unless --controls=false) recompute
every map with the head, then the layers above each stage, re-initialised (Adebayo et
al. 2018's cascade) and for an untrained network, and report how much the maps
change (rank correlation, SSIM) and how they localise. A smoke run (`python
scripts/train.py --config configs/densenet.py:smoke --workdir RUN`) is enough to
exercise it; its numbers then describe an untrained classifier, which the report says.
"""

from absl import flags

from drjax import cam_study, errors, gradcam, runtime

flags.DEFINE_multi_string('workdir', None, 'Training run(s).', required=True)
flags.DEFINE_enum('dataset', 'synthetic_fundus', ['synthetic_fundus', 'idrid'], 'Masks source.')
flags.DEFINE_string('idrid_dir', None, 'Raw IDRiD folder (with "A. Segmentation").')
flags.DEFINE_integer('num_images', 16, 'Images with lesion masks.')
flags.DEFINE_list('methods', 'gradcam,gradcam++,hirescam,xgradcam,layercam',
                  'Layer methods, keys of drjax.gradcam.METHODS, or "all" (every layer method, '
                  'randomcam the chance row).')
flags.DEFINE_list('pixel_methods', 'gradients',
                  'Pixel-level methods scored at the input (gradients, guided_backprop, '
                  'guided_gradcam, fullgrad, sess, smoothgrad, integrated_gradients) or "all".')
flags.DEFINE_integer('slow_images', None, 'Images for the methods that take a pass per '
                     'channel or window (scorecam, ablationcam, sess); default: all. The '
                     'controls leave them out.')
flags.DEFINE_integer('image_size', None, 'Default: the run\'s input size.')
flags.DEFINE_float('tolerance', None, 'Pointing-game tolerance in pixels of the input '
                   '(default: 15 px at 224 px, scaled to the input size).')
flags.DEFINE_integer('faithfulness_images', 4, 'Images for deletion/insertion (0: skip).')
flags.DEFINE_integer('seed', 1000, 'First synthetic seed.')
flags.DEFINE_bool('controls', True, 'Also the randomisation cascade (head, then the layers '
                  'above each stage) and an untrained network, each scored like the trained '
                  'model (--controls=false: skip; they recompute every map once per step).')
flags.DEFINE_string('out', None, 'Output folder.', required=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  methods = cam_study.ALL_METHODS if FLAGS.methods == ['all'] else FLAGS.methods
  pixel_methods = (cam_study.ALL_PIXEL_METHODS if FLAGS.pixel_methods == ['all']
                   else FLAGS.pixel_methods)
  for name in (*methods, *pixel_methods):
    if name not in gradcam.METHODS:
      raise errors.ConfigError(f'unknown method {name!r}; valid: {", ".join(gradcam.METHODS)}')
  path = cam_study.run_workdirs(
      FLAGS.workdir, FLAGS.out, dataset=FLAGS.dataset, idrid_dir=FLAGS.idrid_dir,
      num_images=FLAGS.num_images, methods=methods, pixel_methods=pixel_methods,
      slow_images=FLAGS.slow_images, image_size=FLAGS.image_size,
      tolerance=FLAGS.tolerance, faithfulness_images=FLAGS.faithfulness_images,
      seed=FLAGS.seed, controls=FLAGS.controls)
  print(f'report: {path}')


if __name__ == '__main__':
  runtime.run(main)
