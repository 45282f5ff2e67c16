"""IDRiD: the Indian Diabetic Retinopathy Image Dataset (Porwal, Pachade, Kokare, 2018).

Two configs, from the official layout:
- 'grading' ("B. Disease Grading"): 413 training (+103 testing) photographs with the
  retinopathy grade 0-4 and the risk of macular edema 0-2 (`dme_risk`).
- 'segmentation' ("A. Segmentation"): 54 training (+27 testing) photographs with pixel masks
  of microaneurysms, haemorrhages, hard and soft exudates (`masks` [S, S, 5] in
  `LESION_TYPES` order, NV always empty) and the optic disc. These images carry no grade:
  `label` is -1. A missing mask file means the image has no lesion of that type (upstream
  ships SE masks only for the 26 images that have soft exudates).
Images are cropped to the field of view; masks get the same crop and are downsampled so that
a pixel is lesion if any full-resolution pixel under it is (microaneurysms survive).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from drjax import errors
from drjax.data import images
from drjax.data.builders import base, common

_INSTRUCTIONS = """\
Download IDRiD from https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid
(CC BY 4.0), unzip "A. Segmentation.zip" and "B. Disease Grading.zip" into one folder and
pass it as --manual_dir:

  manual_dir/
    A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg ...
    A. Segmentation/2. All Segmentation Groundtruths/a. Training Set/
        1. Microaneurysms/IDRiD_01_MA.tif ... 5. Optic Disc/IDRiD_01_OD.tif ...
    B. Disease Grading/1. Original Images/a. Training Set/IDRiD_001.jpg ...
    B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
  ("b. Testing Set" folders and the testing CSV, when present, give a 'test' split.)
