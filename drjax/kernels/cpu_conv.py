"""An opt-in convolution backend for XLA:CPU: the same function as `lax.conv_general_dilated`,
computed the way XLA:CPU runs fastest.

    conv = cpu_conv.make()                       # None unless jax runs on the CPU
    model = models.get_model('resnet101', conv_general_dilated=conv)

Training and evaluation switch it with `config.cpu_conv`; the models themselves never import
it. On NHWC/HWIO convolutions with explicit padding, no dilation and one feature group (all of
the ports'), it takes one of these paths (benchmarks/README.md has the measurements):
- 3x3 stride-1 convolutions with 64 or more channels as Winograd F(2x2, 3x3): 16 dots
  instead of 36 multiply-adds per channel pair (`winograd_conv3x3`).
- DenseNet's 128 -> 32 convolutions as Winograd's forward pass with the direct convolution's
  gradients, a band of rows at a time from 28x28 up (`_winograd_forward`).
- 1x1 convolutions as dots, whose kernel gradient reads a transposed copy of the input
  (`_pointwise_conv`).
- Strided convolutions with fewer than 14x14 output pixels as a sum over kernel taps of 1x1
  convolutions (`_tap_sum_conv`).
- Otherwise XLA's convolution, with the kernel gradient as one dot per kernel tap from 14x14
  output pixels up (`_conv_tap_grad`).
The values are the same sums in another order: tests hold them to `lax.conv_general_dilated`'s
and the models' parity tests to torchvision's with the backend on and off. bfloat16
convolutions keep XLA's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax

NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                     out_spec=(0, 3, 1, 2))
# Below this many output pixels XLA's own kernel gradient and strided convolution win.
_MIN_TAP_DOT_PIXELS = 14 * 14


def make(threads: int | None = None) -> CpuConv | None:
  """The backend for this process's CPU, or None when jax's default backend is not the CPU.

  Args:
    threads: cores XLA:CPU spreads one device's program over; default `xla_cpu_threads()`.
  """
  if jax.default_backend() != 'cpu':
    return None
  return CpuConv(threads=threads or xla_cpu_threads())


def xla_cpu_threads() -> int:
  """The cores one CPU device's program runs on: this process's CPU affinity over its devices.

  XLA's CPU client sizes its thread pool to the process's affinity; several CPU devices share
  that pool.
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, (cores or 1) // jax.local_device_count('cpu'))


@dataclasses.dataclass(frozen=True)
class CpuConv:
  """`lax.conv_general_dilated`'s signature (what `nn.Conv` calls), computed as described above.

  A frozen dataclass, so that two backends with the same `threads` are equal and a model
  holding one is hashed alike by `jax.jit`.

  Attributes:
    threads: cores of one device's program; with more than one, DenseNet's 128 -> 32
      convolutions take Winograd from 14x14 pixels up (XLA:CPU runs those on one thread).
  """
  threads: int = 1

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None,
               preferred_element_type=None):
    ones = (1, 1)
    if not (lhs.ndim == 4 and dimension_numbers == NHWC_HWIO and feature_group_count == 1
            and lhs.dtype == rhs.dtype == jnp.float32
            and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
            and not isinstance(padding, str) and preferred_element_type is None):
      return lax.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
          rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
          feature_group_count=feature_group_count, precision=precision,
          preferred_element_type=preferred_element_type)
    strides = tuple(window_strides)
    padding = tuple(tuple(p) for p in padding)
    winograd = _winograd_path(lhs, rhs, strides, padding, self.threads)
    if winograd is not None:
      return winograd(lhs, rhs, precision)
    if rhs.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
      if strides != (1, 1):
        lhs = lhs[:, ::strides[0], ::strides[1], :]
      return _pointwise_conv(lhs, rhs[0, 0], precision)
    if _takes_tap_sum(lhs, rhs, strides, padding):
      return _tap_sum_conv(lhs, rhs, strides, padding, precision)
    return _conv_tap_grad(lhs, rhs, strides, padding, precision)


