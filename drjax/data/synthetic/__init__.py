"""Procedural colour fundus photographs with pixel-exact lesion masks, by DR grade.

The embedded default dataset of drjax: it trains and explains anywhere, offline, and its
lesions are known to the pixel. Everything is numpy, vectorised over pixels and over
lesions/vessel segments, and deterministic from a seed.

Anatomy is drawn in resolution-free units (the field of view has radius 1), so
one seed gives the same eye at every image size, and the seeds of the anatomy,
the camera, the lesions and the sensor noise are separate streams: for a given
seed, grades 0, 1 and 2 show the same eye photographed the same way and differ
only by their lesions (grade 3, and half of grade 4, also bead the veins).

Grades follow the international clinical DR severity scale (Wilkinson et al.,
Ophthalmology 2003): 0 no apparent retinopathy; 1 microaneurysms only; 2 more
than microaneurysms (dot/blot haemorrhages, hard exudates, maybe cotton-wool
spots); 3 severe NPDR (many haemorrhages in all four quadrants, venous beading);
4 PDR (neovascularisation, maybe a preretinal haemorrhage).

Masks are honest: their union is exactly the set of pixels whose uint8 value
(in some channel) differs by at least `MASK_THRESHOLD` grey levels from the same
photograph rendered without lesions. A changed pixel is in the mask of each type
that could alone have changed it that much, and in that of its largest contributor.

  raster   numpy helpers: smooth noise, blur, anti-aliased ellipses and segments
  vessels  the vessel tree from the optic disc, venous beading
  lesions  lesions by grade, planned as layers of one lesion type each
  camera   exposure, cast, illumination, flare and sensor noise
  render   one photograph and its lesion masks
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from drjax.data.synthetic import render
from drjax.data.synthetic.lesions import EX, HE, LESION_TYPES, MA, NUM_GRADES, NV, SE
from drjax.data.synthetic.render import MASK_THRESHOLD

# Kaggle 2015 Diabetic Retinopathy Detection (EyePACS) training-set grade counts.
EYEPACS_COUNTS = (25810, 2443, 5292, 873, 708)
EYEPACS_PRIOR = tuple(c / sum(EYEPACS_COUNTS) for c in EYEPACS_COUNTS)

__all__ = ['EX', 'EYEPACS_COUNTS', 'EYEPACS_PRIOR', 'HE', 'LESION_TYPES', 'MA', 'MASK_THRESHOLD',
           'NUM_GRADES', 'NV', 'SE', 'generate', 'generate_example', 'sample_grades']


def generate_example(seed: int, grade: int, image_size: int = 512, eye: str | None = None) -> dict:
  """One synthetic fundus photograph of the given DR grade.

  Args:
    seed: any non-negative int; fixes the eye, the camera, the lesions and the noise.
    grade: DR grade 0..4 (international clinical scale).
    image_size: side S of the square image in pixels, rendered at that size.
    eye: 'left' or 'right' (mirror images of each other), or None to draw it from the seed.

  Returns:
    dict(image=uint8 [S, S, 3], masks=uint8 [S, S, 5] in {0, 1} in `LESION_TYPES`
    order, grade=int, eye='left'|'right').
  """
  return render.render(int(seed), int(grade), int(image_size), eye)


def generate(num_images: int, image_size: int = 512, seed: int = 0,
             grade_prior: Sequence[float] = EYEPACS_PRIOR) -> Iterator[dict]:
  """Yields `num_images` examples with grades drawn from `grade_prior`.

  Args:
    num_images: how many examples.
    image_size: side of the square images.
    seed: fixes the whole sequence (grades, eyes, images).
    grade_prior: 5 non-negative weights (normalised here), e.g. `EYEPACS_PRIOR` or counts.

  Yields:
    `generate_example` dicts plus 'id' (str, unique within the sequence).
  """
  grades = sample_grades(num_images, seed, grade_prior)
  for i, grade in enumerate(grades):
    ex_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    ex = generate_example(ex_seed, int(grade), image_size)
    ex['id'] = f'synthetic_{seed}_{i:06d}'
    yield ex


def sample_grades(num_images: int, seed: int = 0,
                  grade_prior: Sequence[float] = EYEPACS_PRIOR) -> np.ndarray:
  """The grades `generate` uses: int64 [num_images] drawn iid from `grade_prior`."""
  prior = np.asarray(grade_prior, float)
  if prior.shape != (NUM_GRADES,) or (prior < 0).any() or not prior.sum() > 0:
    raise ValueError(f'grade_prior must be 5 non-negative weights, got {grade_prior}')
  rng = np.random.default_rng(np.random.SeedSequence([seed, 99]))
  return rng.choice(NUM_GRADES, size=num_images, p=prior / prior.sum())
