"""Tests for drjax.sweep, drjax.compare and their scripts, on fake and on real runs."""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from drjax import compare, metrics, sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / 'scripts' / 'train.py'


# ------------------------------------------------------------------------- the grid


def test_parse_grid_splits_outside_brackets():
  axes = sweep.parse_grid([
      'config=configs/densenet.py,configs/vgg.py:smoke',
      '--config.optimizer.lr=1e-4, 3e-4',
      "config.trainable=['head','norm5'],['.*']",
  ])
  assert axes == [('config', ['configs/densenet.py', 'configs/vgg.py:smoke']),
                  ('config.optimizer.lr', ['1e-4', '3e-4']),
                  ('config.trainable', ["['head','norm5']", "['.*']"])]
  with pytest.raises(ValueError, match='key=value'):
    sweep.parse_grid(['config'])
  with pytest.raises(ValueError, match='twice'):
    sweep.parse_grid(['a=1', 'a=2'])


def test_expand_grid_and_names():
  runs = sweep.expand_grid(sweep.parse_grid([
      'config=configs/densenet.py,configs/resnet.py', 'config.optimizer.lr=1e-4,3e-4',
      'config.input.dataset=idrid']))
  assert len(runs) == 4
  assert runs[1] == {'config': 'configs/densenet.py', 'config.optimizer.lr': '3e-4',
                     'config.input.dataset': 'idrid'}
  # Only the varying axes name a run; the constant dataset axis is left out.
  assert sweep.run_names(runs) == ['densenet_lr=1e-4', 'densenet_lr=3e-4',
                                   'resnet_lr=1e-4', 'resnet_lr=3e-4']
  # Clashing last components fall back to the full path.
  runs = [{'config': 'c.py', 'config.a.lr': '1', 'config.b.lr': '2'},
          {'config': 'c.py', 'config.a.lr': '3', 'config.b.lr': '4'}]
  assert sweep.run_names(runs) == ['a.lr=1_b.lr=2', 'a.lr=3_b.lr=4']
  assert sweep.run_names([{'config': 'configs/vgg.py:smoke'}]) == ['vgg-smoke']


def test_plan_and_command(tmp_path):
  runs = sweep.plan([{'config': 'configs/densenet.py:smoke', 'config.seed': '1'}], tmp_path)
  cmd = sweep.train_command(runs[0], 'scripts/train.py', python='python')
  assert cmd == ['python', 'scripts/train.py', f'--workdir={tmp_path / "densenet-smoke"}',
                 '--config=configs/densenet.py:smoke', '--config.seed=1']
  with pytest.raises(ValueError, match='config'):
    sweep.plan([{'config.seed': '1'}], tmp_path)


def test_paper_sweep_file():
  runs = sweep.load_sweep_file(REPO / 'configs' / 'sweeps' / 'paper.py')
  assert [r['config'] for r in runs] == [
      'configs/densenet.py', 'configs/resnet.py', 'configs/vgg.py']
  assert sweep.run_names(runs) == ['densenet', 'resnet', 'vgg']


# ------------------------------------------------------------------------- fake workdirs


def _fake_run(workdir, model, seed, num_steps=40, report_nesting=None):
  """A finished workdir as TRAIN writes it: config.json, metrics.jsonl, metrics.json."""
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, size=60)
  probs = rng.dirichlet(np.ones(5), size=60)
  probs[np.arange(60), labels] += 0.3  # better than chance, far from perfect
  probs /= probs.sum(-1, keepdims=True)
  report = metrics.classification_report(labels, probs)
  payload = {report_nesting: report} if report_nesting else dict(report)
  payload['weights_source'] = 'random init'
  with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
    json.dump(payload, f)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'model': model, 'optimizer': {'lr': 1e-4}}, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step in range(0, num_steps, 5):
      f.write(json.dumps({'step': step, 'train_loss': 1.6 * np.exp(-step / 20) + 0.1,
                          'lr': 1e-4}) + '\n')
      if step == 20:
        f.write(json.dumps({'step': step, 'eval_kappa': 0.3}) + '\n')  # an eval line
  return report


def test_read_loss_curve_dedups_resumed_steps_and_truncated_lines(tmp_path):
  lines = [{'step': 0, 'train_loss': 2.0}, {'step': 10, 'train_loss': 1.0},
           {'step': 20, 'train_loss': 0.9},
           # killed after step 20, resumed from the step-10 checkpoint: step 20 is logged again
           {'step': 20, 'train_loss': 0.8}, {'step': 30, 'train_loss': 0.5}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(x) + '\n' for x in lines) + '{"step": 40, "train_lo')
  steps, losses = sweep.read_loss_curve(str(tmp_path))
  assert steps == [0, 10, 20, 30] and losses == [2.0, 1.0, 0.8, 0.5]


