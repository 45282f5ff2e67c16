"""Training-loss curves as TensorBoard draws them: raw (faint) and EMA-smoothed (bold).

The paper's Figures 1-3 are TensorBoard screenshots: "the thick solid line is the loss
smoothed curve and the light blue line is the actual loss curve" (section 2.3.1).
`tensorboard_smooth` reproduces TensorBoard's scalar-dashboard smoothing exactly, so a PNG
written here matches what `tensorboard --logdir` shows at the same smoothing slider value.
"""

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

# A bare Figure (no pyplot) renders with the Agg canvas: no global backend switch, no
# display needed, and figures are freed with their last reference.
from matplotlib.figure import Figure

# TensorBoard's colours: a run's raw curve is its colour at low opacity.
_RAW_ALPHA = 0.3
_COLOR = '#1f77b4'


def tensorboard_smooth(values: Sequence[float], weight: float = 0.6) -> np.ndarray:
  """Debiased exponential moving average, as in TensorBoard's scalar dashboard.

  For the finite values x_1, x_2, ... (in order):

      last_t = weight * last_{t-1} + (1 - weight) * x_t,   last_0 = 0
      smoothed_t = last_t / (1 - weight ** t)

  The division removes the bias towards the zero start (Adam's bias correction, Kingma &
  Ba 2015, section 3). As in TensorBoard (vz_line_chart2/line-chart.ts, resmoothDataset),
  non-finite values pass through unsmoothed and do not advance t, and a constant series
  is returned as is.

  Args:
    values: the raw series [T].
    weight: the smoothing slider value in [0, 1); 0 = no smoothing, TensorBoard's
      default is 0.6.

  Returns:
    float64 [T].
  """
  if not 0.0 <= weight < 1.0:
    raise ValueError(f'smoothing weight must lie in [0, 1), got {weight}')
  values = np.asarray(values, np.float64)
  out = values.copy()
  if values.size == 0 or np.all(values == values[0]):
    return out
  last, count = 0.0, 0
  for i, x in enumerate(values):
    if not math.isfinite(x):
      continue
    last = last * weight + (1.0 - weight) * x
    count += 1
    out[i] = last / (1.0 - weight**count)
  return out


def _draw(ax, steps, losses, smoothing: float, color: str = _COLOR):
  steps = np.asarray(steps)
  losses = np.asarray(losses, np.float64)
  ax.plot(steps, losses, color=color, alpha=_RAW_ALPHA, linewidth=1.0, label='raw')
  ax.plot(steps, tensorboard_smooth(losses, smoothing), color=color, linewidth=2.0,
          label=f'smoothed ({smoothing:g})')
  ax.set_xlabel('step')
  ax.set_ylabel('training loss')
  ax.grid(True, alpha=0.3)


def loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | os.PathLike,
               smoothing: float = 0.6, title: str = 'Training loss') -> str:
  """Writes one raw + smoothed training-loss curve to a PNG.

  Args:
    steps: int [T] training steps (x axis).
    losses: float [T] loss at each step.
    path: output PNG path (parent directories are created).
    smoothing: TensorBoard smoothing weight, see `tensorboard_smooth`.
    title: the axes title.

  Returns:
    The path written, as a string.
  """
  if len(steps) != len(losses):
    raise ValueError(f'{len(steps)} steps but {len(losses)} losses')
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  _draw(ax, steps, losses, smoothing)
  ax.legend(loc='upper right')
  ax.set_title(title)
  fig.tight_layout()
  return _save(fig, path)


def compare_loss_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                        path: str | os.PathLike, smoothing: float = 0.6,
                        title: str | None = 'Training loss (raw and smoothed)',
                        sharey: bool = True) -> str:
  """The paper's Figures 1-3 as one PNG: one panel per backbone, raw + smoothed.

  Args:
    curves: panel title (e.g. 'DenseNet121') -> (steps [T], losses [T]), in panel order.
    path: output PNG path.
    smoothing: TensorBoard smoothing weight.
    title: figure title, or None.
    sharey: same loss axis on every panel, so that the panels compare at a glance.

  Returns:
    The path written, as a string.
  """
  if not curves:
    raise ValueError('compare_loss_curves needs at least one curve')
  n = len(curves)
  for name, (steps, losses) in curves.items():
    if len(steps) != len(losses):
      raise ValueError(f'{name}: {len(steps)} steps but {len(losses)} losses')
  fig = Figure(figsize=(4.5 * n, 3.8))
  axes = fig.subplots(1, n, sharey=sharey, squeeze=False)[0]
  for i, (ax, (name, (steps, losses))) in enumerate(zip(axes, curves.items(), strict=True)):
    _draw(ax, steps, losses, smoothing)
    ax.legend(loc='upper right', fontsize='small')
    ax.set_title(name)
    if i and sharey:
      ax.set_ylabel('')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
