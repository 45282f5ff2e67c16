"""Small numpy raster helpers of the synthetic fundus renderer: smooth noise, separable
Gaussian blur, and anti-aliased ellipses and line segments splatted into an accumulator."""

from __future__ import annotations

import functools

import numpy as np

_F32 = np.float32


def _interp_matrix(size: int, grid: int) -> tuple[np.ndarray, float]:
  """[size, grid] weights that smoothly upsample a coarse grid spanning the image,
  and the std of noise upsampled with them (so that it can be rescaled to unit std)."""
  pos = (np.arange(size) + 0.5) / size * (grid - 1)
  w = np.exp(-0.5 * ((pos[:, None] - np.arange(grid)[None, :]) / 0.75) ** 2)
  w = (w / w.sum(1, keepdims=True)).astype(_F32)
  w.setflags(write=False)
  # Var of (W g W^T)[s, t] for iid unit g is |W_s|^2 |W_t|^2.
  return w, float(np.mean(np.sum(w.astype(float) ** 2, 1)))


def smooth_noise(rng: np.random.Generator, size: int, grid: int, channels: int = 1) -> np.ndarray:
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


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
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


def ellipses(acc, y, x, a, b, theta, opacity, soft=False, flat_top=None):
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


def segments(acc, p0, p1, w0, w1, opacity=None):
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
