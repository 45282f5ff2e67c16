"""DR lesions by grade (international clinical scale), placed in resolution-free units:
microaneurysms, haemorrhages, hard exudates, cotton-wool spots, neovascularisation and
preretinal haemorrhage, planned as layers of one lesion type each."""

from __future__ import annotations

import numpy as np

from drjax.data import images

LESION_TYPES = images.LESION_TYPES
MA, HE, EX, SE, NV = range(len(LESION_TYPES))
NUM_GRADES = 5


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


def lesion_plan(rng, grade, geo, vessels):
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