def _output_hw(x, kernel_hw, strides, padding) -> tuple[int, int]:
  return tuple((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s
               in zip(x.shape[1:3], padding, kernel_hw, strides, strict=True))


def _takes_tap_sum(x, kernel, strides, padding) -> bool:
  out_h, out_w = _output_hw(x, kernel.shape[:2], strides, padding)
  return (strides != (1, 1) and out_h * out_w < _MIN_TAP_DOT_PIXELS
          and x.dtype == kernel.dtype == jnp.float32)


# ------------------------------------------------------------------ 1x1 convolutions


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise_conv(x, kernel, precision):
  """A 1x1 convolution as a dot, `[..., Cin] x [Cin, Cout]`."""
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _pointwise_conv_fwd(x, kernel, precision):
  return _pointwise_conv(x, kernel, precision), (x, kernel)


def _pointwise_conv_bwd(precision, residuals, dy):
  """Autodiff's gradients, except that the kernel gradient reads a transposed copy of `x`.

  XLA:CPU's fast dot wants its left operand's contracted axis last; autodiff's form (the
  pixels, the leading axis of both operands) sends it to a slower dot.
  """
  x, kernel = residuals
  dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)
  x_t = _materialised_transpose(x.reshape(-1, x.shape[-1]))
  dkernel = lax.dot_general(x_t, dy.reshape(-1, dy.shape[-1]), (((1,), (0,)), ((), ())),
                            precision=precision)
  return dx, dkernel.astype(kernel.dtype)


_pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def _materialised_transpose(x):
  """`x.T` for a 2-D `x`, as a transposing copy of `x` itself.

  Otherwise XLA:CPU fuses the ops that produce `x` into the copy, which then recomputes them
  reading their inputs in transposed order. Fusion does not cross a conditional whose
  predicate is only known at run time; both branches are the same transpose. (XLA:CPU
  expands an `optimization_barrier` before fusion, so that does not do it.)
  """
  return lax.cond(x[0, 0] == x[0, 0], lambda v: v.T, lambda v: v.T, x)


# ------------------------------------------------------------------ convolutions by tap


def _tap_inputs(x, kernel_hw, strides, padding) -> list:
  """For each kernel tap (i, j), row-major, the input pixels it meets:
  x_padded[:, i + s*r, j + s*c, :] over the output pixels (r, c)."""
  x_padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  (out_h, out_w), (sh, sw) = _output_hw(x, kernel_hw, strides, padding), strides
  batch, _, _, channels = x_padded.shape
  return [lax.slice(x_padded, (0, i, j, 0),
                    (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, channels),
                    (1, sh, sw, 1))
          for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]


def _tap_sum_conv(x, kernel, strides, padding, precision):
  """NHWC convolution as the sum over kernel taps (i, j) of the input pixels the tap meets,
  1x1-convolved with `kernel[i, j]`; gradients by autodiff."""
  taps = _tap_inputs(x, kernel.shape[:2], strides, padding)
  kernels = kernel.reshape(-1, *kernel.shape[2:])  # row-major taps, as _tap_inputs
  return functools.reduce(jnp.add, [_pointwise_conv(t, k, precision)
                                    for t, k in zip(taps, kernels, strict=True)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tap_grad(x, kernel, strides, padding, precision):
  """XLA's NHWC convolution whose kernel gradient is one dot per tap.

  XLA:CPU's own weight-gradient convolution slows down as the image grows; the tap's
  shifted input against the output gradient does not.
  """
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC_HWIO,
                                  precision=precision)


def _conv_tap_grad_fwd(x, kernel, strides, padding, precision):
  return _conv_tap_grad(x, kernel, strides, padding, precision), (x, kernel)


def _conv_tap_grad_bwd(strides, padding, precision, residuals, dy):
  x, kernel = residuals
  conv = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=padding,
                           dimension_numbers=NHWC_HWIO, precision=precision)
  out_hw = dy.shape[1:3]
  if out_hw[0] * out_hw[1] < _MIN_TAP_DOT_PIXELS:
    return jax.vjp(conv, x, kernel)[1](dy)
  (dx,) = jax.vjp(lambda x: conv(x, kernel), x)[1](dy)
  taps = [lax.dot_general(tap, dy, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32)
          for tap in _tap_inputs(x, kernel.shape[:2], strides, padding)]
  dkernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dkernel


_conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


# ------------------------------------------------------------------ Winograd F(2x2, 3x3)
#
# Lavin & Gray 2016, "Fast algorithms for convolutional neural networks": each 2x2 block of
# outputs of a 3x3 convolution g is A^T [(G g G^T) . (B^T d B)] A for the 4x4 input tile d
# around it, so the 36 multiply-adds per input/output channel pair become 16, done as 16 dots
# [pixels / 4, Cin] x [Cin, Cout]. The transforms are additions of shifted slices, which XLA
# fuses. Not taken above 112x112 pixels (the 4x larger transformed input leaves the cache) nor
# in bfloat16; each of the 16 dots compiles as its own fusion, so compiling takes longer.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
_WINOGRAD_MIN_CHANNELS = 64
_WINOGRAD_MAX_PIXELS = 112 * 112
# DenseNet's 128 -> 32 convolutions: too few output channels for whole-batch Winograd to pay.
_WINOGRAD_NARROW_MIN_OUT_CHANNELS = 32
_WINOGRAD_BANDED_MIN_PIXELS = 28 * 28
_WINOGRAD_BAND_PIXELS = 28 * 56
_WINOGRAD_THREADED_MIN_PIXELS = 14 * 14


