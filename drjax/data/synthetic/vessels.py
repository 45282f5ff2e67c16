"""The retinal vessel tree, in resolution-free units (FOV centre at 0, radius 1, y pointing
down): arcades from the optic disc that branch and curl around the fovea, venous beading, and
the tree rendered as widths and opacities."""

from __future__ import annotations

import numpy as np

from drjax.data.synthetic import raster

# Step of the vessel polylines, in FOV radii (2.4 px at 512 px).
_DS = 0.01
_F32 = np.float32


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


def vessel_tree(rng, disc, fovea):
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


def bead_veins(rng, vessels, count):
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


def render_vessels(vessels, to_px, scale, size):
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
      raster.segments(acc, p[sel], p[sel + 1], w[sel], w[sel + 1], op[sel])
    maps.append(acc)
  return maps
