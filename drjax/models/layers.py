"""torch-exact building blocks shared by the torchvision ports.

Every layer here reproduces the corresponding `torch.nn` layer bit-for-bit in
its output shape (explicit padding, floor-mode pooling) and up to float32
rounding in its values, so converted torchvision weights give the same logits
at any input size torchvision accepts.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from drjax import host

Dtype = Any

# He et al. 2015, "Delving deep into rectifiers", as torch.nn.init.kaiming_normal_.
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


# ------------------------------------------------------------------ convolutions
#
# Every convolution of the ports goes through `conv_general_dilated` below, which
# computes the same function as `lax.conv_general_dilated` in the way XLA:CPU runs
# fastest. Measured at 1 thread (benchmarks/README.md):
# - 3x3 stride-1 convolutions with 64 or more channels as Winograd F(2x2, 3x3),
#   16 dots instead of 36 multiply-adds per channel pair (`winograd_conv3x3`,
#   measurements there); with more than one thread also DenseNet's 128 -> 32
#   (`_winograd_path`: XLA:CPU ran those YNNPACK convolutions on one thread).
# - 1x1 convolutions as dots: ResNet's took 21-53 GFLOP/s as convolution kernels
#   and 21-81 as dots; their weight gradients, which layer4's fine-tuning computes,
#   2-30 against 15-76. ResNet101's forward went from 4.5 to 3.7 s per batch of 16.
#   Their kernel gradient is taken from a transposed copy of the input
#   (`_pointwise_conv_bwd`): ResNet101's train step, 4-7% faster at batch 16 and 64 for
#   the widening ones, 5% more at batch 64 for the rest and Winograd's tile dots.
# - The weight gradient of a larger kernel as one dot per kernel tap (the tap's
#   shifted input against the output gradient, summed over batch and pixels).
#   XLA's own weight-gradient convolution slows down as the image grows: VGG16's
#   trainable 3x3 convolutions at 14x14 took 635 ms each (23 GFLOP/s) and take
#   9 dots of 20 ms (84 GFLOP/s). Below 14x14 output pixels XLA's is as fast or
#   faster (60 against 10-32 GFLOP/s for DenseNet's 7x7 layers), so it is kept.
# - A strided convolution with fewer than 14x14 output pixels (ResNet's layer4 3x3,
#   14x14 -> 7x7) as the sum over kernel taps of 1x1 convolutions of the tap's shifted
#   input (`_tap_sum_conv`), gradients by autodiff: XLA's convolution ran it at about
#   30 GFLOP/s. Forward 215 against 312 ms, forward and both gradients 564 against
#   640 ms at batch 64 (83 -> 54 and 177 -> 148 ms at batch 16). At 14x14 and 28x28
#   outputs (layer2's and layer3's) the forward was no faster, and for DenseNet's
#   stride-1 7x7 layers (128 -> 32) 1.5-2.3x slower, so those keep XLA's. Measured in
#   float32 only; bfloat16 keeps XLA's convolution (its nine partial sums would each
#   be rounded to bfloat16).
# The values are the same sums in another order; tests hold them to
# `lax.conv_general_dilated`'s and the parity tests to torchvision's.

_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))
_MIN_TAP_DOT_PIXELS = 14 * 14
# The variables' collection of precomputed Winograd kernels (`drjax.models.with_winograd_kernels`).
WINOGRAD_COLLECTION = 'winograd'


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, winograd_kernels=None):
  """`lax.conv_general_dilated` (the signature `nn.Conv` calls), computed faster on CPU.

  On the CPU backend, NHWC/HWIO convolutions with explicit padding, no dilation and
  one feature group (all of the ports') take the paths described above. Anything
  else, and everything on other backends (where cuDNN's convolutions were what
  the GPU benchmarks measured), goes to `lax.conv_general_dilated` unchanged.
  `winograd_kernels` are `rhs`'s 16 Winograd kernels where they were computed before
  (`ConvGeneralDilated`), used if the convolution takes Winograd.
  """
  if not _takes_cpu_paths(lhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)
  strides = tuple(window_strides)
  padding = tuple(tuple(p) for p in padding)
  winograd = _winograd_path(lhs, rhs, strides, padding)
  if winograd is not None:
    return winograd(lhs, rhs, precision, kernels=winograd_kernels)
  if rhs.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
    if strides != (1, 1):
      lhs = lhs[:, ::strides[0], ::strides[1], :]
    return _pointwise_conv(lhs, rhs[0, 0], precision)
  if _takes_tap_sum(lhs, rhs, strides, padding):
    return _tap_sum_conv(lhs, rhs, strides, padding, precision)
  return _conv_tap_grad(lhs, rhs, strides, padding, precision)


def _takes_cpu_paths(lhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count) -> bool:
  ones = (1, 1)
  return (jax.default_backend() == 'cpu' and lhs.ndim == 4
          and dimension_numbers == _NHWC_HWIO and feature_group_count == 1
          and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
          and not isinstance(padding, str))


class ConvGeneralDilated(nn.Module):
  """`conv_general_dilated` as the submodule each `conv` calls (`conv_general_dilated_cls`).

  A module, so that a convolution that takes Winograd can read its 16 transformed
  kernels from the variables' 'winograd' collection
  (`drjax.models.with_winograd_kernels`) instead of transforming its kernel on every
  call. Without that collection it is `conv_general_dilated`. It has no parameters:
  the kernel stays the `nn.Conv`'s.
  """

  @nn.compact
  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None):
    kernels = None
    if (_takes_cpu_paths(lhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count)
        and _may_take_winograd(rhs, tuple(window_strides), tuple(tuple(p) for p in padding))):
      if self.has_variable(WINOGRAD_COLLECTION, 'kernels'):
        kernels = _precomputed_kernels(rhs, self.get_variable(WINOGRAD_COLLECTION, 'kernels'))
      elif self.is_mutable_collection(WINOGRAD_COLLECTION) and not self.is_initializing():
        self.put_variable(WINOGRAD_COLLECTION, 'kernels', tuple(_winograd_kernels(rhs)))
    return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, precision,
                                winograd_kernels=kernels)


def _output_hw(x, kernel_hw, strides, padding) -> tuple[int, int]:
  return tuple((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s
               in zip(x.shape[1:3], padding, kernel_hw, strides, strict=True))


def _takes_tap_sum(x, kernel, strides, padding) -> bool:
  out_h, out_w = _output_hw(x, kernel.shape[:2], strides, padding)
  return (strides != (1, 1) and out_h * out_w < _MIN_TAP_DOT_PIXELS
          and x.dtype == kernel.dtype == jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise_conv(x, kernel, precision):
  """A 1x1 convolution as a dot, `[..., Cin] x [Cin, Cout]`."""
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _pointwise_conv_fwd(x, kernel, precision):
  return _pointwise_conv(x, kernel, precision), (x, kernel)


def _pointwise_conv_bwd(precision, residuals, dy):
  """Autodiff's gradients, except that the kernel gradient is taken from a transposed
  copy of the input.

  The kernel gradient contracts the pixels, the leading axis of both `x` and `dy`.
  XLA:CPU's fast (YNNPACK) dot wants its left operand's contracted axis last, so for
  autodiff's form XLA transposes an operand and runs its own, slower dot. Transposing
  `x` (`_materialised_transpose`, which also keeps XLA's simplifier from folding the
  transpose back into the dot) gives YNNPACK the dot. One core, [pixels, Cin] -> Cout:
  3136, 512 -> 2048 (ResNet101's layer4 at batch 64) 100-122 against 186 ms in
  alternating probes; medians of 9 interleaved calls, 3136, 2048 -> 512 111 against
  131 ms, 12544, 1024 -> 512 217 against 262 ms, 1024, 512 -> 512 (a Winograd tile dot
  of layer4) 7.4 against 10.4 ms.
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

  XLA:CPU otherwise fuses the ops that produce `x` (a BatchNorm, residual add and
  ReLU; Winograd's input transform) into the copy, which then recomputes them while
  reading their inputs in transposed order: layer4's input at batch 64, [12544, 1024],
  took 232 ms that way in the train step's profile. Fusion does not cross a
  conditional, and XLA cannot drop one whose predicate it only learns at run time;
  both branches are the same transpose, so the predicate's value does not matter.
  (An `optimization_barrier` does not do it: XLA:CPU expands barriers before fusion.)
  One core, medians of 9 interleaved calls, an affine and a ReLU, then a 1x1
  convolution and its kernel gradient: 263 against 127 ms at [12544, 1024], with 113
  ms for a transpose of the materialised input; 23.0 against 13.8 ms at [3136, 512].
  """
  return lax.cond(x[0, 0] == x[0, 0], lambda v: v.T, lambda v: v.T, x)


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
  """NHWC convolution as the sum over kernel taps (i, j) of the input pixels the tap
  meets, 1x1-convolved with `kernel[i, j]` (see above)."""
  taps = _tap_inputs(x, kernel.shape[:2], strides, padding)
  kernels = kernel.reshape(-1, *kernel.shape[2:])  # row-major taps, as _tap_inputs
  return functools.reduce(jnp.add, [_pointwise_conv(t, k, precision)
                                    for t, k in zip(taps, kernels, strict=True)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tap_grad(x, kernel, strides, padding, precision):
  """NHWC convolution whose kernel gradient is one dot per tap (see above)."""
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC_HWIO,
                                  precision=precision)


def _conv_tap_grad_fwd(x, kernel, strides, padding, precision):
  return _conv_tap_grad(x, kernel, strides, padding, precision), (x, kernel)


def _conv_tap_grad_bwd(strides, padding, precision, residuals, dy):
  x, kernel = residuals
  conv = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=padding,
                           dimension_numbers=_NHWC_HWIO, precision=precision)
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


# Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast algorithms for convolutional
# neural networks"): each 2x2 block of outputs of a 3x3 convolution g is
# A^T [(G g G^T) . (B^T d B)] A for the 4x4 input tile d around it, so the
# 36 multiply-adds per input/output channel pair become 16, done as 16 dots
# [pixels / 4, Cin] x [Cin, Cout]. The transforms are additions of shifted
# slices, which XLA fuses. Measured at 1 thread, batch 16, against XLA's
# convolution (YNNPACK), forward: 1.5x at 112x112x128, 1.6x at 56x56x256, 1.7x
# at 28x28x512, 2.3x at 14x14x512, 1.2x at 56x56x64, 2.0x at 14x14x256, 2.3x at
# 7x7x512; forward plus both gradients (jax's autodiff of the same ops) 1.7-1.8x
# at 14-28 px and 1.2x at 7x7x512. Not taken where it was slower: 224x224x64
# (0.93x; its 4x larger transformed input is 820 MB at batch 16) and, on one
# thread and over a whole batch, DenseNet's 128 -> 32 channels (0.5-0.9x: too few
# output channels for the dots to pay for the transforms; a band of rows at a
# time is faster, `_winograd_path`). Relative error against lax is about 2e-6
# in float32; bfloat16 keeps XLA's convolution. The cost is compile time: XLA:CPU
# compiles each of the 16 dots as its own YNNPACK fusion (about 40 ms each), so
# compiling the VGG16 forward went from 0.5 to 7.6 s and ResNet101's from 3.3 to
# 12 s. One batched dot_general compiles in 30 ms but ran slower at 7 of the 8
# sizes (up to 1.5x). The kernel transforms G g G^T depend on the weights alone;
# for inference `drjax.models.with_winograd_kernels` computes them once, into the
# variables' 'winograd' collection, which `ConvGeneralDilated` reads. Otherwise every
# call computes them on every device: in ResNet101's forward with a device per core,
# about 70 ms of op time per device and call went to them (batch 4, two cores).
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
_WINOGRAD_MIN_CHANNELS = 64
_WINOGRAD_MAX_PIXELS = 112 * 112
# DenseNet's 128 -> 32 convolutions (see below).
_WINOGRAD_NARROW_MIN_OUT_CHANNELS = 32
_WINOGRAD_BANDED_MIN_PIXELS = 28 * 28
_WINOGRAD_BAND_PIXELS = 28 * 56
_WINOGRAD_THREADED_MIN_PIXELS = 14 * 14


def _winograd_path(x, kernel, strides, padding):
  """The Winograd function for this convolution, or None where XLA's was as fast or faster.

  `winograd_conv3x3` (its own gradients) with 64 or more input and output channels,
  up to 112x112 pixels. DenseNet's 128 -> 32 convolutions (64 or more input channels
  to 32 or more outputs) take `_winograd_forward`, Winograd's forward pass with the
  direct convolution's gradients:
  - From 28x28 pixels up, a band of rows at a time (`band_pixels`). Over
    the whole batch at once, the 16 transformed tiles (4x the input) leave the cache:
    one core, batch 8, 28x28, 7.6 against 5.6 ms for XLA's convolution, and 3.4-3.6 ms
    a band at a time (56x56, batch 16: 30.8 against 37.3 ms). DenseNet121's forward at
    224 px, one core, paired calls: 1.03-1.06x (batch 2 and 4), 1.08-1.12x (8) and
    1.12x (16) faster than without Winograd, with compiling it 5.1 -> 9.5 s at batch
    16; two threads, batch 16: 1.09x and 1.10x faster than the whole batch at once
    (both measured with bands of one image, which the table's Grad-CAM ran at the same
    speed: 17.86 and 17.97 against 17.90 and 17.94 img/s). The bands span the batch
    axis (in strided groups of images at large batches) so that a batch sharded over
    devices stays sharded: bands of one image made XLA's SPMD partitioner gather the
    batch onto every device. Against those, one core: 0-6% slower (56x56, batch 64:
    133 against 126 ms, XLA's 217 ms; without groups it had been 235 ms). With a device
    per core (`host.one_cpu_device_per_core`), batch 4 split over two, paired calls:
    the forward 1.10x and Grad-CAM 1.02-1.15x faster than XLA's convolution.
  - At 14x14 pixels, with more than one thread (`host.xla_cpu_threads`), the whole
    batch at once: XLA:CPU ran these YNNPACK convolutions on one thread (10.7 ms on one
    core, 10.9 on two at 56x56, batch 4), while the tile dots use every core. Two cores,
    DenseNet121's forward: batch 4 269 -> 190 ms, batch 16 921 -> 822 ms (medians of 5
    calls, with this rule from 14x14 up). On one thread 14x14 was no faster by image
    (1.07x alone, no gain in the forward, 4 s more to compile).
  """
  pixels = x.shape[1] * x.shape[2]
  if not (_may_take_winograd(kernel, strides, padding) and x.dtype == jnp.float32
          and pixels <= _WINOGRAD_MAX_PIXELS):
    return None
  if kernel.shape[-1] >= _WINOGRAD_MIN_CHANNELS:
    return winograd_conv3x3
  if pixels >= _WINOGRAD_BANDED_MIN_PIXELS:
    return _winograd_forward_banded
  if pixels >= _WINOGRAD_THREADED_MIN_PIXELS and host.xla_cpu_threads() > 1:
    return _winograd_forward
  return None


def _may_take_winograd(kernel, strides, padding) -> bool:
  """Whether a convolution with this kernel takes Winograd at some input (`_winograd_path`)."""
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


def winograd_conv3x3(x, kernel, precision=None, band_pixels=None, kernels=None):
  """NHWC x HWIO 3x3 convolution, stride 1, padding 1, as Winograd F(2x2, 3x3).

  The same function as `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))`
  at any height and width (odd sizes pad the last tile), up to float32 rounding.
  Gradients are jax's autodiff of the same slices, sums and dots; what the backward
  pass keeps is the 16 transformed tiles (4x the input) instead of the input.

  With `band_pixels`, a band of rows of a group of images at a time (`lax.map`), of
  about that many output pixels, so that its transformed tiles stay in cache
  (`_winograd_path`). The bands split the rows first; only where a band of 2 rows of
  every image is still well above `band_pixels` do they split the batch too, into
  strided groups (image i * groups + g in group g), so that a batch sharded over
  devices stays sharded. Without, the whole batch at once.

  `kernels` are `kernel`'s 16 transformed kernels if they were computed before
  (`drjax.models.with_winograd_kernels`); without, they are computed here.
  """
  batch, height, width, _ = x.shape
  if kernels is None:
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
  # Band j reads rows j*band .. j*band + band + 1 of the input padded above and below.
  # The columns are padded in each band's program, as part of its input transform:
  # padded with the rows, DenseNet's 128 -> 32 at 28x28 took 5.8 against 3.3 ms (batch
  # 8, one core). Over the whole batch, padding rows and columns apart was slower.
  x = jnp.pad(x, ((0, 0), (1, num_bands * band + 1 - height), (0, 0), (0, 0)))

  def one_band(images, j):
    rows = lax.dynamic_slice_in_dim(images, j * band, band + 2, axis=1)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (1, 2 * tiles_w + 1 - width), (0, 0)))
    return _winograd_tiles(rows, kernels, precision)[:, :, :width]

  if groups == 1:
    # Not the grouped loop below with one group: through its reshape and index, 56x56 at
    # batch 16 took 37.4 against 32.0 ms (one core), 28x28 at batch 8 3.38 against 3.13.
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


@jax.custom_vjp
def _precomputed_kernels(kernel, kernels):
  """`kernels`, computed before as `_winograd_kernels(kernel)`, with `kernel`'s gradient.

  The forward pass reads `kernels`; the gradient goes to `kernel` through the
  transform (a linear map), as if the kernels had been computed here, so that
  differentiating a model with respect to its parameters stays right.
  """
  del kernel
  return list(kernels)


def _precomputed_kernels_fwd(kernel, kernels):
  return list(kernels), kernel


def _precomputed_kernels_bwd(kernel, cotangents):
  (dkernel,) = jax.vjp(_winograd_kernels, kernel)[1](cotangents)
  return dkernel, None


_precomputed_kernels.defvjp(_precomputed_kernels_fwd, _precomputed_kernels_bwd)


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
  # Each product is a 1x1 convolution of the tiles, so it takes `_pointwise_conv`'s
  # kernel gradient.
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
def _winograd_forward(x, kernel, precision, band_pixels=None, kernels=None):
  """Winograd's forward pass with the direct convolution's gradients (`_conv_tap_grad`).

  For DenseNet's 128 -> 32 convolutions (`_winograd_path`), with `band_pixels` and
  `kernels` as `winograd_conv3x3`'s: Winograd's forward pass is faster there, its
  autodiff backward was not, and compiling it is slow. DenseNet121, 224 px, batch 4,
  two cores, paired calls in one process: the input gradient (Grad-CAM study's
  `gradients`, or training from a random init) took 521 ms this way, 628 ms with
  Winograd's own backward and 562 ms with no Winograd; compiling it 26 s, 53 s and
  9.5 s. The forward pass is unchanged (194, 204 and 245 ms).
  """
  return winograd_conv3x3(x, kernel, precision, band_pixels, kernels)


def _winograd_forward_fwd(x, kernel, precision, band_pixels, kernels):
  return winograd_conv3x3(x, kernel, precision, band_pixels, kernels), (x, kernel)


def _winograd_forward_bwd(precision, band_pixels, residuals, dy):
  del band_pixels
  dx, dkernel = _conv_tap_grad_bwd((1, 1), ((1, 1), (1, 1)), precision, residuals, dy)
  return dx, dkernel, None  # the kernel's gradient covers the precomputed kernels'


_winograd_forward.defvjp(_winograd_forward_fwd, _winograd_forward_bwd)


def _winograd_forward_banded(x, kernel, precision, kernels=None):
  """`_winograd_forward` a band of rows at a time (see `_winograd_path`)."""
  return _winograd_forward(x, kernel, precision, _WINOGRAD_BAND_PIXELS, kernels)


def conv(features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
         use_bias: bool = False, name: str | None = None, dtype: Dtype = jnp.float32,
         kernel_init=kaiming_normal_fan_in) -> nn.Conv:
  """torch.nn.Conv2d(kernel_size, stride, padding) with symmetric explicit padding.

  'SAME' padding would pad asymmetrically for even strides and odd inputs; torch
  always pads `padding` pixels on every side and floors the output size.
  """
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                 kernel_init=kernel_init, dtype=dtype, name=name,
                 conv_general_dilated_cls=ConvGeneralDilated)


def batch_norm(train: bool, *, name: str | None = None, dtype: Dtype = jnp.float32,
               zero_scale: bool = False) -> nn.BatchNorm:
  """torch.nn.BatchNorm2d defaults: eps=1e-5, momentum 0.1 (flax's 0.9).

  One difference remains in train mode: torch updates the running variance with
  the unbiased batch variance, flax with the biased one (a factor N/(N-1)).
  `zero_scale` initialises the scale (gamma) to 0 instead of 1.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones)


def relu(x: jnp.ndarray) -> jnp.ndarray:
  """ReLU written as a select, `where(x <= 0, 0, x)`: the values and gradient of nn.relu.

  Same outputs (NaN propagates) and the same gradient (0 at x = 0, as torch's). The
  difference is for XLA:CPU's fusion pass, which treats `max(x, 0)` as free to
  duplicate into every consumer (an effectively unary op). In a residual stream,
  x_{i+1} = relu(bn(conv(...)) + x_i), every block's fusion then recomputes all
  earlier blocks' BatchNorm + add + ReLU from their convolution outputs: quadratic
  in depth (ResNet101's layer3 is 23 blocks), and the transposes that layer4's
  weight gradients read re-ran the whole chain (about 1.9 s of a 9.7 s train step).
  A select has two full-size operands, so XLA materialises it once. Measured on
  ResNet101 (benchmarks/README.md): train step 7.8 -> 5.7 s, forward about 10%
  faster. In VGG, max(x, 0) let XLA hand each run of conv + bias + ReLU + pool to
  YNNPACK as one large subgraph (3 for the whole network), which ran slower than
  one fusion per convolution: with the select, the VGG16 forward took 8.6-10.2 s
  against 11.2-11.4 s in alternating probes. DenseNet keeps nn.relu (no gain measured).
  """
  return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0) -> jnp.ndarray:
  """torch.nn.MaxPool2d(window, stride, padding), ceil_mode=False: pads with -inf."""
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def avg_pool(x: jnp.ndarray, window: int, stride: int) -> jnp.ndarray:
  """torch.nn.AvgPool2d(window, stride) without padding, ceil_mode=False."""
  return nn.avg_pool(x, (window, window), strides=(stride, stride), padding='VALID')


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging matrix of torch's adaptive average pooling along one axis.

  torch's window i spans [floor(i * in / out), ceil((i + 1) * in / out)), so the
  windows overlap when in % out != 0 and repeat pixels when in < out (a 2x2 map
  pooled to 7x7 replicates each pixel).
  """
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil division
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
  """torch.nn.AdaptiveAvgPool2d(output_size) for NHWC `x` [B, H, W, C] -> [B, h, w, C]."""
  _, height, width, _ = x.shape
  out_h, out_w = output_size
  if (height, width) == (out_h, out_w):
    return x
  rows = jnp.asarray(_adaptive_pool_matrix(height, out_h), x.dtype)
  cols = jnp.asarray(_adaptive_pool_matrix(width, out_w), x.dtype)
  return jnp.einsum('ih,jw,bhwc->bijc', rows, cols, x)


def clean_init_variables(variables):
  """What every model's `init` returns: exactly {'params', 'batch_stats'}.

  Taps (drjax.models.common.tap) call `perturb`, which in flax creates its zero
  variable whenever 'perturbations' is mutable, as it is in `init`; callers that
  want those zeros ask `apply(..., mutable=['perturbations'])` for them instead.
  'batch_stats' is present (empty) even for the VGGs without BatchNorm, so that
  train steps handle every architecture alike.
  """
  variables = {k: v for k, v in variables.items() if k != 'perturbations'}
  variables.setdefault('batch_stats', {})
  return variables


def perturb_unreserved(module: nn.Module, name: str, value: jnp.ndarray,
                       collection: str = 'perturbations') -> jnp.ndarray:
  """`Module.perturb` without reserving `name` in the module's scope.

  flax reserves a variable's name against submodules of the same name, but
  ResNet's taps are named like its submodules ('layer1' in 'perturbations' and
  'intermediates', 'layer1/0/conv1' in 'params'); the collections never overlap.
  """
  scope = module.scope
  if scope.is_mutable_collection(collection) and not scope.has_variable(collection, name):
    scope.put_variable(collection, name, jnp.zeros_like(value))
  if scope.has_variable(collection, name):
    value = value + scope.get_variable(collection, name)
  return value


def sow_unreserved(module: nn.Module, collection: str, name: str, value: Any) -> bool:
  """`Module.sow` (default tuple-append reduction) without reserving `name`; see above."""
  scope = module.scope
  if not scope.is_mutable_collection(collection):
    return False
  old = scope.get_variable(collection, name) if scope.has_variable(collection, name) else ()
  scope.put_variable(collection, name, old + (value,))
  return True