def _winograd_path(x, kernel, strides, padding, threads: int):
  """The Winograd function for this convolution, or None where XLA's was as fast or faster.

  `winograd_conv3x3` (its own gradients) with 64 or more input and output channels, up to
  112x112 pixels. DenseNet's 128 -> 32 convolutions take `_winograd_forward`, Winograd's
  forward pass with the direct convolution's gradients: from 28x28 pixels up a band of rows
  at a time, so that the transformed tiles stay in cache; at 14x14 with more than one thread
  the whole batch at once, since XLA:CPU runs those convolutions on one thread.
  """
  pixels = x.shape[1] * x.shape[2]
  if not (_may_take_winograd(kernel, strides, padding) and x.dtype == jnp.float32
          and pixels <= _WINOGRAD_MAX_PIXELS):
    return None
  if kernel.shape[-1] >= _WINOGRAD_MIN_CHANNELS:
    return winograd_conv3x3
  if pixels >= _WINOGRAD_BANDED_MIN_PIXELS:
    return _winograd_forward_banded
  if pixels >= _WINOGRAD_THREADED_MIN_PIXELS and threads > 1:
    return _winograd_forward
  return None


def _may_take_winograd(kernel, strides, padding) -> bool:
  kernel_h, kernel_w, in_channels, out_channels = kernel.shape
  return ((kernel_h, kernel_w) == (3, 3) and strides == (1, 1) and padding == ((1, 1), (1, 1))
          and kernel.dtype == jnp.float32 and in_channels >= _WINOGRAD_MIN_CHANNELS
          and out_channels >= _WINOGRAD_NARROW_MIN_OUT_CHANNELS)


def _combine(parts, coefficients):
  """sum(c * part) over the non-zero coefficients, written out at trace time."""
  total = None
  for c, part in zip(coefficients, parts, strict=True):
    if c == 0:
      continue
    term = part if c == 1 else -part if c == -1 else part * jnp.asarray(c, part.dtype)
    total = term if total is None else total + term
  return total


