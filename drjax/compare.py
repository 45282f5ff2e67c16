"""The paper's comparison of backbones: Table 1 and Figures 1-3 from finished run workdirs.

Table 1 of Wang et al. lists sensitivity, specificity and accuracy of DenseNet121,
ResNet101 and VGG16; here each row also has the quadratic weighted kappa, the 5-class
accuracy and the ROC AUC, read from each run's metrics.json (`drjax.metrics
.classification_report`). The binary problem is the report's first threshold (referable
DR, grade >= 2, by default; see drjax.metrics for why the paper's is ambiguous).
Figures 1-3 are the training-loss curves, raw and TensorBoard-smoothed, one panel per run,
read from each run's metrics.jsonl.
"""

import dataclasses
import os
from collections.abc import Sequence

from drjax import errors, metrics, plots, sweep

DISPLAY_NAMES = {
    'densenet121': 'DenseNet121', 'densenet161': 'DenseNet161', 'densenet169': 'DenseNet169',
    'densenet201': 'DenseNet201', 'resnet18': 'ResNet18', 'resnet34': 'ResNet34',
    'resnet50': 'ResNet50', 'resnet101': 'ResNet101', 'resnet152': 'ResNet152',
    'vgg11': 'VGG11', 'vgg13': 'VGG13', 'vgg16': 'VGG16', 'vgg19': 'VGG19',
}

# Wang et al., Table 1 (EyePACS, PyTorch, ImageNet weights; binary problem not stated).
PAPER_TABLE1 = {
    'ResNet101': dict(sensitivity=0.29, specificity=0.89, accuracy=0.76),
    'VGG16': dict(sensitivity=0.06, specificity=0.96, accuracy=0.74),
    'DenseNet121': dict(sensitivity=0.77, specificity=0.913, accuracy=0.883),
}


@dataclasses.dataclass
class RunData:
  """What the comparison needs from one workdir."""
  workdir: str
  label: str
  model: str
  report: dict | None  # classification_report, None while the run is unfinished
  steps: list[int]
  losses: list[float]


def load_run(workdir: str) -> RunData:
  """Reads config.json, metrics.json and metrics.jsonl of a run (all optional)."""
  config = sweep.read_json(os.path.join(workdir, sweep.CONFIG_JSON)) or {}
  raw = sweep.read_json(os.path.join(workdir, sweep.METRICS_JSON))
  report = sweep.find_report(raw) if raw else None
  steps, losses = sweep.read_loss_curve(workdir)
  model = str(config.get('model', ''))
  name = os.path.basename(os.path.normpath(workdir))
  return RunData(workdir=workdir, label=DISPLAY_NAMES.get(model, model or name), model=model,
                 report=dict(report) if report is not None else None,
                 steps=steps, losses=losses)


def load_runs(workdirs: Sequence[str]) -> list[RunData]:
  """Loads runs; labels are the backbone names, made unique with the run directory."""
  runs = [load_run(w) for w in workdirs]
  labels = [r.label for r in runs]
  for r in runs:
    if labels.count(r.label) > 1:
      r.label = f'{r.label} ({os.path.basename(os.path.normpath(r.workdir))})'
  return runs


def _headline(report: dict | None, threshold_grade: int | None):
  """The binary sub-report shown in Table 1, and its threshold."""
  if report is None:
    return None, threshold_grade
  if threshold_grade is None:
    threshold_grade = (report.get('thresholds') or [2])[0]
  return report.get(metrics.binary_name(threshold_grade)), threshold_grade


def table1(runs: Sequence[RunData], threshold_grade: int | None = None,
           with_paper: bool = True) -> str:
  """Table 1 as Markdown: sensitivity, specificity, accuracy (binary), plus AUC, kappa
  and 5-class accuracy; then the paper's own figures for reference."""
  header = ['Model', 'Sensitivity', 'Specificity', 'Accuracy', 'AUC', 'Kappa (QW)',
            '5-class acc.', 'Eval images']
  rows, used = [], set()
  for r in runs:
    b, t = _headline(r.report, threshold_grade)
    used.add(t)
    rep = r.report or {}
    b = b or {}
    rows.append([r.label, sweep.fmt(b.get('sensitivity'), 'pct'),
                 sweep.fmt(b.get('specificity'), 'pct'), sweep.fmt(b.get('accuracy'), 'pct'),
                 sweep.fmt(b.get('auc'), 'f3'), sweep.fmt(rep.get('kappa'), 'f3'),
                 sweep.fmt(rep.get('accuracy'), 'pct'), sweep.fmt(rep.get('num_examples'), 'int')])
  used.discard(None)
  problem = ', '.join(f'grade >= {t}' for t in sorted(used)) or 'n/a'
  text = (f'Binary problem for sensitivity/specificity/accuracy/AUC: {problem} '
          '(positive = true grade at or above it; prediction = argmax grade; AUC score = '
          'summed probability of those grades).\n\n')
  text += sweep.markdown_table(header, rows)
  if with_paper:
    text += ('\nPaper (Wang et al., Table 1; EyePACS, ImageNet weights; binary problem not '
             'stated):\n\n')
    text += sweep.markdown_table(
        ['Model', 'Sensitivity', 'Specificity', 'Accuracy'],
        [[name, *(sweep.fmt(v[k], 'pct') for k in ('sensitivity', 'specificity', 'accuracy'))]
         for name, v in PAPER_TABLE1.items()])
  return text


def loss_figure(runs: Sequence[RunData], path: str, smoothing: float = 0.6) -> str | None:
  """Figures 1-3: one raw + smoothed loss panel per run that has a loss curve."""
  curves = {r.label: (r.steps, r.losses) for r in runs if r.steps}
  if not curves:
    return None
  return plots.compare_loss_curves(
      curves, path, smoothing=smoothing,
      title=f'Training loss: raw (faint) and TensorBoard-smoothed ({smoothing:g})')


def compare(workdirs: Sequence[str], out_dir: str, smoothing: float = 0.6,
            threshold_grade: int | None = None) -> dict:
  """Writes table1.md and loss_curves.png under out_dir.

  Returns:
    dict(table=Markdown text, table_path, figure_path (None without any loss curve),
    missing=list of workdirs without metrics.json).
  """
  if not workdirs:
    raise errors.ConfigError('no run workdirs to compare')
  runs = load_runs(workdirs)
  os.makedirs(out_dir, exist_ok=True)
  text = table1(runs, threshold_grade)
  missing = [r.workdir for r in runs if r.report is None]
  if missing:
    text += '\nUnfinished (no metrics.json): ' + ', '.join(missing) + '\n'
  table_path = os.path.join(out_dir, 'table1.md')
  with open(table_path, 'w') as f:
    f.write(text)
  figure_path = loss_figure(runs, os.path.join(out_dir, 'loss_curves.png'), smoothing)
  return dict(table=text, table_path=table_path, figure_path=figure_path, missing=missing)
