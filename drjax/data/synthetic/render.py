"""One photograph: the scene drawn planar, [3, S, S], in nominal grey levels (field of view,
background, macula, optic disc, vessels, lesions), photographed by the camera, and the lesion
masks of the pixels the lesions changed."""

from __future__ import annotations

import dataclasses

import numpy as np

from drjax.data.synthetic import camera, lesions, raster, vessels

# Grey levels (0-255, any channel) a lesion must change a pixel by to be in its mask.
MASK_THRESHOLD = 3
_F32 = np.float32

# Scene colours are in nominal grey levels before the camera's exposure and cast.
# Multiplicative factors darken mostly green and blue, as blood does in real
# fundus photographs (vessels and red lesions have most contrast in green).
_VEIN = np.array([0.62, 0.40, 0.55], _F32)
_ARTERY = np.array([0.80, 0.62, 0.72], _F32)
_MA_FACTOR = np.array([0.58, 0.30, 0.40], _F32)
_HE_FACTOR = np.array([0.52, 0.27, 0.36], _F32)
_PRERETINAL_FACTOR = np.array([0.40, 0.16, 0.22], _F32)
_NV_FACTOR = np.array([0.78, 0.42, 0.52], _F32)
_EX_COLOUR = np.array([248.0, 226.0, 140.0], _F32)
_SE_COLOUR = np.array([235.0, 220.0, 196.0], _F32)


@dataclasses.dataclass(frozen=True)
class _Frame:
  """Where the field of view (FOV) lies in the image, and its resolution-free coordinates."""

  size: int  # Side S of the image, in pixels.
  radius: float  # FOV radius, in pixels.
  cx: float  # FOV centre, in pixels.
  cy: float
  u: np.ndarray  # [S] float32 column centres, in FOV radii from the centre.
  v: np.ndarray  # [S] float32 row centres, in FOV radii from the centre.
  r: np.ndarray  # [S, S] float32 distance from the FOV centre, in FOV radii.
  fov: np.ndarray  # [S, S] float32 share of each pixel inside the FOV, in [0, 1].

  def to_px(self, p):
    """Resolution-free points [..., 2] = (x, y) -> pixel coordinates."""
    return p * self.radius + np.array([self.cx, self.cy])

  def box(self, x, y, half):
    """Pixel slices (rows, cols) of the square of half-size `half` around (x, y)."""
    r0, r1 = (int(np.clip(self.cy + (y + d) * self.radius, 0, self.size))
              for d in (-half, half + 2 / self.radius))
    c0, c1 = (int(np.clip(self.cx + (x + d) * self.radius, 0, self.size))
              for d in (-half, half + 2 / self.radius))
    return slice(r0, r1), slice(c0, c1)


def _gauss(x, sd):
  return np.exp(-0.5 * (x / _F32(sd)) ** 2)


def _field_of_view(rng, size):
  """The camera's circular field of view, slightly off centre, sometimes cut at top and bottom."""
  radius = rng.uniform(0.90, 0.98) * size / 2
  cx = size / 2 + rng.normal(0, 0.01) * size
  cy = size / 2 + rng.normal(0, 0.01) * size
  crop = rng.uniform(0.82, 0.95) if rng.uniform() < 0.3 else 2.0
  coords = np.arange(size, dtype=_F32) + _F32(0.5)
  u1, v1 = (coords - _F32(cx)) / _F32(radius), (coords - _F32(cy)) / _F32(radius)
  r = np.sqrt((u1 * u1)[None, :] + (v1 * v1)[:, None])
  fov = r * _F32(-radius)
  fov += _F32(radius + 0.5)
  np.clip(fov, 0, 1, out=fov)
  fov *= np.clip(radius * (crop - np.abs(v1)) + 0.5, 0, 1).astype(_F32)[:, None]
  return _Frame(size, radius, cx, cy, u1, v1, r, fov)


def _landmarks(rng):
  """Fovea and optic disc of a right eye (the disc is nasal, on the image's right)."""
  fx, fy = rng.normal(-0.04, 0.04), rng.normal(0.03, 0.03)
  dx0, dy0 = fx + rng.uniform(0.55, 0.66), fy + rng.normal(-0.05, 0.03)
  disc_r = rng.uniform(0.11, 0.14)
  return dict(fovea=np.array([fx, fy]), disc=np.array([dx0, dy0]), disc_r=disc_r)


