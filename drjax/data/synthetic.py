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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import numpy as np

from drjax.data import images

LESION_TYPES = images.LESION_TYPES
MA, HE, EX, SE, NV = range(len(LESION_TYPES))
NUM_GRADES = 5

# Kaggle 2015 Diabetic Retinopathy Detection (EyePACS) training-set grade counts.
EYEPACS_COUNTS = (25810, 2443, 5292, 873, 708)
EYEPACS_PRIOR = tuple(c / sum(EYEPACS_COUNTS) for c in EYEPACS_COUNTS)

# Grey levels (0-255, any channel) a lesion must change a pixel by to be in its mask.
MASK_THRESHOLD = 3

# Step of the vessel polylines, in FOV radii (2.4 px at 512 px).
_DS = 0.01
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


# ----------------------------------------------------------------------------------
# Small numpy helpers.


@functools.lru_cache(maxsize=64)
def _interp_matrix(size: int, grid: int) -> tuple[np.ndarray, float]:
  """[size, grid] weights that smoothly upsample a coarse grid spanning the image,
  and the std of noise upsampled with them (so that it can be rescaled to unit std)."""
  pos = (np.arange(size) + 0.5) / size * (grid - 1)
  w = np.exp(-0.5 * ((pos[:, None] - np.arange(grid)[None, :]) / 0.75) ** 2)
  w = (w / w.sum(1, keepdims=True)).astype(_F32)
  w.setflags(write=False)
  # Var of (W g W^T)[s, t] for iid unit g is |W_s|^2 |W_t|^2.
  return w, float(np.mean(np.sum(w.astype(float) ** 2, 1)))


def _smooth_noise(rng: np.random.Generator, size: int, grid: int, channels: int = 1) -> np.ndarray:
  """Band-limited noise [channels, size, size] with about unit std (two small matmuls each)."""
  g = rng.standard_normal((channels, grid, grid), dtype=_F32)
  w, var = _interp_matrix(size, grid)
  wt = w.T * _F32(1 / var)
  return w @ g @ wt  # [C, S, S]


@functools.lru_cache(maxsize=8)
def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
  """[n, n] Gaussian blur matrix, rows renormalised at the borders."""
  d = np.arange(n, dtype=_F32)
  g = np.exp(-0.5 * ((d[:, None] - d[None, :]) / _F32(sigma)) ** 2)
  g /= g.sum(1, keepdims=True)
  g.setflags(write=False)
  return g


