"""tfds builders of the fundus datasets, written as ArrayRecord without TensorFlow.

Importing this package registers `synthetic_fundus`, `eyepacs`, `idrid` and `aptos2019` with
tfds. Images are encoded with PIL and handed to tfds as bytes, so building and reading with
`tfds.data_source` / `builder.as_data_source` need no TensorFlow. Each config's name encodes
its options (e.g. 'eyepacs/size512_btgraham'), so `prepare` never mixes differently built data.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from drjax import errors
from drjax.data.builders import aptos2019, eyepacs, idrid, synthetic_fundus
from drjax.data.builders.common import GRADE_NAMES, LESION_TYPES, NoUsableDataError

__all__ = ['BUILDERS', 'GRADE_NAMES', 'LESION_TYPES', 'NoUsableDataError', 'build_lock',
           'default_data_dir', 'make_builder', 'prepare']

# name -> (builder class, config factory taking the dataset's options as keywords).
BUILDERS = {
    'synthetic_fundus': (synthetic_fundus.SyntheticFundus, synthetic_fundus.make_config),
    'eyepacs': (eyepacs.Eyepacs, eyepacs.make_config),
    'idrid': (idrid.Idrid, idrid.make_config),
    'aptos2019': (aptos2019.Aptos2019, aptos2019.make_config),
}
MANUAL_DATASETS = ('eyepacs', 'idrid', 'aptos2019')


def default_data_dir() -> str:
  """$TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds's own default)."""
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def make_builder(name: str, data_dir: str | None = None, num_workers: int | None = None,
                 **options: Any) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name` with the config made from `options`.

  Args:
    name: one of `BUILDERS`.
    data_dir: tfds data dir ('' or None: `default_data_dir()`).
    num_workers: processes used when building (None: all CPUs).
    **options: the dataset's `make_config` keywords, e.g. image_size=512, btgraham=True
      (eyepacs/aptos2019/idrid), task='segmentation' (idrid), num_images=2000 (synthetic).
  """
  if name not in BUILDERS:
    raise errors.ConfigError(f'Unknown dataset {name!r}; expected one of {sorted(BUILDERS)}')
  builder_cls, make_config = BUILDERS[name]
  config = make_config(**options)
  # tfds refuses a config instance named like one of BUILDER_CONFIGS: pass those by name.
  registered = config.name in builder_cls.builder_configs
  return builder_cls(data_dir=data_dir or default_data_dir(),
                     config=config.name if registered else config,
                     file_format='array_record', num_workers=num_workers)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None,
            num_workers: int | None = None, **options: Any) -> tfds.core.DatasetBuilder:
  """Builds dataset `name` unless already built; returns its builder.

  Raises:
    NoUsableDataError: the manual files are missing or nothing in them is usable (the
      message lists what was skipped and why).
  """
  builder = make_builder(name, data_dir, num_workers, **options)
  if builder.is_prepared():
    return builder
  if name in MANUAL_DATASETS and not manual_dir:
    raise NoUsableDataError(f'{name} needs --manual_dir.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  if manual_dir and not (os.path.isdir(os.path.expanduser(manual_dir))
                         and os.listdir(os.path.expanduser(manual_dir))):
    raise NoUsableDataError(f'{name}: manual_dir {manual_dir} does not exist or is empty.\n'
                            f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  download_config = tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
      try_download_gcs=False)
  with build_lock(builder):
    # Another process may have built it while this one waited for the lock.
    builder = make_builder(name, data_dir, num_workers, **options)
    if not builder.is_prepared():
      builder.download_and_prepare(download_config=download_config, file_format='array_record')
  return builder


@contextlib.contextmanager
def build_lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """Holds an exclusive lock on `<data_dir>/<dataset>/<config>.lock` (POSIX `flock`).

  Two processes building the same config at once (a sweep's parallel runs on a fresh
  machine) each write the dataset, and the second one's final rename fails with tfds'
  FileExistsError. With the lock the second waits, then finds the dataset built.
  """
  config_dir = os.path.dirname(os.fspath(builder.data_path).rstrip(os.sep))
  os.makedirs(os.path.dirname(config_dir), exist_ok=True)
  with open(config_dir + '.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
