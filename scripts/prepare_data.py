r"""Builds one of drjax's tfds datasets (ArrayRecord, no TensorFlow needed).

  python scripts/prepare_data.py --dataset eyepacs --manual_dir ~/kaggle/eyepacs \
      --image_size 512 [--btgraham] [--data_dir ~/tensorflow_datasets]
  python scripts/prepare_data.py --dataset idrid --manual_dir /path/to/idrid \
      --idrid_task segmentation
  python scripts/prepare_data.py --dataset synthetic_fundus --num_images 2000 --image_size 224

Bad files are skipped; the summary is printed at the end and written as
build_report_<split>.json beside the data. A missing or empty --manual_dir, or nothing usable
in it, is one `error:` line on stderr (followed by the download instructions or the skip
summary) and exit status 1.
"""

from absl import flags

from drjax import runtime
from drjax.data import builders

_DATASET = flags.DEFINE_enum('dataset', None, sorted(builders.BUILDERS), 'Dataset to build.')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Downloaded files (real datasets).')
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                'tfds data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Side of the stored square images '
                                   '(default 512 for real datasets, 224 for synthetic).')
_BTGRAHAM = flags.DEFINE_bool('btgraham', False, 'Ben Graham preprocessing (real datasets).')
_IMAGE_FORMAT = flags.DEFINE_enum('image_format', 'jpeg', ['jpeg', 'png'],
                                  'Encoding of stored real images.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Keep only the first N images per split (0: all).')
_IDRID_TASK = flags.DEFINE_enum('idrid_task', 'grading', ['grading', 'segmentation'], 'IDRiD.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 2000, 'synthetic_fundus: training images.')
_NUM_TEST_IMAGES = flags.DEFINE_integer('num_test_images', 0, 'synthetic_fundus: test images.')
_SEED = flags.DEFINE_integer('seed', 0, 'synthetic_fundus: seed.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None, 'Processes (default: all CPUs).')


def main(argv):
  del argv
  name = _DATASET.value
  if name == 'synthetic_fundus':
    options = dict(num_images=_NUM_IMAGES.value, image_size=_IMAGE_SIZE.value or 224,
                   seed=_SEED.value, num_test_images=_NUM_TEST_IMAGES.value)
  else:
    options = dict(image_size=_IMAGE_SIZE.value or 512, btgraham=_BTGRAHAM.value,
                   image_format=_IMAGE_FORMAT.value, limit=_LIMIT.value)
    if name == 'idrid':
      options['task'] = _IDRID_TASK.value
  builder = builders.prepare(name, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
                             num_workers=_NUM_WORKERS.value, **options)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f'{builder.info.full_name} at {builder.data_dir}: {splits}')
  for split in splits:
    report = builder.data_path / f'build_report_{split}.json'
    if report.exists():
      print(f'  skip report: {report}')


if __name__ == '__main__':
  flags.mark_flag_as_required('dataset')
  runtime.run(main)