def _blur_banded(x: np.ndarray, sigma: float, axis: int, block: int = 64) -> np.ndarray:
  """Gaussian blur of [..., H, W] along axis -2 or -1 as banded matmuls: each block
  of outputs reads only the inputs within 4 sigma of it."""
  n = x.shape[axis]
  g = _gauss_matrix(n, sigma)
  r = int(np.ceil(4 * sigma))
  out = np.empty(x.shape, _F32)
  for b0 in range(0, n, block):
    b1 = min(n, b0 + block)
    lo, hi = max(0, b0 - r), min(n, b1 + r)
    if axis == -2:
      out[..., b0:b1, :] = g[b0:b1, lo:hi] @ x[..., lo:hi, :]
    else:
      out[..., b0:b1] = x[..., lo:hi] @ g[b0:b1, lo:hi].T
  return out


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur of [..., H, W] along the last two axes.

  Sub-pixel blurs use a 3-tap kernel of the same variance (edges replicated);
  wider ones (unfocused photographs) banded matmuls with a Gaussian matrix
  (renormalised at the borders, truncated at 4 sigma).
  """
  if sigma < 0.3:
    return x
  if sigma > 0.8:
    return _blur_banded(_blur_banded(x, sigma, -2), sigma, -1)
  k = _F32(sigma * sigma / 2)
  for axis in (-2, -1):
    xs = np.moveaxis(x, axis, 0)
    pair = xs[:-1] + xs[1:]
    pair *= k
    # pair[j] = k (x[j] + x[j+1]) is added to out[j] and out[j+1], so each x[j]
    # gets 2k extra weight, taken off here.
    out = xs * (1 - 4 * k)
    out[1:] += pair
    out[:-1] += pair
    out[0] += 2 * k * xs[0]  # Edges replicated.
    out[-1] += 2 * k * xs[-1]
    x = np.moveaxis(out, 0, axis)
  return x


def _splat(acc: np.ndarray, y: np.ndarray, x: np.ndarray, half: int, alpha_fn) -> None:
  """Max-combines one alpha patch per object into `acc` [H, W], in place.

  Args:
    acc: [H, W] float32 alpha map.
    y, x: [N] pixel coordinates of the patch centres (pixel centres at k + 0.5).
    half: patch half size in pixels; patches are [2 * half + 1] squared.
    alpha_fn: (dy [N, P, 1], dx [N, 1, P]) -> alpha [N, P, P], where dy, dx are the
      offsets of the pixel centres from (y, x).
  """
  if len(y) == 0:
    return
  h, w = acc.shape
  offs = np.arange(-half, half + 1)
  iy = np.floor(y).astype(np.int64)[:, None] + offs
  ix = np.floor(x).astype(np.int64)[:, None] + offs
  dy = (iy + 0.5 - y[:, None]).astype(_F32)[:, :, None]
  dx = (ix + 0.5 - x[:, None]).astype(_F32)[:, None, :]
  a = np.broadcast_to(alpha_fn(dy, dx), (len(y), len(offs), len(offs)))
  valid = (((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :]) & (a > 0)
  flat = iy[:, :, None] * w + ix[:, None, :]
  np.maximum.at(acc.reshape(-1), flat[valid], a[valid].astype(_F32))


def _ellipses(acc, y, x, a, b, theta, opacity, soft=False, flat_top=None):
  """Draws filled ellipses (pixel units) into the alpha map `acc` [H, W].

  Hard ellipses get a one-pixel anti-aliased edge; soft ones fall off smoothly
  (cotton-wool spots). `flat_top` [N] (pixels above the centre) cuts the ellipse
  with a horizontal line, the fluid level of a preretinal haemorrhage.
  """
  if len(y) == 0:
    return
  a, b = np.maximum(a, 0.3), np.maximum(b, 0.3)
  col = lambda v: np.asarray(v, _F32)[:, None, None]
  ca, cb, ct, cs, op = col(a), col(b), col(np.cos(theta)), col(np.sin(theta)), col(opacity)
  half = int(np.ceil(max(a.max(), b.max()) + 2))

  def alpha_fn(dy, dx):
    u = dx * ct + dy * cs
    v = -dx * cs + dy * ct
    d = np.sqrt((u / ca) ** 2 + (v / cb) ** 2)
    if soft:
      al = np.clip(1 - d * d, 0, 1) ** 1.5
    else:
      rho = np.sqrt(u * u + v * v)
      rdir = np.where(d > 1e-6, rho / np.maximum(d, 1e-6), np.minimum(ca, cb))
      # Coverage cap: an ellipse smaller than a pixel only darkens it partly.
      al = np.minimum(np.clip((1 - d) * rdir + 0.5, 0, 1), np.pi * ca * cb)
    if flat_top is not None:
      al = al * np.clip(dy + col(flat_top) + 0.5, 0, 1)
    return al * op

  _splat(acc, np.asarray(y, float), np.asarray(x, float), half, alpha_fn)


def _segments(acc, p0, p1, w0, w1, opacity=None):
  """Draws tapered line segments (vessels) into `acc` [H, W]; pixel units, [N, 2] = (x, y)."""
  if len(p0) == 0:
    return
  mid = 0.5 * (p0 + p1)
  half = int(np.ceil(0.5 * np.abs(p1 - p0).max() + max(w0.max(), w1.max()) + 1.5))
  col = lambda v: np.asarray(v, _F32)[:, None, None]
  ex, ey = col(p1[:, 0] - p0[:, 0]), col(p1[:, 1] - p0[:, 1])
  ox, oy = col(p0[:, 0] - mid[:, 0]), col(p0[:, 1] - mid[:, 1])
  len2 = np.maximum(ex * ex + ey * ey, 1e-6)
  cw0, cw1 = col(w0), col(w1)
  op = col(np.ones(len(p0)) if opacity is None else opacity)

  def alpha_fn(dy, dx):
    rx, ry = dx - ox, dy - oy
    t = np.clip((rx * ex + ry * ey) / len2, 0, 1)
    d = np.sqrt((rx - t * ex) ** 2 + (ry - t * ey) ** 2)
    w = cw0 + t * (cw1 - cw0)
    core = np.minimum(np.clip(w + 0.5 - d, 0, 1), 2 * w)
    # Rounder profile: a vessel is a blood-filled cylinder, darkest on its axis.
    return core * (1 - 0.3 * np.clip(d / (w + 0.5), 0, 1) ** 2) * op

  _splat(acc, mid[:, 1], mid[:, 0], half, alpha_fn)


# ----------------------------------------------------------------------------------
# Anatomy (resolution-free units: FOV centre at 0, radius 1, y pointing down).


def _walk(rng, p0, h0, kappa, decay, tort, s):
  """Polylines [m, len(s)] (x, y, heading) of vessels from p0 [m, 2] with headings h0 [m].

  A vessel's heading integrates the curvature `kappa * exp(-s / decay)` (constant where
  decay is inf) plus a random walk of strength `tort` (tortuosity).
  """
  m = len(p0)
  with np.errstate(divide='ignore'):
    kap = kappa[:, None] * np.exp(-s[None, :] / decay[:, None])
  walk = rng.standard_normal((m, len(s))) * (tort * np.sqrt(_DS))[:, None]
  heading = h0[:, None] + np.cumsum(kap * _DS + walk, 1)
  dx, dy = np.cos(heading) * _DS, np.sin(heading) * _DS
  x = p0[:, :1] + np.cumsum(dx, 1) - dx
  y = p0[:, 1:] + np.cumsum(dy, 1) - dy
  return x, y, heading


def _branch_draws(rng, m, nb, depth):
  """Up to nb candidate branches [m, nb] per vessel: arc position, side (+-1), width
  ratio, angle, length and curvature; deeper vessels branch more often, into shorter ones."""
  pos = rng.uniform(0.08, 0.2, (m, 1)) + np.cumsum(
      rng.uniform(0.12, 0.3, (m, nb)) * (0.85 ** depth)[:, None], 1)
  side = rng.integers(0, 2, (m, nb)) * 2.0 - 1.0
  ratio = rng.uniform(0.5, 0.75, (m, nb))
  angle = rng.uniform(0.6, 1.3, (m, nb))
  lens = rng.uniform(0.3, 0.8, (m, nb)) * (0.75 ** depth)[:, None]
  # Branches curve back towards their parent's direction.
  curv = rng.uniform(-0.3, 0.8, (m, nb))
  return pos, side, ratio, angle, lens, curv


def _grow_vessels(rng, p0, h0, w0, length, kappa, decay, tort, depth, vein, fovea, max_depth=3):
  """Grows vessels as polylines and, generation by generation, their branches.

  Each generation is one batch of array operations (`_walk`). A vessel stops at the FOV edge
  and at the foveal avascular zone. Branches leave at 0.6-1.3 rad with 50-75% of the
  parent's width, and the parent thins after each (Murray's law).

  Args are [m] arrays (p0 [m, 2]) for the first generation; fovea = (x, y).

  Returns:
    dict of flat per-point arrays: x, y, w (half-width), s (arc length), vid
    (vessel id), depth, vein; and seg (bool: point i joins point i + 1).
  """
  fx, fy = fovea
  parts, first_id = [], 0
  while len(p0):
    m = len(p0)
    n = np.maximum((length / _DS).astype(int), 3)
    big_n = int(n.max())
    k = np.arange(big_n)
    s = k * _DS
    x, y, heading = _walk(rng, p0, h0, kappa, decay, tort, s)
    bad = (x * x + y * y > 1.0) | ((x - fx) ** 2 + (y - fy) ** 2 < 0.09 ** 2)
    bad[:, :2] = False
    bad |= k[None, :] >= n[:, None]
    end = np.where(bad.any(1), bad.argmax(1), big_n)
    w = w0[:, None] * (1 - 0.3 * s[None, :] / length[:, None])
    nb = int(s[-1] / 0.1) + 1
    rows = np.repeat(np.arange(m)[:, None], nb, 1)
    pos, side, ratio, angle, lens, curv = _branch_draws(rng, m, nb, depth)
    ib = np.minimum((pos / _DS).astype(int), big_n - 1)
    wc = np.take_along_axis(w, ib, 1) * ratio
    ok = ((pos < (end * _DS)[:, None] - 0.04) & (end >= 3)[:, None]
          & (depth < max_depth)[:, None] & (wc >= 0.0018))
    count = np.zeros((m, big_n + 1))
    np.add.at(count, (rows[ok], ib[ok] + 1), 1)
    w *= 0.93 ** np.cumsum(count, 1)[:, :big_n]
    keep = (k[None, :] < end[:, None]) & (end >= 3)[:, None]
    r = np.broadcast_to(np.arange(m)[:, None], (m, big_n))[keep]
    seg = keep.copy()
    seg[:, :-1] &= keep[:, 1:]
    seg[:, -1] = False
    parts.append(dict(x=x[keep], y=y[keep], w=w[keep], s=np.broadcast_to(s, (m, big_n))[keep],
                      vid=first_id + r, depth=depth[r], vein=vein[r], seg=seg[keep]))
    first_id += m
    # The kept branches are the next generation.
    rb, cb = rows[ok], ib[ok]
    p0 = np.stack([x[rb, cb], y[rb, cb]], -1)
    h0 = heading[rb, cb] + side[ok] * angle[ok]
    w0, length = wc[ok], lens[ok]
    kappa, decay = -side[ok] * curv[ok], np.full(len(rb), 0.4)
    tort, depth, vein = tort[rb] * 1.5, depth[rb] + 1, vein[rb]
  out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
  out['beaded'] = np.zeros(len(out['x']), bool)
  return out


def _vessel_tree(rng, disc, fovea):
  """The retinal vessel tree of a right eye: four arcades (artery + vein) and small vessels."""
  p0, h0, w0, length, kappa, decay, tort, depth, vein = ([] for _ in range(9))

  def add(*args):
    for lst, val in zip((p0, h0, w0, length, kappa, decay, tort, depth, vein), args, strict=True):
      lst.append(val)

  for side in (-1.0, 1.0):  # -1 superior (y up), +1 inferior.
    for is_vein in (False, True):
      w = rng.uniform(0.0100, 0.0120) if is_vein else rng.uniform(0.0072, 0.0088)
      start = disc + [rng.normal(0, 0.01), side * rng.uniform(0.0, 0.02)]
      # Temporal arcade: leaves the disc vertically and bends around the macula
      # by `turn` radians, most of it within `dec` of the disc.
      turn, dec = np.deg2rad(rng.uniform(75, 100)), rng.uniform(0.45, 0.7)
      add(start, side * np.deg2rad(rng.uniform(95, 115)), w, rng.uniform(1.5, 1.9),
          side * turn / dec, dec, 0.3, 0, is_vein)
      # Nasal vessel: straighter, towards the nasal periphery.
      add(start, side * np.deg2rad(rng.uniform(35, 70)), 0.8 * w, rng.uniform(0.5, 0.9),
          -side * rng.uniform(0, 1.0), np.inf, 0.5, 1, is_vein)
  # Small vessels from the disc: papillomacular (temporal) and nasal.
  for mean_h, count, lo, hi in ((np.pi, rng.integers(3, 6), 0.3, 0.6),
                                (0.0, rng.integers(2, 4), 0.2, 0.4)):
    for _ in range(count):
      add(disc + rng.normal(0, 0.03, 2), mean_h + rng.normal(0, 0.35), rng.uniform(0.002, 0.0035),
          rng.uniform(lo, hi), rng.normal(0, 1.0), np.inf, 0.8, 2, bool(rng.integers(2)))
  arr = lambda v, dt=float: np.asarray(v, dt)
  return _grow_vessels(rng, arr(p0), arr(h0), arr(w0), arr(length), arr(kappa), arr(decay),
                       arr(tort), arr(depth, int), arr(vein, bool), fovea)


def _bead_veins(rng, vessels, count):
  """Venous beading (a severe-NPDR sign): periodic swellings along `count` large veins."""
  v = vessels
  ids = np.unique(v['vid'][v['vein'] & (v['depth'] <= 1) & (v['s'] > 0.2)])
  if len(ids) == 0:
    return
  for i in rng.choice(ids, size=min(len(ids), count), replace=False):
    on = v['vid'] == i
    s = v['s'][on]
    s0 = rng.uniform(0.15, 0.4) * s[-1]
    s1 = s0 + rng.uniform(0.25, 0.6)
    lam = rng.uniform(0.03, 0.05)
    bump = (0.5 + 0.5 * np.sin(2 * np.pi * (s - s0) / lam)) ** 3
    v['w'][on] *= np.where((s >= s0) & (s <= s1), 1.0 + rng.uniform(0.6, 0.9) * bump, 1.0)
    v['beaded'][on] = True


def _render_vessels(vessels, to_px, scale, size):
  """Alpha maps [H, W] of arteries and veins."""
  v = vessels
  # Render from every `stride`-th point where the polyline step is under ~4 px:
  # fewer, longer segments cost less to splat. Beaded veins keep every point.
  stride = max(1, round(4.0 / (_DS * scale)))
  keep = (np.rint(v['s'] / _DS).astype(int) % stride == 0) | ~v['seg'] | v['beaded']
  idx = np.flatnonzero(keep)
  vid = v['vid'][idx]
  seg = np.append(vid[1:] == vid[:-1], False)
  p = to_px(np.stack([v['x'][idx], v['y'][idx]], -1))
  w = v['w'][idx] * scale
  # Thin vessels hold a thinner blood column, so they are paler as well as narrower.
  op = np.clip(0.3 + 0.7 * v['w'][idx] / 0.011, 0.3, 1.0)
  maps = []
  for is_vein in (False, True):
    acc = np.zeros((size, size), _F32)
    i = np.flatnonzero(seg & (v['vein'][idx] == is_vein))
    # Segments in width classes, so that thin ones use small patches.
    wmax = np.maximum(w[i], w[i + 1])
    for sel in (i[wmax > 1.5], i[(wmax > 0.7) & (wmax <= 1.5)], i[wmax <= 0.7]):
      _segments(acc, p[sel], p[sel + 1], w[sel], w[sel + 1], op[sel])
    maps.append(acc)
  return maps


# ----------------------------------------------------------------------------------
# Lesions.


def _sample_points(rng, n, centre, spread, disc, disc_r, r_max=0.92):
  """n points ~ N(centre, spread) inside the FOV and off the optic disc."""
  pts = np.zeros((0, 2))
  for _ in range(20):
    if len(pts) >= n:
      break
    c = rng.normal(centre, spread, size=(4 * n + 8, 2))
    ok = (np.hypot(c[:, 0], c[:, 1]) < r_max) & (
        np.hypot(c[:, 0] - disc[0], c[:, 1] - disc[1]) > 1.3 * disc_r)
    pts = np.concatenate([pts, c[ok]])
  return pts[:n]


def _sample_quadrant(rng, n, q, disc, disc_r):
  """n points in quadrant q (0..3, around the FOV centre), off the disc."""
  pts = np.zeros((0, 2))
  for _ in range(20):
    if len(pts) >= n:
      break
    ang = (q + rng.uniform(0.08, 0.92, 4 * n + 8)) * (np.pi / 2)
    r = np.sqrt(rng.uniform(0.05, 0.78, 4 * n + 8))
    c = np.stack([r * np.cos(ang), r * np.sin(ang)], -1)
    ok = np.hypot(c[:, 0] - disc[0], c[:, 1] - disc[1]) > 1.3 * disc_r
    pts = np.concatenate([pts, c[ok]])
  return pts[:n]


def _near_vessels(rng, n, vessels, fovea, disc, disc_r):
  """n points beside small vessels of the posterior pole (where MAs bud off capillaries)."""
  sel = vessels['depth'] >= 1
  pts = np.stack([vessels['x'][sel], vessels['y'][sel]], -1)
  d_f = np.hypot(pts[:, 0] - fovea[0], pts[:, 1] - fovea[1])
  d_d = np.hypot(pts[:, 0] - disc[0], pts[:, 1] - disc[1])
  pool = pts[(d_f < 0.7) & (d_d > 1.4 * disc_r) & (np.hypot(pts[:, 0], pts[:, 1]) < 0.9)]
  if len(pool) == 0:
    return np.zeros((0, 2))
  return pool[rng.integers(0, len(pool), n)] + rng.normal(0, 0.015, (n, 2))


def _microaneurysms(rng, n, vessels, geo, post):
  """n microaneurysms: tiny round dots, most budding off small vessels, the rest scattered
  around the posterior pole `post`."""
  fovea, disc, disc_r = geo['fovea'], geo['disc'], geo['disc_r']
  k = rng.binomial(n, 0.6)
  pts = np.concatenate([_near_vessels(rng, k, vessels, fovea, disc, disc_r),
                        _sample_points(rng, n - k, post, 0.3, disc, disc_r, 0.85)])
  r = rng.uniform(0.004, 0.009, len(pts))
  return dict(pts=pts, a=r, b=r * rng.uniform(0.85, 1.0, len(pts)),
              theta=rng.uniform(0, np.pi, len(pts)), opacity=rng.uniform(0.8, 1.0, len(pts)))


def _haemorrhage_sites(rng, grade, post, disc, disc_r):
  """Where haemorrhages are: a few around the posterior pole (grade 2), or some in each of
  the four quadrants (grades 3 and 4: severe NPDR has them in all four)."""
  if grade == 2:
    return _sample_points(rng, rng.integers(1, 9), post, 0.35, disc, disc_r, 0.88)
  lo, hi = (4, 10) if grade == 3 else (2, 8)
  return np.concatenate([_sample_quadrant(rng, rng.integers(lo, hi), q, disc, disc_r)
                         for q in range(4)])


def _haemorrhages(rng, pts, disc):
  """Dot/blot haemorrhages (1-3 overlapping ellipses) and flame haemorrhages at `pts`."""
  n = len(pts)
  out = dict(pts=[], a=[], b=[], theta=[], opacity=[])
  flame = rng.uniform(size=n) < 0.3
  r = rng.uniform(0.010, 0.030, n)
  for i in range(n):
    if flame[i]:
      # Flame haemorrhages lie in the nerve fibre layer, along the fibres (radial to the disc).
      th = np.arctan2(pts[i, 1] - disc[1], pts[i, 0] - disc[0])
      out['pts'].append(pts[i][None])
      out['a'].append([r[i] * 1.8])
      out['b'].append([r[i] * 0.5])
      out['theta'].append([th])
      out['opacity'].append([rng.uniform(0.7, 0.9)])
    else:
      k = rng.integers(1, 4)
      off = rng.normal(0, 0.5 * r[i], (k, 2))
      off[0] = 0
      rr = r[i] * rng.uniform(0.6, 1.0, k)
      out['pts'].append(pts[i] + off)
      out['a'].append(rr)
      out['b'].append(rr * rng.uniform(0.6, 1.0, k))
      out['theta'].append(rng.uniform(0, np.pi, k))
      out['opacity'].append(np.full(k, rng.uniform(0.75, 0.95)))
  return {k: np.concatenate(v) for k, v in out.items()}


def _hard_exudates(rng, n_clusters, geo):
  """Clusters of yellow lipid deposits near the macula, scattered or in a circinate ring;
  None if no cluster centre could be placed."""
  fovea, disc, disc_r = geo['fovea'], geo['disc'], geo['disc_r']
  out = dict(pts=[], a=[], b=[], theta=[], opacity=[])
  centres = _sample_points(rng, n_clusters, fovea, 0.25, disc, disc_r, 0.8)
  for c in centres:
    k = rng.integers(4, 22)
    if rng.uniform() < 0.4:  # Circinate ring around a leaking area.
      ang = rng.uniform(0, 2 * np.pi, k)
      rad = rng.uniform(0.05, 0.1) * rng.uniform(0.85, 1.15, k)
      p = c + np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)
    else:
      p = c + rng.normal(0, rng.uniform(0.02, 0.05), (k, 2))
    r = rng.uniform(0.003, 0.012, k)
    # Irregular, partly confluent deposits: each is 1-3 overlapping ellipses.
    parts = rng.integers(1, 4, k)
    idx = np.repeat(np.arange(k), parts)
    first = np.concatenate([[0], np.cumsum(parts)[:-1]])
    off = rng.normal(0, 0.7, (len(idx), 2)) * r[idx, None]
    off[first] = 0
    sub = r[idx] * np.where(np.isin(np.arange(len(idx)), first), 1.0,
                            rng.uniform(0.4, 0.8, len(idx)))
    out['pts'].append(p[idx] + off)
    out['a'].append(sub)
    out['b'].append(sub * rng.uniform(0.45, 1.0, len(idx)))
    out['theta'].append(rng.uniform(0, np.pi, len(idx)))
    out['opacity'].append(rng.uniform(0.7, 0.95, len(idx)))
  if not out['pts']:
    return None
  return {k: np.concatenate(v) for k, v in out.items()}


def _cotton_wool_spots(rng, n, geo):
  """n soft, pale, fluffy spots (each 2-3 overlapping ellipses), mostly around the disc."""
  disc, disc_r = geo['disc'], geo['disc_r']
  c = _sample_points(rng, n, disc + np.array([-0.25, 0.0]), 0.3, disc, disc_r, 0.8)
  out = dict(pts=[], a=[], b=[], theta=[], opacity=[])
  for p in c:
    k = rng.integers(2, 4)
    r = rng.uniform(0.03, 0.055)
    out['pts'].append(p + rng.normal(0, 0.4 * r, (k, 2)))
    out['a'].append(r * rng.uniform(0.6, 1.0, k))
    out['b'].append(r * rng.uniform(0.4, 0.7, k))
    out['theta'].append(rng.uniform(0, np.pi, k))
    out['opacity'].append(rng.uniform(0.45, 0.7, k))
  return {k: np.concatenate(v) for k, v in out.items()}


def _neovascularisation(rng, n_regions, vessels, geo):
  """Fronds of fine tortuous new vessels at the disc (NVD) or along the arcades (NVE):
  a list of (points [n, 2], half-widths [n]) polylines."""
  disc, disc_r = geo['disc'], geo['disc_r']
  segs = []
  sel = vessels['depth'] == 0
  arc = np.stack([vessels['x'][sel], vessels['y'][sel]], -1)
  for j in range(n_regions):
    if j == 0 and rng.uniform() < 0.5:
      c = np.asarray(disc) + rng.normal(0, 0.5 * disc_r, 2)
    else:
      c = arc[rng.integers(len(arc))]
    rad = rng.uniform(0.05, 0.1)
    for _ in range(rng.integers(10, 20)):
      n = rng.integers(8, 20)
      h = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.6, n))
      p0 = c + rng.normal(0, 0.45 * rad, 2)
      pts = p0 + np.cumsum(np.stack([np.cos(h), np.sin(h)], -1) * 0.008, 0)
      w = np.full(n, rng.uniform(0.0022, 0.0035))
      segs.append((pts, w))
  return segs


def _preretinal_haemorrhage(rng, post, geo):
  """One large dark haemorrhage in front of the retina, its top cut flat by the fluid level."""
  c = _sample_points(rng, 1, post, 0.3, geo['disc'], geo['disc_r'], 0.7)
  r = rng.uniform(0.07, 0.13, 1)
  return dict(pts=c, a=r, b=r * rng.uniform(0.7, 0.9, 1), theta=np.zeros(1),
              opacity=np.full(1, 0.95), cut=r * rng.uniform(0.1, 0.5, 1))


def _lesion_plan(rng, grade, geo, vessels):
  """Samples the lesions of one eye: a list of layers (type, kind, params), resolution free.

  Layers are composited in list order; `kind` says how a layer is drawn ('ellipse', 'soft',
  'preretinal' or 'vessels'). Reordering the draws would change every seed's lesions.
  """
  if grade == 0:
    return []
  post = (0.6 * np.asarray(geo['fovea']) + 0.4 * np.asarray(geo['disc']))
  # All four counts are drawn, as when the existing datasets were made.
  n_ma = [rng.integers(1, 9), rng.integers(4, 20), rng.integers(10, 30),
          rng.integers(8, 25)][grade - 1]
  layer_ma = _microaneurysms(rng, n_ma, vessels, geo, post)
  layers = []
  if grade >= 2:
    sites = _haemorrhage_sites(rng, grade, post, geo['disc'], geo['disc_r'])
    layers.append((HE, 'ellipse', _haemorrhages(rng, sites, geo['disc'])))
  layers.append((MA, 'ellipse', layer_ma))
  if grade >= 2:
    p_ex, n_ex = {2: (0.7, 3), 3: (0.75, 4), 4: (0.6, 4)}[grade]
    if rng.uniform() < p_ex:
      ex = _hard_exudates(rng, rng.integers(1, n_ex + 1), geo)
      if ex is not None:
        layers.append((EX, 'ellipse', ex))
    p_se = {2: 0.35, 3: 0.55, 4: 0.5}[grade]
    if rng.uniform() < p_se:
      layers.append((SE, 'soft', _cotton_wool_spots(rng, rng.integers(1, 4), geo)))
  if grade == 4:
    layers.append((NV, 'vessels', _neovascularisation(rng, rng.integers(1, 3), vessels, geo)))
    if rng.uniform() < 0.4:
      layers.append((HE, 'preretinal', _preretinal_haemorrhage(rng, post, geo)))
  return layers


# ----------------------------------------------------------------------------------
# Rendering: the scene is drawn planar, [3, S, S], in nominal grey levels, then photographed.


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
  img = _smooth_noise(rng, size, 6, 3)
  img *= np.array([0.05, 0.07, 0.09], _F32)[:, None, None] * base
  img += base
  chor = _smooth_noise(rng, size, 28)[0]
  fine = _smooth_noise(rng, size, 64)[0]
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


def _draw_vessels(img, vessels, frame):
  """Darkens img where arteries and veins cross it, each with its own blood colour."""
  a_art, a_vein = _render_vessels(vessels, frame.to_px, frame.radius, frame.size)
  on = np.flatnonzero(a_art.reshape(-1) + a_vein.reshape(-1))  # A small part of the image.
  a_art, a_vein = a_art.reshape(-1)[on], a_vein.reshape(-1)[on]
  flat = img.reshape(3, -1)
  flat[:, on] *= 1 + a_art * (_ARTERY - 1)[:, None] + a_vein * (_VEIN - 1)[:, None]


def _lesion_alpha(t, kind, p, frame):
  """Alpha map [S, S] of one lesion layer (see `_lesion_plan`)."""
  a = np.zeros((frame.size, frame.size), _F32)
  if kind == 'vessels':
    for pts, w in p:
      q = frame.to_px(pts)
      _segments(a, q[:-1], q[1:], w[:-1] * frame.radius, w[1:] * frame.radius)
    return a
  pts = frame.to_px(p['pts'])
  sa, sb = p['a'] * frame.radius, p['b'] * frame.radius
  if t == MA:
    # Keep microaneurysms at least a dark pixel at small sizes.
    sa, sb = np.maximum(sa, 0.75), np.maximum(sb, 0.7)
  _ellipses(a, pts[:, 1], pts[:, 0], sa, sb, p['theta'], p['opacity'], soft=kind == 'soft',
            flat_top=p['cut'] * frame.radius if kind == 'preretinal' else None)
  return a


def _lesion_colour(t, kind, old, al):
  """New [3, N] colours of pixels `old` [3, N] under lesion alpha `al` [N]: exudates and
  cotton-wool spots are pale deposits painted over; blood lesions darken by a factor."""
  if t in (EX, SE):
    return old + al * ((_EX_COLOUR if t == EX else _SE_COLOUR)[:, None] - old)
  factor = {MA: _MA_FACTOR, NV: _NV_FACTOR}.get(t, _HE_FACTOR)
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
      y = _blur(y, self.sigma)
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
    _ellipses(dust, pts[:, 1], pts[:, 0], rad, rad * rng.uniform(0.8, 1.0, k), np.zeros(k),
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


def _make_camera(rng, noise_rng, frame):
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


def _lesion_masks(y, img, base_img, contrib, support, camera, size):
  """uint8 [S, S, 5] masks of the pixels that lesions changed by >= MASK_THRESHOLD.

  Args:
    y: [3, S, S] the photograph before rounding.
    img, base_img: [3, S, S] the scene with and without lesions.
    contrib, support: from `_draw_lesions`.
    camera: the `_Camera` that took y.
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
    c = _blur(np.stack([contrib[t].reshape(size, size) for t in types]) * illum, sigma)
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
  planes = np.zeros((len(LESION_TYPES), size * size), np.uint8)
  for j, t in enumerate(types):
    planes[t, at] = keep[j]
  return planes.reshape(-1, size, size).transpose(1, 2, 0)