def _background(rng, size):
  """The bare fundus, planar [3, S, S]: pigmentation-dependent orange-red with low-frequency
  unevenness, choroidal texture (a "tigroid" fundus shows its choroidal vessels) and grain.

  The image stays planar while it is drawn: numpy broadcasts a colour over long rows much
  faster than over interleaved pixels.
  """
  pig = rng.beta(2, 2)
  base = (1 - pig) * np.array([230.0, 118.0, 58.0]) + pig * np.array([150.0, 58.0, 28.0])
  base = (base * np.exp(rng.normal(0, [0.05, 0.1, 0.15]))).astype(_F32)[:, None, None]
  img = raster.smooth_noise(rng, size, 6, 3)
  img *= np.array([0.05, 0.07, 0.09], _F32)[:, None, None] * base
  img += base
  chor = raster.smooth_noise(rng, size, 28)[0]
  fine = raster.smooth_noise(rng, size, 64)[0]
  chor_amp = rng.uniform(0.01, 0.06)
  # 1 / (1 + (c / 0.35)^2)^2: a ridge along the zero set of the noise.
  chor *= chor
  chor *= _F32(1 / 0.35 ** 2)
  chor += 1
  chor *= chor
  lum = np.divide(_F32(chor_amp), chor, out=chor)
  fine *= _F32(0.02)
  lum += fine
  lum += _F32(1 - 0.4 * chor_amp)
  img *= lum
  return img


def _draw_macula(img, rng, frame, fovea):
  """Darkens the macula (macular pigment, browner) and the fovea, and adds a small foveal
  reflex; separable Gaussians evaluated on a box only."""
  fx, fy = fovea
  rows, cols = frame.box(fx, fy, 0.4)
  ur, vr = frame.u[cols] - _F32(fx), frame.v[rows] - _F32(fy)
  mac = (rng.uniform(0.12, 0.25) * _gauss(vr, 0.13)[:, None] * _gauss(ur, 0.13)
         + rng.uniform(0.1, 0.2) * _gauss(vr, 0.035)[:, None] * _gauss(ur, 0.035))
  img[:, rows, cols] *= 1 - mac * np.array([0.8, 1.0, 1.0], _F32)[:, None, None]
  reflex = rng.uniform(0, 0.25) * 120 * _gauss(vr, 0.008)[:, None] * _gauss(ur, 0.008)
  img[:, rows, cols] += reflex


def _draw_optic_disc(img, rng, frame, disc, disc_r):
  """Draws the optic disc: pale yellow-pink rim, whiter cup, slightly taller than wide,
  soft edge, faint peripapillary halo."""
  dx0, dy0 = disc
  stretch = rng.uniform(1.0, 1.15)
  rows, cols = frame.box(dx0, dy0, 1.9 * disc_r)
  ddx = (frame.u[cols] - _F32(dx0))[None, :]
  ddy = ((frame.v[rows] - _F32(dy0)) / _F32(stretch))[:, None]
  dd = np.sqrt(ddx * ddx + ddy * ddy)
  edge = 0.012
  sub = img[:, rows, cols]  # A view: drawing on it draws on img.
  colour = lambda rgb: np.asarray(rgb, _F32)[:, None, None]
  a_disc = 1 / (1 + np.exp((dd - disc_r) / _F32(edge)))
  disc_col = np.array([248.0, 178.0, 120.0]) * np.exp(rng.normal(0, [0.03, 0.06, 0.1]))
  sub += a_disc * (colour(disc_col) - sub)
  cup_r = disc_r * rng.uniform(0.3, 0.55)
  dc = np.sqrt((ddx + _F32(0.2 * disc_r)) ** 2 + ddy * ddy)
  a_cup = rng.uniform(0.5, 0.9) / (1 + np.exp((dc - cup_r) / _F32(edge * 0.8)))
  sub += a_cup * (colour([255.0, 232.0, 200.0]) - sub)
  halo = rng.uniform(0.0, 0.15) * _gauss(dd - _F32(disc_r * 1.1), 0.014)
  sub += halo * (colour([240.0, 170.0, 110.0]) - sub)