def winograd_conv3x3(x, kernel, precision=None, band_pixels=None):
  """NHWC x HWIO 3x3 convolution, stride 1, padding 1, as Winograd F(2x2, 3x3).

  The same function as `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` at
  any height and width (odd sizes pad the last tile), up to float32 rounding. Gradients are
  jax's autodiff of the same slices, sums and dots.

  With `band_pixels`, a band of rows of a group of images at a time (`lax.map`), of about
  that many output pixels, so that its transformed tiles stay in cache. The bands split the
  rows first; only where a band of 2 rows of every image is still well above `band_pixels`
  do they split the batch too, into strided groups (image i * groups + g in group g), so that
  a batch sharded over devices stays sharded. Without, the whole batch at once.
  """
  batch, height, width, _ = x.shape
  kernels = _winograd_kernels(kernel)
  tile_rows, tiles_w = -(-height // 2), -(-width // 2)
  if band_pixels is None or batch == 0:  # (an empty batch has no divisor to group by)
    # Tile (r, c) reads rows 2r..2r+3 and columns 2c..2c+3 of the padded input.
    x = jnp.pad(x, ((0, 0), (1, 2 * tile_rows + 1 - height), (1, 2 * tiles_w + 1 - width),
                    (0, 0)))
    return _winograd_tiles(x, kernels, precision)[:, :height, :width]
  wanted = batch * height * width / band_pixels
  num_bands = _nearest_divisor(tile_rows, wanted)
  groups = _nearest_divisor(batch, wanted / num_bands)
  band, per_group = 2 * (tile_rows // num_bands), batch // groups
  # Band j reads rows j*band .. j*band + band + 1 of the input padded above and below; each
  # band pads its columns itself, inside its input transform.
  x = jnp.pad(x, ((0, 0), (1, num_bands * band + 1 - height), (0, 0), (0, 0)))

  def one_band(images, j):
    rows = lax.dynamic_slice_in_dim(images, j * band, band + 2, axis=1)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (1, 2 * tiles_w + 1 - width), (0, 0)))
    return _winograd_tiles(rows, kernels, precision)[:, :, :width]

  if groups == 1:  # the grouped loop's reshape and index cost time of their own
    y = lax.map(functools.partial(one_band, x), jnp.arange(num_bands))
    return jnp.moveaxis(y, 0, 1).reshape(batch, num_bands * band, width, -1)[:, :height]
  x = x.reshape(per_group, groups, *x.shape[1:])  # image i * groups + g is x[i, g]

  def one_group_band(index):
    images = lax.dynamic_index_in_dim(x, index // num_bands, axis=1, keepdims=False)
    return one_band(images, index % num_bands)

  y = lax.map(one_group_band, jnp.arange(groups * num_bands))  # [groups * bands, per_group, ...]
  y = y.reshape(groups, num_bands, per_group, band, width, -1).transpose(2, 0, 1, 3, 4, 5)
  return y.reshape(batch, num_bands * band, width, -1)[:, :height]


def _nearest_divisor(n: int, wanted: float) -> int:
  """The divisor of `n` nearest `wanted` (by ratio): bands that pad nothing, equal groups."""
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  return min(divisors, key=lambda d: abs(math.log(d / max(wanted, 1.0))))


def _winograd_kernels(kernel):
  """The 16 transformed kernels G k G^T, row-major, each [Cin, Cout]."""
  kernel_rows = [_combine(list(kernel), g) for g in _WINOGRAD_G]  # G k
  return [_combine(list(k), g) for k in kernel_rows for g in _WINOGRAD_G]  # (G k) GT


def _winograd_tiles(x, kernels, precision):
  """Winograd over a padded input: [B, 2 m + 2, 2 n + 2, Cin] -> [B, 2 m, 2 n, Cout].

  Tile (r, c) reads rows 2r..2r+3 and columns 2c..2c+3 of `x`.
  """
  batch, padded_height, padded_width, _ = x.shape
  tiles_h, tiles_w = (padded_height - 2) // 2, (padded_width - 2) // 2
  rows = [x[:, i:i + 2 * tiles_h:2] for i in range(4)]  # [B, tiles_h, 2 tiles_w + 2, Cin]
  rows = [_combine(rows, bt) for bt in _WINOGRAD_BT]  # BT d
  tiles = [_combine([r[:, :, j:j + 2 * tiles_w:2] for j in range(4)], bt)  # (BT d) B
           for r in rows for bt in _WINOGRAD_BT]  # 16 x [B, tiles_h, tiles_w, Cin]
  # Each product is a 1x1 convolution of the tiles, so it takes `_pointwise_conv`'s gradient.
  products = [_pointwise_conv(t, k, precision)
              for t, k in zip(tiles, kernels, strict=True)]  # 16 x [B, tiles_h, tiles_w, Cout]
  products = [products[4 * i:4 * i + 4] for i in range(4)]
  out_rows = [[_combine([p[j] for p in products], at) for j in range(4)]
              for at in _WINOGRAD_AT]  # AT m
  out = [[_combine(r, at) for at in _WINOGRAD_AT] for r in out_rows]  # (AT m) A
  # out[p][q][b, r, c] is output pixel (2r + p, 2c + q).
  y = jnp.stack([jnp.stack(out_p, axis=3) for out_p in out], axis=2)
  return y.reshape(batch, 2 * tiles_h, 2 * tiles_w, kernels[0].shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_forward(x, kernel, precision, band_pixels=None):
  """Winograd's forward pass with the direct convolution's gradients (`_conv_tap_grad`).

  For DenseNet's 128 -> 32 convolutions, where Winograd's forward pass is faster than XLA's
  but its autodiff backward pass is not, and compiles slowly.
  """
  return winograd_conv3x3(x, kernel, precision, band_pixels)


def _winograd_forward_fwd(x, kernel, precision, band_pixels):
  return winograd_conv3x3(x, kernel, precision, band_pixels), (x, kernel)


def _winograd_forward_bwd(precision, band_pixels, residuals, dy):
  del band_pixels
  return _conv_tap_grad_bwd((1, 1), ((1, 1), (1, 1)), precision, residuals, dy)


_winograd_forward.defvjp(_winograd_forward_fwd, _winograd_forward_bwd)


def _winograd_forward_banded(x, kernel, precision):
  """`_winograd_forward` a band of rows at a time (see `_winograd_path`)."""
  return _winograd_forward(x, kernel, precision, _WINOGRAD_BAND_PIXELS)