def _render(seed: int, grade: int, image_size: int, eye: str | None, draw_lesions: bool = True):
  """Renders one photograph, see `generate_example`.

  With draw_lesions=False: the same eye, photographed the same way (same noise),
  without its lesions; masks are then all zero.
  """
  if grade not in range(NUM_GRADES):
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
  vessels = _vessel_tree(anat, geo['disc'], geo['fovea'])
  if grade == 3 or (grade == 4 and les.uniform() < 0.5):
    _bead_veins(les, vessels, int(les.integers(2, 5)))
  _draw_vessels(img, vessels, frame)

  # Lesions, tracked so that the masks are where they changed the photograph.
  layers = _lesion_plan(les, grade, geo, vessels) if draw_lesions else []
  base_img = img.copy() if layers else img
  contrib, support = _draw_lesions(img, layers, frame)

  camera = _make_camera(cam, noise_rng, frame)
  y = camera(img, inplace=not contrib)  # img is still needed for the masks.
  if contrib:
    masks = _lesion_masks(y, img, base_img, contrib, support, camera, size)
  else:
    masks = np.zeros((size, size, len(LESION_TYPES)), np.uint8)
  image = np.clip(y, 0, 255, out=y).astype(np.uint8).transpose(1, 2, 0)
  if eye == 'left':
    image, masks = image[:, ::-1], masks[:, ::-1]
  return dict(image=np.ascontiguousarray(image), masks=np.ascontiguousarray(masks),
              grade=int(grade), eye=eye)


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
  return _render(int(seed), int(grade), int(image_size), eye)


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
