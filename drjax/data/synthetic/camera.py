"""The fundus camera: exposure, colour cast, uneven illumination and vignetting, flare, and
sensor noise, applied to the planar scene."""

from __future__ import annotations

import dataclasses

import numpy as np

from drjax.data.synthetic import raster

_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class _Camera:
  """One photograph's camera: [3, S, S] scene -> pixel values before rounding."""

  illum: np.ndarray  # [S, S] illumination (and, when unblurred, the field of view).
  gains: np.ndarray  # [3] exposure times colour cast.
  sigma: float  # Focus blur, in pixels (none below 0.3).
  noise: np.ndarray  # [S, S] sensor noise plus flare plus 0.5 (truncation then rounds).
  fov: np.ndarray  # [S, S]

  def __call__(self, x, add=True, inplace=False):
    """Photographs scene x; linear without `add`; `inplace` reuses x's memory."""
    y = x if inplace else x * self.illum
    if inplace:
      y *= self.illum
    if self.sigma >= 0.3:
      y = raster.blur(y, self.sigma)
      y *= self.fov
    y *= self.gains[:, None, None]
    if add:
      y += self.noise
    return y


def _exposure(rng):
  """Per-channel gains [3]: exposure (sometimes far off) times a colour cast."""
  gain = np.exp(rng.normal(0, 0.22))
  if rng.uniform() < 0.12:
    gain = (rng.uniform(0.35, 0.6), rng.uniform(1.5, 2.0))[int(rng.integers(2))]
  return (gain * np.exp(rng.normal(0, [0.05, 0.07, 0.09]))).astype(_F32)


def _illumination(rng, frame):
  """[S, S]: uneven illumination, vignetting and, sometimes, dust on the optics."""
  g = rng.normal(0, 0.1, 2)
  illum = frame.r * frame.r
  illum *= frame.r
  illum *= _F32(-rng.uniform(0.15, 0.55))
  illum += 1
  illum *= (1 + _F32(g[0]) * frame.u)[None, :] + _F32(g[1]) * frame.v[:, None]
  if rng.uniform() < 0.15:
    # Dust on the optics: faint, soft dark spots (not lesions, and in no mask).
    k = int(rng.integers(1, 4))
    pts = frame.to_px(rng.uniform(-0.6, 0.6, (k, 2)))
    rad = rng.uniform(0.02, 0.05, k) * frame.radius
    dust = np.zeros((frame.size, frame.size), _F32)
    raster.ellipses(dust, pts[:, 1], pts[:, 0], rad, rad * rng.uniform(0.8, 1.0, k), np.zeros(k),
              rng.uniform(0.06, 0.15, k), soft=True)
    illum *= 1 - dust
  return illum


def _sensor_noise(rng, size, noise_sd, flare, fov):
  """[S, S]: uniform noise, one draw for the three channels (luma noise, as JPEG keeps),
  plus flare, plus 0.5 so that truncation to uint8 rounds."""
  noise = np.frombuffer(rng.bytes(size * size), np.uint8).reshape(size, size)
  noise = noise.astype(_F32)
  noise *= _F32(noise_sd / 73.9)
  noise += _F32(0.5 - 127.5 * noise_sd / 73.9)
  if flare:
    noise += fov * _F32(flare)
  return noise


def make_camera(rng, noise_rng, frame):
  """Draws the camera: illumination, exposure, focus, flare and sensor noise."""
  gains = _exposure(rng)
  illum = _illumination(rng, frame)
  unfocused = rng.uniform() < 0.1
  # Most photographs are sharp at the sizes drjax uses (sigma < 0.3 px, no blur at 512).
  sigma = frame.radius * (rng.uniform(0.006, 0.014) if unfocused else rng.uniform(0.0004, 0.0015))
  flare = rng.uniform(0, 12) if rng.uniform() < 0.25 else 0.0
  noise_sd = rng.uniform(1.0, 3.0)
  noise = _sensor_noise(noise_rng, frame.size, noise_sd, flare, frame.fov)
  if sigma < 0.3:
    illum *= frame.fov  # No blur: fold the field of view into the illumination.
  return _Camera(illum, gains, sigma, noise, frame.fov)
