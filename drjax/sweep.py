"""Hyper-parameter sweeps: a grid of absl overrides, one scripts/train.py run per point.

Each run trains in its own workdir under a root directory, as a subprocess (a crash or an
out-of-memory kill in one run cannot take the others down, and every run starts with fresh
XLA flags). A run whose workdir already holds `metrics.json` (the final evaluation written
by `drjax.train.train_and_evaluate`) is finished and skipped, so re-running a sweep resumes
it; an unfinished run is restarted and resumes from its own latest checkpoint. Afterwards
the metrics of all runs are aggregated into one Markdown and one CSV table.

Grid syntax (`--grid`, repeatable; the product of all axes is run):

    config=configs/densenet.py,configs/resnet.py,configs/vgg.py
    config.optimizer.lr=1e-4,3e-4

Values are split on commas outside brackets and quotes, so
`config.trainable=['head'],['.*']` is two values. A sweep file (configs/sweeps/*.py)
defines `get_sweep() -> list[dict[str, object]]`, one dict of overrides per run.
"""

import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent import futures

from drjax import errors, metrics

METRICS_JSON = 'metrics.json'
METRICS_JSONL = 'metrics.jsonl'
CONFIG_JSON = 'config.json'
RUN_JSON = 'sweep_run.json'  # the overrides and command of a run, written by the sweep
LOG_FILE = 'train.log'


# ------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
  """Splits `a,b,[c,d]` on the commas at bracket depth 0 outside quotes."""
  values, current, depth, quote = [], [], 0, None
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      values.append(''.join(current).strip())
      current = []
      continue
    current.append(ch)
  values.append(''.join(current).strip())
  return values


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
  """`['key=v1,v2', ...]` -> `[('key', ['v1', 'v2']), ...]`, keys in the given order."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    key = key.strip().lstrip('-')
    if not sep or not key:
      raise errors.ConfigError(f'grid axis {spec!r} is not of the form key=value1,value2,...')
    if key in dict(axes):
      raise errors.ConfigError(f'grid axis {key!r} given twice')
    values = split_values(values)
    if any(v == '' for v in values):
      raise errors.ConfigError(f'grid axis {spec!r} has an empty value')
    axes.append((key, values))
  return axes


def expand_grid(axes: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
  """The product of the axes, first axis varying slowest: a list of override dicts."""
  keys = [k for k, _ in axes]
  return [dict(zip(keys, combo, strict=True))
          for combo in itertools.product(*(v for _, v in axes))]


def load_sweep_file(path: str | os.PathLike) -> list[dict[str, str]]:
  """Override dicts from a sweep file defining `get_sweep() -> list[dict]`."""
  spec = importlib.util.spec_from_file_location('drjax_sweep_def', os.fspath(path))
  if spec is None or spec.loader is None:
    raise errors.ConfigError(f'cannot load sweep file {path}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise errors.ConfigError(f'sweep file {path} defines no get_sweep()')
  runs = module.get_sweep()
  if not runs or not all(isinstance(r, Mapping) for r in runs):
    raise errors.ConfigError(f'{path}: get_sweep() must return a non-empty list of dicts')
  return [{str(k): _flag_value(v) for k, v in r.items()} for r in runs]


def _flag_value(v) -> str:
  """A Python value as ml_collections' config flags parse it back (Python literals)."""
  return v if isinstance(v, str) else repr(v)


# ------------------------------------------------------------------------- naming


def _short_key(key: str) -> str:
  return key.rsplit('.', 1)[-1]


def _config_stem(value: str) -> str:
  path, _, arg = value.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  return f'{stem}-{arg}' if arg else stem


def _sanitize(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._=+-]+', '-', text).strip('-') or 'x'


def run_names(runs: Sequence[Mapping[str, str]]) -> list[str]:
  """Short unique directory names from the overrides that vary across runs.

  The config file gives its stem ('densenet'), other keys `last_component=value`
  ('lr=0.0001'); keys whose value is the same for all runs are left out.
  """
  keys = list(dict.fromkeys(k for r in runs for k in r))
  varying = [k for k in keys if len({r.get(k) for r in runs}) > 1] or keys[:1]
  short = {k: _short_key(k) for k in varying}
  if len(set(short.values())) < len(short):  # 'a.lr' and 'b.lr': keep the full paths
    short = {k: k.removeprefix('config.') for k in varying}

  def name(r):
    parts = []
    for k in varying:
      if k not in r:
        continue
      parts.append(_config_stem(r[k]) if k == 'config' else f'{short[k]}={r[k]}')
    return _sanitize('_'.join(parts))

  names = [name(r) for r in runs]
  if len(set(names)) < len(names):
    names = [f'{i:03d}_{n}' for i, n in enumerate(names)]
  return names


# ------------------------------------------------------------------------- running


@dataclasses.dataclass
class Run:
  """One point of a sweep."""
  name: str
  overrides: dict[str, str]
  workdir: str


@dataclasses.dataclass
class Result:
  """What happened to one run: status is 'done', 'skipped' (already finished) or 'failed'."""
  name: str
  workdir: str
  status: str
  returncode: int | None = None
  seconds: float = 0.0
  message: str = ''


