"""The base class of drjax's fundus builders: the `num_workers` option and the `DatasetInfo`.

A builder subclasses `FundusBuilder`, sets VERSION, RELEASE_NOTES and BUILDER_CONFIGS (and
HOMEPAGE, CITATION, MANUAL_DOWNLOAD_INSTRUCTIONS where it has them), and defines `_features`,
`_split_generators` and `_generate_examples`; its module's docstring is its description.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from drjax.data.builders import common


class FundusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder whose examples are made in `num_workers` processes.

  Only subclasses are datasets: this class is not registered with tfds.
  """

  HOMEPAGE: str | None = None
  CITATION: str | None = None
  # Feature names of (input, target) for `as_supervised`; None where there is no grade.
  SUPERVISED_KEYS: tuple[str, str] | None = ('image', 'label')

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # Set explicitly: tfds's lookup of it needs the `importlib_resources` backport.
    cls.code_path = epath.Path(inspect.getfile(cls))

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """num_workers: processes making the examples (None: all CPUs, in-process below 100
    items; <= 1: in-process)."""
    self._num_workers = num_workers
    super().__init__(**kwargs)

  @abc.abstractmethod
  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    """The features of one example under the current `builder_config`."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict(self._features()),
        supervised_keys=self.SUPERVISED_KEYS,
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
    )

  def _examples(self, items: list[common.WorkItem], fn: Callable[[common.WorkItem], dict],
                report: common.SkipReport) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, example) of `fn(item)` for each item, made in worker processes; skips reported."""
    yield from common.generate_examples(items, fn, report, self.data_dir, self._num_workers)


@dataclasses.dataclass
class PhotoConfig(tfds.core.BuilderConfig):
  """A graded photograph set: image_size, the side of the stored square crop; btgraham, Ben
  Graham preprocessing; image_format, 'jpeg' or 'png'; limit, keep only the first N usable
  ids per split (0: all)."""

  image_size: int = 512
  btgraham: bool = False
  image_format: str = 'jpeg'
  limit: int = 0


def make_photo_config(image_size: int = 512, btgraham: bool = False, image_format: str = 'jpeg',
                      limit: int = 0) -> PhotoConfig:
  """A config whose name encodes every option, so differently built data never collide."""
  name = f'size{image_size}' + ('_btgraham' if btgraham else '')
  name += '' if image_format == 'jpeg' else f'_{image_format}'
  name += f'_limit{limit}' if limit else ''
  return PhotoConfig(name=name, image_size=image_size, btgraham=btgraham,
                     image_format=image_format, limit=limit,
                     description=f'{image_size}px field-of-view crops'
                     + (', Ben Graham preprocessing' if btgraham else ''))
