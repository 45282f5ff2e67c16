"""The synthetic fundus dataset (drjax's offline default) as a tfds ArrayRecord dataset.

Examples come from `drjax.data.synthetic`: the 'train' split is exactly
`synthetic.generate(num_images, image_size, seed, grade_prior)` (same ids, grades and pixels),
rendered in parallel worker processes; the optional 'test' split is the continuation of the
same stream (examples num_images .. num_images + num_test_images - 1), so it never repeats a
training eye. Lesion masks are stored as [S, S, 5] uint8 in `LESION_TYPES` order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np
import tensorflow_datasets as tfds

from drjax import errors
from drjax.data import images, synthetic
from drjax.data.builders import base, common


@dataclasses.dataclass
class SyntheticFundusConfig(tfds.core.BuilderConfig):
  """num_images: training images; image_size: side S; seed: the whole set; grade_prior: 5
  weights (None: EyePACS proportions); num_test_images: size of the optional 'test' split."""

  num_images: int = 2000
  image_size: int = 224
  seed: int = 0
  grade_prior: tuple[float, ...] | None = None
  num_test_images: int = 0


def make_config(num_images: int = 2000, image_size: int = 224, seed: int = 0,
                grade_prior=None, num_test_images: int = 0) -> SyntheticFundusConfig:
  """A config whose name encodes every option, so differently built data never collide."""
  name = f'n{num_images}_size{image_size}_seed{seed}'
  if num_test_images:
    name += f'_test{num_test_images}'
  if grade_prior is not None:
    grade_prior = tuple(float(p) for p in grade_prior)
    name += '_prior' + hashlib.sha1(repr(grade_prior).encode()).hexdigest()[:8]
  return SyntheticFundusConfig(
      name=name, num_images=num_images, image_size=image_size, seed=seed,
      grade_prior=grade_prior, num_test_images=num_test_images,
      description=f'{num_images} synthetic {image_size}px fundus images, seed {seed}')


def plan(num_images: int, seed: int, grade_prior=None) -> list[tuple[str, int, int]]:
  """(id, example seed, grade) of each example, exactly as `synthetic.generate` draws them."""
  prior = np.asarray(synthetic.EYEPACS_PRIOR if grade_prior is None else grade_prior, float)
  if prior.shape != (common.NUM_GRADES,) or (prior < 0).any() or prior.sum() <= 0:
    raise errors.ConfigError(f'grade_prior must be 5 non-negative weights, got {grade_prior}')
  rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
  grades = rng.choice(common.NUM_GRADES, size=num_images, p=prior / prior.sum())
  return [(f'synthetic_{seed}_{i:06d}',
           int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), int(g))
          for i, g in enumerate(grades)]


class SyntheticFundus(base.FundusBuilder):
  """Procedural colour fundus photographs with DR grades and pixel-exact lesion masks."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'PNG images and zlib masks in ArrayRecord.'}
  BUILDER_CONFIGS = [make_config()]

  def _features(self):
    s = self.builder_config.image_size
    return {
        'image': tfds.features.Image(shape=(s, s, 3), dtype=np.uint8, encoding_format='png'),
        'label': tfds.features.ClassLabel(names=common.GRADE_NAMES),
        'masks': tfds.features.Tensor(shape=(s, s, len(common.LESION_TYPES)), dtype=np.uint8,
                                      encoding='zlib'),
        'id': tfds.features.Text(),
        'patient_id': tfds.features.Text(),
        'eye': tfds.features.Text(),
    }

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    full = plan(cfg.num_images + cfg.num_test_images, cfg.seed, cfg.grade_prior)
    splits = {'train': self._generate_examples('train', full[:cfg.num_images])}
    if cfg.num_test_images:
      splits['test'] = self._generate_examples('test', full[cfg.num_images:])
    return splits

  def _generate_examples(self, split, examples):
    items = [common.WorkItem(id_, '', grade, id_, ex_seed) for id_, ex_seed, grade in examples]
    report = common.SkipReport(f'synthetic_fundus/{self.builder_config.name}', split)
    fn = functools.partial(_render, image_size=self.builder_config.image_size)
    yield from self._examples(items, fn, report)


def _render(item: common.WorkItem, image_size: int) -> dict:
  ex = synthetic.generate_example(item.extra, item.grade, image_size)
  return {'image': images.encode(ex['image'], 'png'), 'label': ex['grade'],
          'masks': ex['masks'].astype(np.uint8), 'id': item.id, 'patient_id': item.id,
          'eye': ex['eye']}