def plan(runs: Sequence[Mapping[str, str]], root: str | os.PathLike) -> list[Run]:
  """Names and workdirs for a list of override dicts (each must set `config`)."""
  for r in runs:
    if 'config' not in r:
      raise errors.ConfigError(f'run {dict(r)} sets no config=...: add a config axis to the grid')
  return [Run(name=n, overrides=dict(r), workdir=os.path.join(os.fspath(root), n))
          for n, r in zip(run_names(runs), runs, strict=True)]


def train_command(run: Run, train_script: str = 'scripts/train.py',
                  python: str = sys.executable) -> list[str]:
  """The scripts/train.py command line of a run."""
  cmd = [python, train_script, f'--workdir={run.workdir}']
  cmd += [f'--{k}={v}' for k, v in run.overrides.items()]
  return cmd


def is_finished(workdir: str | os.PathLike) -> bool:
  """A run is finished once its final evaluation (metrics.json) is written."""
  return os.path.isfile(os.path.join(workdir, METRICS_JSON))


def _run_one(run: Run, train_script: str, timeout_s: float | None, env) -> Result:
  record = dict(name=run.name, overrides=run.overrides)
  record_path = os.path.join(run.workdir, RUN_JSON)
  if os.path.isfile(record_path):
    with open(record_path) as f:
      previous = json.load(f)
    if previous.get('overrides') != run.overrides:
      return Result(run.name, run.workdir, 'failed', message=(
          f'{run.workdir} holds a run with other overrides {previous.get("overrides")}; '
          'move it away or use another --root'))
  if is_finished(run.workdir):
    return Result(run.name, run.workdir, 'skipped', message='already finished')
  os.makedirs(run.workdir, exist_ok=True)
  cmd = train_command(run, train_script)
  with open(record_path, 'w') as f:
    json.dump(dict(record, command=cmd), f, indent=2)
  start = time.perf_counter()
  log_path = os.path.join(run.workdir, LOG_FILE)
  try:
    with open(log_path, 'ab') as log:
      proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                            env=env, check=False)
    returncode = proc.returncode
    message = ''
  except subprocess.TimeoutExpired:
    returncode, message = None, f'timed out after {timeout_s} s'
  except OSError as e:
    returncode, message = None, f'could not start: {e}'
  seconds = time.perf_counter() - start
  if returncode == 0 and is_finished(run.workdir):
    return Result(run.name, run.workdir, 'done', 0, seconds)
  if not message:
    message = (f'exit code {returncode}' if returncode else 'exited 0 without metrics.json')
    message += f'; last lines of {log_path}:\n' + _tail(log_path)
  return Result(run.name, run.workdir, 'failed', returncode, seconds, message)


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors='replace') as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


def run_sweep(runs: Sequence[Run], *, train_script: str = 'scripts/train.py',
              parallel: int = 1, timeout_s: float | None = None, env=None,
              log_fn=print) -> list[Result]:
  """Runs every unfinished run; a failed run is reported and the others go on.

  Args:
    runs: from `plan`.
    train_script: path of scripts/train.py (run with this interpreter).
    parallel: runs at a time (1 on a small CPU machine: each run uses every core).
    timeout_s: per-run wall-clock limit, or None.
    env: environment of the subprocesses (default: this one, with drjax on PYTHONPATH).
    log_fn: called with one progress line per run.

  Returns:
    One `Result` per run, in the order of `runs`.
  """
  def job(run):
    log_fn(f'[sweep] {run.name}: starting ({" ".join(train_command(run, train_script))})')
    result = _run_one(run, train_script, timeout_s, env)
    log_fn(f'[sweep] {run.name}: {result.status} ({result.seconds:.0f} s)'
           + (f' - {result.message}' if result.message else ''))
    return result

  if env is None:
    # scripts/train.py must import this same drjax, installed or not.
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (package_root, env.get('PYTHONPATH', '')) if p)
  with futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    return list(pool.map(job, runs))


# ------------------------------------------------------------------------- aggregation


def find_report(d: Mapping) -> Mapping | None:
  """The classification_report inside a metrics.json (top level, or one nested level)."""
  if 'confusion_matrix' in d:
    return d
  for v in d.values():
    if isinstance(v, Mapping) and 'confusion_matrix' in v:
      return v
  return None


def read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_loss_curve(workdir: str, key: str = 'train_loss') -> tuple[list[int], list[float]]:
  """(steps, losses) from a workdir's metrics.jsonl, sorted by step.

  Lines without `key` (e.g. eval lines) are skipped. A resumed run may log a step twice
  (logged, killed before the next checkpoint, re-run): the last line for a step wins.
  A truncated last line (a run killed mid-write) is ignored.
  """
  path = os.path.join(workdir, METRICS_JSONL)
  by_step = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(rec, dict) and key in rec and 'step' in rec:
          by_step[int(rec['step'])] = float(rec[key])
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _flatten(d: Mapping, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    name = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flatten(v, name + '.'))
    elif isinstance(v, bool | int | float | str) or v is None:
      out[name] = v
  return out