"""

# Lesion channels, as drjax.data.synthetic.LESION_TYPES; IDRiD has no NV masks.
LESION_TYPES = common.LESION_TYPES
_MASK_FILE = re.compile(r'^(?P<id>.+)_(?P<type>MA|HE|EX|SE|OD)$', re.IGNORECASE)
_SETS = {'train': 'Training', 'test': 'Testing'}
TASKS = ('grading', 'segmentation')


@dataclasses.dataclass
class IdridConfig(tfds.core.BuilderConfig):
  """task: 'grading' or 'segmentation'; image_size: stored square side; btgraham: Ben
  Graham preprocessing; image_format: 'jpeg' or 'png'; limit: first N usable ids per split."""

  task: str = 'grading'
  image_size: int = 512
  btgraham: bool = False
  image_format: str = 'jpeg'
  limit: int = 0


def make_config(task: str = 'grading', image_size: int = 512, btgraham: bool = False,
                image_format: str = 'jpeg', limit: int = 0) -> IdridConfig:
  """A config whose name encodes every option, so differently built data never collide."""
  if task not in TASKS:
    raise errors.ConfigError(f'IDRiD task must be one of {TASKS}, got {task!r}')
  name = f'{task}_size{image_size}' + ('_btgraham' if btgraham else '')
  name += '' if image_format == 'jpeg' else f'_{image_format}'
  name += f'_limit{limit}' if limit else ''
  return IdridConfig(name=name, task=task, image_size=image_size, btgraham=btgraham,
                     image_format=image_format, limit=limit,
                     description=f'IDRiD {task}, {image_size}px field-of-view crops')


def _find_dir(parent: pathlib.Path, *patterns: str) -> pathlib.Path | None:
  """First sub-folder whose name contains all `patterns` (case-insensitive), e.g. 'Training'."""
  if not parent.is_dir():
    return None
  for p in sorted(parent.iterdir()):
    if p.is_dir() and all(s.lower() in p.name.lower() for s in patterns):
      return p
  return None


def _find_file(parent: pathlib.Path | None, *patterns: str) -> pathlib.Path | None:
  if parent is None or not parent.is_dir():
    return None
  for p in sorted(parent.iterdir()):
    if p.is_file() and p.suffix.lower() == '.csv' and all(
        s.lower() in p.name.lower() for s in patterns):
      return p
  return None


def mask_files(gt_dir: pathlib.Path) -> dict[str, dict[str, pathlib.Path]]:
  """image id -> {'MA'|'HE'|'EX'|'SE'|'OD': mask path}, from any sub-folder of `gt_dir`."""
  out: dict[str, dict[str, pathlib.Path]] = {}
  for p in sorted(gt_dir.rglob('*')):
    m = _MASK_FILE.match(p.stem)
    if p.is_file() and m and p.suffix.lower() in common.IMAGE_EXTENSIONS:
      out.setdefault(m['id'], {})[m['type'].upper()] = p
  return out


class Idrid(base.FundusBuilder):
  """IDRiD disease grading and lesion segmentation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Field-of-view crops stored as encoded bytes in ArrayRecord.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [make_config('grading'), make_config('segmentation')]
  HOMEPAGE = 'https://idrid.grand-challenge.org/'
  CITATION = ('Porwal P, Pachade S, Kokare M, et al. Indian Diabetic Retinopathy Image '
              'Dataset (IDRiD). IEEE Dataport, 2018. doi:10.21227/H25W98')
  # Neither task's stored info has supervised keys (segmentation images carry no grade).
  SUPERVISED_KEYS = None

  def _features(self):
    cfg = self.builder_config
    s = cfg.image_size
    features = {
        'image': tfds.features.Image(shape=(s, s, 3), dtype=np.uint8,
                                     encoding_format=cfg.image_format),
        'id': tfds.features.Text(),
        'patient_id': tfds.features.Text(),
    }
    if cfg.task == 'grading':
      features['label'] = tfds.features.ClassLabel(names=common.GRADE_NAMES)
      features['dme_risk'] = tfds.features.Scalar(dtype=np.int64,
                                                  doc='risk of macular edema 0-2, -1 unknown')
    else:
      features['label'] = tfds.features.Scalar(dtype=np.int64, doc='-1: not graded')
      features['masks'] = tfds.features.Tensor(shape=(s, s, len(LESION_TYPES)), dtype=np.uint8,
                                               encoding='zlib')
      features['optic_disc'] = tfds.features.Tensor(shape=(s, s), dtype=np.uint8,
                                                    encoding='zlib')
    return features

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    task_dir = _find_dir(root, 'Disease Grading' if self.builder_config.task == 'grading'
                         else 'Segmentation')
    if task_dir is None:
      raise common.NoUsableDataError(
          f'No IDRiD {self.builder_config.task} folder in {root}.\n{_INSTRUCTIONS}')
    image_root = _find_dir(task_dir, 'Original Images')
    splits = {}
    for split, set_name in _SETS.items():
      image_dir = _find_dir(image_root, set_name) if image_root else None
      if image_dir is not None:
        splits[split] = self._generate_examples(split, task_dir, image_dir, set_name)
    if 'train' not in splits:
      raise common.NoUsableDataError(
          f'No "Training Set" images under {task_dir}.\n{_INSTRUCTIONS}')
    return splits

  def _generate_examples(self, split, task_dir, image_dir, set_name):
    if self.builder_config.task == 'grading':
      return self._generate_grading(split, task_dir, image_dir, set_name)
    return self._generate_segmentation(split, task_dir, image_dir, set_name)

  def _generate_grading(self, split, task_dir, image_dir, set_name):
    cfg = self.builder_config
    report = common.SkipReport(f'idrid/{cfg.name}', split)
    csv_path = _find_file(_find_dir(task_dir, 'Groundtruths'), set_name, 'Labels')
    if csv_path is None:
      raise common.NoUsableDataError(
          f'No "{set_name} Labels" CSV under {task_dir}/2. Groundtruths.\n{_INSTRUCTIONS}')
    # The official header's last column is 'Risk of macular edema ' (trailing space):
    # read_csv_rows strips header names.
    labels = common.read_labels(csv_path, ['Image name'], ['Retinopathy grade'], report,
                                extra_cols=['Risk of macular edema'])
    matched = common.match_labels(labels, common.list_images(image_dir), report)
    if cfg.limit:
      matched = matched[:cfg.limit]
    items = []
    for id_, path, grade, extra in matched:
      dme = common.parse_grade(extra['Risk of macular edema'])
      items.append(common.WorkItem(id_, str(path), grade, id_,
                                   dme if dme is not None and dme <= 2 else -1))
    fn = functools.partial(_process_grading, image_size=cfg.image_size, btgraham=cfg.btgraham,
                           image_format=cfg.image_format)
    yield from self._examples(items, fn, report)

  def _generate_segmentation(self, split, task_dir, image_dir, set_name):
    cfg = self.builder_config
    report = common.SkipReport(f'idrid/{cfg.name}', split)
    gt_dir = _find_dir(_find_dir(task_dir, 'Groundtruths') or task_dir, set_name)
    masks = mask_files(gt_dir) if gt_dir else {}
    files = common.list_images(image_dir)
    for id_ in sorted(set(masks) - set(files)):
      report.add(id_, 'mask files without image file')
    ids = sorted(files)
    if not masks:
      for id_ in ids:
        report.add(id_, f'no mask files found for the {set_name} set', files[id_])
      ids = []
    if cfg.limit:
      ids = ids[:cfg.limit]
    items = [common.WorkItem(
        id_, str(files[id_]), -1, id_,
        tuple(str(masks.get(id_, {}).get(t, '')) for t in (*LESION_TYPES[:4], 'OD')))
        for id_ in ids]
    fn = functools.partial(_process_segmentation, image_size=cfg.image_size,
                           btgraham=cfg.btgraham, image_format=cfg.image_format)
    yield from self._examples(items, fn, report)


def _process_grading(item: common.WorkItem, **kwargs) -> dict:
  example = common.process_fundus(item, **kwargs)
  example['dme_risk'] = item.extra
  return example


def _process_segmentation(item: common.WorkItem, image_size: int, btgraham: bool,
                          image_format: str) -> dict:
  """Worker: photograph + its mask files (empty path: no lesion of that type)."""
  image, box, decoded_size = images.preprocess_fundus(item.path, image_size, btgraham=btgraham)
  resized = []
  for path in item.extra:
    if not path:
      resized.append(None)
      continue
    try:
      mask = images.load_mask(path)
    except images.BadImageError as e:
      raise images.BadImageError(f'cannot decode mask {pathlib.Path(path).name}: {e}') from e
    sx, sy = mask.width / decoded_size[0], mask.height / decoded_size[1]
    if abs(sx - sy) > 0.02 * max(sx, sy):
      raise images.BadImageError(
          f'mask {pathlib.Path(path).name} of size {mask.size} does not match the image')
    resized.append(images.resize_mask(mask, images.scale_box(box, decoded_size, mask.size),
                                      image_size))
  lesions = images.stack_masks(resized[:4] + [None], image_size)  # NV: none in IDRiD
  optic_disc = resized[4] if resized[4] is not None else np.zeros(
      (image_size, image_size), np.uint8)
  return {'image': images.encode(image, image_format), 'label': -1, 'id': item.id,
          'patient_id': item.id, 'masks': lesions, 'optic_disc': optic_disc}
