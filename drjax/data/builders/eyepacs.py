"""EyePACS: Kaggle's 2015 Diabetic Retinopathy Detection set, the paper's data.

35,126 graded training photographs (grades [25810, 2443, 5292, 873, 708]) and 53,576 test
photographs graded in `retinopathy_solution.csv` (released after the competition). Images are
cropped to the field of view and resized at build time, optionally with Ben Graham's
preprocessing; the two eyes of a patient ('10_left', '10_right') share a `patient_id` so
that `drjax.data.splits` never separates them.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from drjax.data.builders import base, common

_INSTRUCTIONS = """\
Download the competition data from
https://www.kaggle.com/c/diabetic-retinopathy-detection/data (Kaggle account, accept the
rules), extract the multi-part zips and pass the folder as --manual_dir:

  manual_dir/
    trainLabels.csv              image,level
    train/10_left.jpeg ...
    retinopathy_solution.csv     image,level,Usage    (optional: gives a 'test' split)
    test/1_left.jpeg ...         (optional)
"""


# The options and config names of every graded photograph set.
make_config = base.make_photo_config


def patient_id(image_name: str) -> str:
  """'10_left' -> '10': both eyes of a patient are one group."""
  stem, _, side = image_name.rpartition('_')
  return stem if stem and side.lower() in ('left', 'right') else image_name


def eye(image_name: str) -> str:
  side = image_name.rpartition('_')[2].lower()
  return side if side in ('left', 'right') else ''


class Eyepacs(base.FundusBuilder):
  """Kaggle EyePACS diabetic retinopathy photographs, graded 0-4."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Field-of-view crops stored as encoded bytes in ArrayRecord.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [make_config(512), make_config(512, btgraham=True)]
  HOMEPAGE = 'https://www.kaggle.com/c/diabetic-retinopathy-detection'

  def _features(self):
    s = self.builder_config.image_size
    return {
        'image': tfds.features.Image(shape=(s, s, 3), dtype=np.uint8,
                                     encoding_format=self.builder_config.image_format),
        'label': tfds.features.ClassLabel(names=common.GRADE_NAMES),
        'id': tfds.features.Text(),
        'patient_id': tfds.features.Text(),
        'eye': tfds.features.Text(),
    }

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = {'train': ('train', 'trainLabels.csv')}
    if (root / 'retinopathy_solution.csv').is_file() and (root / 'test').is_dir():
      splits['test'] = ('test', 'retinopathy_solution.csv')
    if not (root / 'trainLabels.csv').is_file():
      raise common.NoUsableDataError(
          f'{root / "trainLabels.csv"} not found.\n{_INSTRUCTIONS}')
    return {name: self._generate_examples(split=name, image_dir=root / d, csv_path=root / c)
            for name, (d, c) in splits.items()}

  def _generate_examples(self, split, image_dir, csv_path):
    cfg = self.builder_config
    report = common.SkipReport('eyepacs', split)
    labels = common.read_labels(csv_path, ['image'], ['level'], report)
    matched = common.match_labels(labels, common.list_images(image_dir), report)
    if cfg.limit:
      matched = matched[:cfg.limit]
    items = [common.WorkItem(id_, str(path), grade, patient_id(id_), eye(id_))
             for id_, path, grade, _ in matched]
    fn = functools.partial(_process, image_size=cfg.image_size, btgraham=cfg.btgraham,
                           image_format=cfg.image_format)
    yield from self._examples(items, fn, report)


def _process(item: common.WorkItem, **kwargs) -> dict:
  example = common.process_fundus(item, **kwargs)
  example['eye'] = item.extra or ''
  return example