def run_row(workdir: str, name: str | None = None) -> dict:
  """One table row for a workdir: overrides, model, progress and the final metrics."""
  name = name or os.path.basename(os.path.normpath(workdir))
  run_record = read_json(os.path.join(workdir, RUN_JSON)) or {}
  config = read_json(os.path.join(workdir, CONFIG_JSON)) or {}
  raw = read_json(os.path.join(workdir, METRICS_JSON))
  steps, losses = read_loss_curve(workdir)
  row = dict(run=name, model=config.get('model', ''),
             status='finished' if raw is not None else 'unfinished',
             steps=steps[-1] if steps else None,
             final_train_loss=losses[-1] if losses else None)
  row.update({f'override.{k}': v for k, v in run_record.get('overrides', {}).items()})
  if raw:
    row.update(_flatten(raw))  # lists (confusion matrix, per-grade) are left to metrics.json
    report = find_report(raw)
    if report is not None and report is not raw:  # nested, e.g. {'validation': report}
      row.update(_flatten(report))
  return row


# Columns of the Markdown summary: (header, row key, format).
_REF, _ANY = metrics.binary_name(2), metrics.binary_name(1)
SUMMARY_COLUMNS = (
    ('accuracy', 'accuracy', 'pct'),
    ('kappa', 'kappa', 'f3'),
    ('ref. sens.', f'{_REF}.sensitivity', 'pct'),
    ('ref. spec.', f'{_REF}.specificity', 'pct'),
    ('ref. acc.', f'{_REF}.accuracy', 'pct'),
    ('ref. AUC', f'{_REF}.auc', 'f3'),
    ('any-DR sens.', f'{_ANY}.sensitivity', 'pct'),
    ('any-DR spec.', f'{_ANY}.specificity', 'pct'),
    ('any-DR AUC', f'{_ANY}.auc', 'f3'),
    ('macro sens.', 'macro.sensitivity', 'pct'),
    ('final loss', 'final_train_loss', 'f3'),
    ('steps', 'steps', 'int'),
)


def fmt(value, kind: str) -> str:
  """Formats a table cell: 'pct' (0.883 -> 88.3%), 'f3', 'int'; missing/NaN -> 'n/a'."""
  if value is None or value == '' or (isinstance(value, float) and math.isnan(value)):
    return 'n/a'
  if isinstance(value, str):
    return value
  if kind == 'pct':
    return f'{100 * value:.1f}%'
  if kind == 'f3':
    return f'{value:.3f}'
  if kind == 'int':
    return str(int(value))
  return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def aggregate(workdirs: Sequence[str]) -> tuple[str, str, list[dict]]:
  """Markdown summary, full CSV and the rows for a list of run workdirs."""
  rows = [run_row(w) for w in workdirs]
  override_cols = list(dict.fromkeys(k for r in rows for k in r if k.startswith('override.')))
  varying = [k for k in override_cols if len({str(r.get(k)) for r in rows}) > 1]
  header = ['run', 'model', *[_short_key(k) for k in varying], 'status',
            *[h for h, _, _ in SUMMARY_COLUMNS]]
  body = [[r['run'], r.get('model') or 'n/a', *[str(r.get(k, '')) for k in varying],
           r['status'], *[fmt(r.get(key), kind) for _, key, kind in SUMMARY_COLUMNS]]
          for r in rows]
  md = markdown_table(header, body)

  columns = list(dict.fromkeys(k for r in rows for k in r))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator='\n')
  writer.writeheader()
  for r in rows:
    writer.writerow({k: r.get(k, '') for k in columns})
  return md, buf.getvalue(), rows


def find_workdirs(root: str | os.PathLike) -> list[str]:
  """Run workdirs directly under root (those with metrics.json, metrics.jsonl or a
  sweep record), sorted by name."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    return []
  found = []
  for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if os.path.isdir(d) and any(os.path.exists(os.path.join(d, f))
                                for f in (METRICS_JSON, METRICS_JSONL, RUN_JSON)):
      found.append(d)
  return found


def write_summary(root: str | os.PathLike, workdirs: Sequence[str] | None = None,
                  results: Sequence[Result] | None = None) -> dict[str, str]:
  """Writes `summary.md` and `summary.csv` under root; returns their paths and Markdown."""
  root = os.fspath(root)
  workdirs = list(workdirs) if workdirs is not None else find_workdirs(root)
  md, table_csv, _ = aggregate(workdirs)
  if results:
    failed = [r for r in results if r.status == 'failed']
    md += (f'\n{sum(r.status == "done" for r in results)} run(s) done, '
           f'{sum(r.status == "skipped" for r in results)} skipped (already finished), '
           f'{len(failed)} failed' + (': ' + ', '.join(r.name for r in failed) if failed else '')
           + '.\n')
  os.makedirs(root, exist_ok=True)
  paths = dict(markdown=os.path.join(root, 'summary.md'), csv=os.path.join(root, 'summary.csv'))
  with open(paths['markdown'], 'w') as f:
    f.write(md)
  with open(paths['csv'], 'w') as f:
    f.write(table_csv)
  if results is not None:
    with open(os.path.join(root, 'sweep_status.json'), 'w') as f:
      json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
  return dict(paths, text=md)

