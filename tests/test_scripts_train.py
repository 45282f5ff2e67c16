"""End to end: scripts/train.py on the smoke config, then scripts/evaluate.py on its run."""

import json
import os

import pytest
from script_runner import REPO, run_ok, run_script

from drjax import evaluate, run_files

SMOKE = REPO / 'configs' / 'densenet.py:smoke'


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('smoke')
  workdir = tmp / 'run'
  result = run_ok('train.py', '--config', SMOKE, '--workdir', workdir,
                  f'--config.input.data_dir={tmp / "tfds"}', cwd=tmp)
  return workdir, tmp, result


def test_train_script_leaves_every_artefact(smoke_run):
  workdir, _, result = smoke_run
  assert (workdir / 'checkpoints' / '6').is_dir()  # final checkpoint
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert (workdir / 'loss_curve.png').stat().st_size > 0
  assert (workdir / 'gradcam' / 'panel.png').stat().st_size > 0
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model'] == 'densenet_tiny'
  rows = run_files.read_metrics_jsonl(workdir)
  assert [r['step'] for r in rows if 'train_loss' in r] == [2, 3, 4, 6]
  assert [r['step'] for r in rows if 'val_kappa' in r] == [3, 6]
  report = json.loads((workdir / 'metrics.json').read_text())
  for key in ('accuracy', 'kappa', 'confusion_matrix', 'referable', 'any_dr', 'per_grade'):
    assert key in report
  # No ImageNet weights in the smoke config: said loudly, recorded, everything trains.
  assert 'RANDOM INIT' in (workdir / 'weights_source.txt').read_text()
  assert report['pretrained'] is False and report['trainable'] == ['.*']
  assert 'NO PRETRAINED WEIGHTS' in result.stderr


def test_load_run_restores_the_final_variables(smoke_run):
  workdir, _, _ = smoke_run
  config, model, variables = evaluate.load_run(workdir)
  assert config.model == 'densenet_tiny'
  assert set(variables) == {'params', 'batch_stats'}
  assert 'classifier' in variables['params']


def test_evaluate_script_writes_metrics(smoke_run):
  workdir, tmp, _ = smoke_run
  out = tmp / 'eval.json'
  result = run_ok('evaluate.py', '--workdir', workdir, '--split', 'validation', '--out', out,
                  cwd=tmp)
  report = json.loads(out.read_text())
  final = json.loads((workdir / 'metrics.json').read_text())
  # The same checkpoint on the same split gives the training run's final metrics.
  assert report['confusion_matrix'] == final['confusion_matrix']
  assert report['kappa'] == pytest.approx(final['kappa'])
  assert 'kappa=' in result.stdout


@pytest.mark.parametrize('override, message', [
    ('--config.model=densenet12', "Unknown model 'densenet12'"),
    ("--config.trainable=('features/no_such_block/.*',)", 'match no parameter'),
    ('--config.input.class_weights=(1.0, 1.0)', 'cannot weight labels'),
])
def test_train_script_reports_a_bad_config_value_in_one_line(smoke_run, tmp_path, override,
                                                             message):
  _, tmp, _ = smoke_run  # its dataset, already built
  result = run_script('train.py', '--config', SMOKE, '--workdir', tmp_path / 'run',
                      f'--config.input.data_dir={tmp / "tfds"}',
                      '--config.weights.random_init_trains_all=false', override,
                      cwd=tmp_path, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('args, message', [
    (['--config', 'configs/densenet.py:smoek'], "one of smoke, paper, cpu224"),
    (['--config', 'configs/no_such_config.py'], 'cannot load the config file'),
    (['--config', 'configs/densenet.py', '--config.weights.path=/no/such/dir'],
     'Configured weights /no/such/dir do not exist'),
])
def test_train_script_reports_a_flag_or_weights_mistake_in_one_line(tmp_path, args, message):
  # These fail before any dataset is built, so the default config costs nothing here.
  result = run_script('train.py', *args, '--workdir', tmp_path / 'run', cwd=REPO, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
  assert 'Traceback' not in result.stderr


def test_train_script_refuses_a_workdir_in_use(tmp_path):
  workdir = tmp_path / 'run'
  with run_files.workdir_lock(workdir):
    result = run_script('train.py', '--config', SMOKE, '--workdir', workdir,
                        f'--config.input.data_dir={tmp_path / "tfds"}', cwd=tmp_path,
                        timeout=300)
  assert result.returncode == 1
  assert f'error: {workdir} is in use by another drjax run (pid {os.getpid()}' in result.stderr
  assert 'Traceback' not in result.stderr
  assert sorted(p.name for p in workdir.iterdir()) == ['.lock']