def test_aggregate_fake_workdirs(tmp_path):
  reports = {}
  for name, model, lr in [('densenet_lr=1e-4', 'densenet121', '1e-4'),
                          ('densenet_lr=3e-4', 'densenet121', '3e-4')]:
    reports[name] = _fake_run(tmp_path / name, model, seed=len(reports))
    with open(tmp_path / name / sweep.RUN_JSON, 'w') as f:
      json.dump({'overrides': {'config': 'configs/densenet.py', 'config.optimizer.lr': lr}}, f)
  os.makedirs(tmp_path / 'unfinished')
  (tmp_path / 'unfinished' / 'metrics.jsonl').write_text('{"step": 0, "train_loss": 1.5}\n')
  os.makedirs(tmp_path / 'not_a_run')

  workdirs = sweep.find_workdirs(tmp_path)
  assert [os.path.basename(w) for w in workdirs] == [
      'densenet_lr=1e-4', 'densenet_lr=3e-4', 'unfinished']
  out = sweep.write_summary(tmp_path)
  md = pathlib.Path(out['markdown']).read_text()
  header = md.splitlines()[0]
  assert 'lr' in header and 'ref. sens.' in header and 'kappa' in header
  r0 = reports['densenet_lr=1e-4']
  row0 = next(line for line in md.splitlines() if line.startswith('| densenet_lr=1e-4 '))
  assert f"{100 * r0['referable']['sensitivity']:.1f}%" in row0
  assert f"{r0['kappa']:.3f}" in row0
  assert '| unfinished |' in md and 'n/a' in md

  rows = list(csv.DictReader(io.StringIO(pathlib.Path(out['csv']).read_text())))
  assert len(rows) == 3
  assert float(rows[1]['any_dr.auc']) == pytest.approx(reports['densenet_lr=3e-4']['any_dr']['auc'])
  assert rows[0]['override.config.optimizer.lr'] == '1e-4'
  assert rows[0]['weights_source'] == 'random init'  # extra keys of metrics.json are kept
  assert rows[2]['status'] == 'unfinished' and rows[2]['steps'] == '0'