def _draw_vessels(img, tree, frame):
  """Darkens img where arteries and veins cross it, each with its own blood colour."""
  a_art, a_vein = vessels.render_vessels(tree, frame.to_px, frame.radius, frame.size)
  on = np.flatnonzero(a_art.reshape(-1) + a_vein.reshape(-1))  # A small part of the image.
  a_art, a_vein = a_art.reshape(-1)[on], a_vein.reshape(-1)[on]
  flat = img.reshape(3, -1)
  flat[:, on] *= 1 + a_art * (_ARTERY - 1)[:, None] + a_vein * (_VEIN - 1)[:, None]


def _lesion_alpha(t, kind, p, frame):
  """Alpha map [S, S] of one lesion layer (see `lesions.lesion_plan`)."""
  a = np.zeros((frame.size, frame.size), _F32)
  if kind == 'vessels':
    for pts, w in p:
      q = frame.to_px(pts)
      raster.segments(a, q[:-1], q[1:], w[:-1] * frame.radius, w[1:] * frame.radius)
    return a
  pts = frame.to_px(p['pts'])
  sa, sb = p['a'] * frame.radius, p['b'] * frame.radius
  if t == lesions.MA:
    # Keep microaneurysms at least a dark pixel at small sizes.
    sa, sb = np.maximum(sa, 0.75), np.maximum(sb, 0.7)
  raster.ellipses(a, pts[:, 1], pts[:, 0], sa, sb, p['theta'], p['opacity'], soft=kind == 'soft',
            flat_top=p['cut'] * frame.radius if kind == 'preretinal' else None)
  return a


def _lesion_colour(t, kind, old, al):
  """New [3, N] colours of pixels `old` [3, N] under lesion alpha `al` [N]: exudates and
  cotton-wool spots are pale deposits painted over; blood lesions darken by a factor."""
  if t in (lesions.EX, lesions.SE):
    return old + al * ((_EX_COLOUR if t == lesions.EX else _SE_COLOUR)[:, None] - old)
  factor = {lesions.MA: _MA_FACTOR, lesions.NV: _NV_FACTOR}.get(t, _HE_FACTOR)
  if kind == 'preretinal':
    factor = _PRERETINAL_FACTOR
  return old * (1 - al * (1 - factor)[:, None])


def _draw_lesions(img, layers, frame):
  """Composites lesion layers on img, in order, on the pixels they cover.

  Returns:
    (contrib, support): contrib[type] [S * S] is the largest change (grey levels, before the
    camera) that layers of that type still make to each pixel, later layers occluding earlier
    ones; support lists the flat pixel indices of each layer.
  """
  flat = img.reshape(3, -1)
  contrib, support = {}, []
  for t, kind, p in layers:
    a = _lesion_alpha(t, kind, p, frame).reshape(-1)
    idx = np.flatnonzero(a)
    support.append(idx)
    al = a[idx] * frame.fov.reshape(-1)[idx]
    old = flat[:, idx]
    new = _lesion_colour(t, kind, old, al)
    flat[:, idx] = new
    for m in contrib.values():
      m[idx] *= 1 - al
    if t not in contrib:
      contrib[t] = np.zeros(frame.size * frame.size, _F32)
    contrib[t][idx] = np.maximum(contrib[t][idx], np.abs(new - old).max(0))
  return contrib, support


