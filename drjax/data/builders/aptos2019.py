"""APTOS 2019 Blindness Detection (Kaggle): 3,662 graded training photographs from India.

Only the training set has public labels, so the builder writes a single 'train' split;
`drjax.data.splits` carves the validation set out of it. Photographs are cropped to the
field of view and resized at build time, optionally with Ben Graham's preprocessing.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from drjax.data.builders import base, common

_INSTRUCTIONS = """\
Download https://www.kaggle.com/c/aptos2019-blindness-detection/data (Kaggle account, accept
the rules), unzip it and pass the folder as --manual_dir:

  manual_dir/
    train.csv                    id_code,diagnosis
    train_images/000c1434d8d7.png ...
"""


# The options and config names of every graded photograph set.
make_config = base.make_photo_config


class Aptos2019(base.FundusBuilder):
  """APTOS 2019 fundus photographs, graded 0-4."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Field-of-view crops stored as encoded bytes in ArrayRecord.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [make_config(512), make_config(512, btgraham=True)]
  HOMEPAGE = 'https://www.kaggle.com/c/aptos2019-blindness-detection'

  def _features(self):
    s = self.builder_config.image_size
    return {
        'image': tfds.features.Image(shape=(s, s, 3), dtype=np.uint8,
                                     encoding_format=self.builder_config.image_format),
        'label': tfds.features.ClassLabel(names=common.GRADE_NAMES),
        'id': tfds.features.Text(),
        'patient_id': tfds.features.Text(),
    }

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    if not (root / 'train.csv').is_file():
      raise common.NoUsableDataError(f'{root / "train.csv"} not found.\n{_INSTRUCTIONS}')
    return {'train': self._generate_examples(root / 'train_images', root / 'train.csv')}

  def _generate_examples(self, image_dir, csv_path):
    cfg = self.builder_config
    report = common.SkipReport('aptos2019', 'train')
    labels = common.read_labels(csv_path, ['id_code'], ['diagnosis'], report)
    matched = common.match_labels(labels, common.list_images(image_dir), report)
    if cfg.limit:
      matched = matched[:cfg.limit]
    # APTOS publishes no patient ids: every image is its own group.
    items = [common.WorkItem(id_, str(path), grade, id_) for id_, path, grade, _ in matched]
    fn = functools.partial(common.process_fundus, image_size=cfg.image_size,
                           btgraham=cfg.btgraham, image_format=cfg.image_format)
    yield from self._examples(items, fn, report)