def test_compare_table1_and_figure(tmp_path):
  reports = {}
  for seed, (name, model) in enumerate([('densenet', 'densenet121'), ('resnet', 'resnet101'),
                                        ('vgg', 'vgg16')]):
    reports[model] = _fake_run(tmp_path / name, model, seed,
                               report_nesting='validation' if model == 'vgg16' else None)
  result = compare.compare(sweep.find_workdirs(tmp_path), str(tmp_path / 'out'))
  table = result['table']
  assert 'grade >= 2' in table
  for model, label in [('densenet121', 'DenseNet121'), ('resnet101', 'ResNet101'),
                       ('vgg16', 'VGG16')]:
    b = reports[model]['referable']
    row = next(line for line in table.splitlines() if line.startswith(f'| {label} |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1:5] == [f"{100 * b['sensitivity']:.1f}%", f"{100 * b['specificity']:.1f}%",
                          f"{100 * b['accuracy']:.1f}%", f"{b['auc']:.3f}"]
    assert cells[5] == f"{reports[model]['kappa']:.3f}"
  assert '| DenseNet121 | 77.0% | 91.3% | 88.3% |' in table  # the paper's row
  with Image.open(result['figure_path']) as im:
    assert im.format == 'PNG' and im.size[0] == 3 * 450
  any_dr = compare.compare(sweep.find_workdirs(tmp_path), str(tmp_path / 'o2'), threshold_grade=1)
  assert 'grade >= 1' in any_dr['table']


def test_compare_duplicate_backbones_get_unique_labels(tmp_path):
  _fake_run(tmp_path / 'a', 'densenet121', 0)
  _fake_run(tmp_path / 'b', 'densenet121', 1)
  runs = compare.load_runs(sweep.find_workdirs(tmp_path))
  assert [r.label for r in runs] == ['DenseNet121 (a)', 'DenseNet121 (b)']


# ------------------------------------------------------------------------- running


FAKE_TRAIN = textwrap.dedent('''\
    """A stand-in for scripts/train.py: fails when lr == 'bad', else writes a finished run."""
    import json, os, sys
    args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    workdir = args['workdir']
    with open(os.path.join(os.path.dirname(workdir), 'calls.txt'), 'a') as f:
      f.write(os.path.basename(workdir) + '\\n')
    if args.get('config.optimizer.lr') == 'bad':
      print('boom: learning rate is bad', file=sys.stderr)
      sys.exit(3)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({'model': os.path.basename(args['config']).split('.')[0]}, f)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write(json.dumps({'step': 1, 'train_loss': 1.0}) + '\\n')
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump({'accuracy': 0.5, 'kappa': 0.1, 'confusion_matrix': [[1]]}, f)
    ''')


def _run_script(args, cwd=REPO, timeout=120):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_sweep_script_resumes_and_survives_a_failure(tmp_path):
  fake = tmp_path / 'fake_train.py'
  fake.write_text(FAKE_TRAIN)
  root = tmp_path / 'root'
  args = ['scripts/sweep.py', f'--root={root}', f'--train_script={fake}',
          '--grid=config=configs/densenet.py,configs/vgg.py',
          '--grid=config.optimizer.lr=1e-4,bad']
  first = _run_script(args)
  assert first.returncode == 1, first.stderr  # one run per backbone failed
  calls = (root / 'calls.txt').read_text().split()
  assert sorted(calls) == ['densenet_lr=1e-4', 'densenet_lr=bad', 'vgg_lr=1e-4', 'vgg_lr=bad']
  status = {r['name']: r for r in json.loads((root / 'sweep_status.json').read_text())}
  assert status['densenet_lr=bad']['status'] == 'failed'
  assert 'boom' in status['densenet_lr=bad']['message']
  assert status['vgg_lr=1e-4']['status'] == 'done'
  summary = (root / 'summary.md').read_text()
  assert '2 failed' in summary and '| vgg_lr=1e-4 | vgg |' in summary

  second = _run_script(args)  # resume: finished runs are skipped, failed ones retried
  assert second.returncode == 1
  calls = (root / 'calls.txt').read_text().split()
  assert calls.count('densenet_lr=1e-4') == 1 and calls.count('densenet_lr=bad') == 2
  status = {r['name']: r['status'] for r in json.loads((root / 'sweep_status.json').read_text())}
  assert status['vgg_lr=1e-4'] == 'skipped'

  compared = _run_script(['scripts/compare.py', '--workdirs', str(root / 'densenet_lr=1e-4'),
                          str(root / 'vgg_lr=1e-4'), f'--out={tmp_path / "cmp"}'])
  assert compared.returncode == 0, compared.stderr
  assert (tmp_path / 'cmp' / 'table1.md').is_file()
  assert (tmp_path / 'cmp' / 'loss_curves.png').is_file()


def test_sweep_refuses_a_workdir_of_another_run(tmp_path):
  run = sweep.plan([{'config': 'configs/densenet.py'}], tmp_path)[0]
  os.makedirs(run.workdir)
  with open(os.path.join(run.workdir, sweep.RUN_JSON), 'w') as f:
    json.dump({'overrides': {'config': 'configs/other.py'}}, f)
  [result] = sweep.run_sweep([run], train_script='/nonexistent.py', log_fn=lambda s: None)
  assert result.status == 'failed' and 'other overrides' in result.message


@pytest.mark.slow
@pytest.mark.skipif(not TRAIN_SCRIPT.is_file(),
                    reason='scripts/train.py (TRAIN) has not landed yet; this test runs the '
                           'real two-run smoke sweep once it exists')
def test_real_tiny_sweep_with_train_script(tmp_path):
  # Two smoke runs side by side (each is mostly single-threaded compilation, ~80 CPU-s).
  root = tmp_path / 'root'
  args = ['scripts/sweep.py', f'--root={root}', '--parallel=2',
          '--grid=config=configs/densenet.py:smoke', '--grid=config.seed=0,1']
  result = _run_script(args, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  for name in ('seed=0', 'seed=1'):
    workdir = root / name
    report = sweep.find_report(json.loads((workdir / 'metrics.json').read_text()))
    assert report is not None and 'referable' in report
    assert sweep.read_loss_curve(str(workdir))[0], 'metrics.jsonl has no train_loss'
  summary = (root / 'summary.md').read_text()
  assert '| seed=0 | densenet_tiny |' in summary and '2 run(s) done' in summary
  again = _run_script(args, timeout=300)  # resume: nothing left to train
  assert again.returncode == 0 and '2 skipped' in (root / 'summary.md').read_text()
  cmp = compare.compare(sweep.find_workdirs(root), str(tmp_path / 'cmp'))
  assert cmp['missing'] == [] and cmp['figure_path'] is not None