def _lesion_masks(y, img, base_img, contrib, support, camera, size):
  """uint8 [S, S, 5] masks of the pixels that lesions changed by >= MASK_THRESHOLD.

  Args:
    y: [3, S, S] the photograph before rounding.
    img, base_img: [3, S, S] the scene with and without lesions.
    contrib, support: from `_draw_lesions`.
    camera: the `camera.make_camera` result that took y.
    size: S.
  """
  types = sorted(contrib)
  illum, gains, sigma = camera.illum, camera.gains, camera.sigma
  if sigma < 0.3:
    # Unblurred: lesions only changed the pixels they cover.
    at = np.unique(np.concatenate(support))
    y_at = y.reshape(3, -1)[:, at]
    delta = img.reshape(3, -1)[:, at] - base_img.reshape(3, -1)[:, at]
    y_base = y_at - delta * illum.reshape(-1)[at] * gains[:, None]
    c = np.stack([contrib[t][at] * illum.reshape(-1)[at] for t in types])
  else:
    at = slice(None)
    y_at = y.reshape(3, -1)
    y_base = y_at - camera(img - base_img, add=False).reshape(3, -1)
    c = raster.blur(np.stack([contrib[t].reshape(size, size) for t in types]) * illum, sigma)
    c = c.reshape(len(types), -1) * camera.fov.reshape(-1)
  # The same photograph without lesions (the camera is linear before rounding).
  change = np.abs(np.clip(y_at, 0, 255).astype(np.int16)
                  - np.clip(y_base, 0, 255).astype(np.int16)).max(0)
  # Upper bounds of the change each type makes to the final image.
  c *= gains.max()
  top = c.max(0)
  # A changed pixel goes to every type that could change it by the threshold,
  # and to the largest contributor, so that no changed pixel is left unmasked.
  keep = (change >= MASK_THRESHOLD) & ((c >= MASK_THRESHOLD) | ((c == top) & (c > 0)))
  planes = np.zeros((len(lesions.LESION_TYPES), size * size), np.uint8)
  for j, t in enumerate(types):
    planes[t, at] = keep[j]
  return planes.reshape(-1, size, size).transpose(1, 2, 0)


def render(seed: int, grade: int, image_size: int, eye: str | None, draw_lesions: bool = True):
  """Renders one photograph, see `generate_example`.

  With draw_lesions=False: the same eye, photographed the same way (same noise),
  without its lesions; masks are then all zero.
  """
  if grade not in range(lesions.NUM_GRADES):
    raise ValueError(f'grade must be in 0..4, got {grade}')
  if image_size < 16:
    raise ValueError(f'image_size must be >= 16, got {image_size}')
  anat, cam, noise_rng = (np.random.default_rng(np.random.SeedSequence([seed, k]))
                          for k in (0, 1, 3))
  les = np.random.default_rng(np.random.SeedSequence([seed, 2, grade]))
  if eye is None:
    eye = ('left', 'right')[int(np.random.default_rng([seed, 4]).integers(2))]
  if eye not in ('left', 'right'):
    raise ValueError(f"eye must be 'left', 'right' or None, got {eye!r}")
  size = image_size

  # The eye, drawn as a right eye: every `anat` draw, in this order.
  frame = _field_of_view(anat, size)
  geo = _landmarks(anat)
  img = _background(anat, size)
  _draw_macula(img, anat, frame, geo['fovea'])
  _draw_optic_disc(img, anat, frame, geo['disc'], geo['disc_r'])
  tree = vessels.vessel_tree(anat, geo['disc'], geo['fovea'])
  if grade == 3 or (grade == 4 and les.uniform() < 0.5):
    vessels.bead_veins(les, tree, int(les.integers(2, 5)))
  _draw_vessels(img, tree, frame)

  # Lesions, tracked so that the masks are where they changed the photograph.
  layers = lesions.lesion_plan(les, grade, geo, tree) if draw_lesions else []
  base_img = img.copy() if layers else img
  contrib, support = _draw_lesions(img, layers, frame)

  photograph = camera.make_camera(cam, noise_rng, frame)
  y = photograph(img, inplace=not contrib)  # img is still needed for the masks.
  if contrib:
    masks = _lesion_masks(y, img, base_img, contrib, support, photograph, size)
  else:
    masks = np.zeros((size, size, len(lesions.LESION_TYPES)), np.uint8)
  image = np.clip(y, 0, 255, out=y).astype(np.uint8).transpose(1, 2, 0)
  if eye == 'left':
    image, masks = image[:, ::-1], masks[:, ::-1]
  return dict(image=np.ascontiguousarray(image), masks=np.ascontiguousarray(masks),
              grade=int(grade), eye=eye)
