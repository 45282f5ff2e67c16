"""Tests for checkpointing (drjax.checkpoint through drjax.train): exact resume after SIGKILL,
corrupt-checkpoint fallback, other-architecture workdirs, non-finite loss."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import pytest
from absl import logging as absl_logging
from ml_collections.config_flags import config_flags

from drjax import checkpoint, evaluate, run_files, train

REPO = pathlib.Path(__file__).resolve().parents[1]
KILL_AT = 5  # SIGKILL after step 5: after the step-3 checkpoint, before the step-6 one.


def _config(data_dir, **overrides):
  module = config_flags._LoadConfigModule('densenet_config', str(REPO / 'configs' / 'densenet.py'))
  config = module.get_config('smoke')
  config.input.data_dir = str(data_dir)
  config.gradcam.num_images = 0
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, data_dir):
  """An uninterrupted smoke run (6 steps, checkpoints at 3 and 6)."""
  os.environ['DRJAX_NO_DOWNLOAD'] = '1'
  workdir = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(_config(data_dir), workdir)
  return workdir


def _final(workdir):
  _, _, variables = evaluate.load_run(workdir)
  report = json.loads((workdir / 'metrics.json').read_text())
  rows = [{k: v for k, v in r.items() if k != 'steps_per_sec'}
          for r in run_files.read_metrics_jsonl(workdir)]
  return jax.device_get(variables), report, rows


def _assert_same_run(workdir, reference):
  variables, report, rows = _final(workdir)
  ref_variables, ref_report, ref_rows = _final(reference)
  chex.assert_trees_all_equal(variables, ref_variables)  # bit-identical
  assert report == ref_report
  assert rows == ref_rows


def test_sigkill_mid_training_then_restart_gives_the_uninterrupted_result(
    tmp_path, data_dir, reference_run):
  workdir = tmp_path / 'killed'
  # A real process killed by SIGKILL right after step KILL_AT (once the step-3
  # checkpoint is committed, so that the restart really resumes).
  code = textwrap.dedent(f"""
      import os, pathlib, runpy, signal, sys, time
      import drjax.train

      def hook(step):
        if step == {KILL_AT}:
          marker = pathlib.Path({str(workdir)!r}) / 'checkpoints' / '3' / 'commit_success.txt'
          deadline = time.time() + 120
          while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
          os.kill(os.getpid(), signal.SIGKILL)

      drjax.train._step_hook = hook
      sys.argv = ['train.py', '--config', {str(REPO / 'configs' / 'densenet.py:smoke')!r},
                  '--workdir', {str(workdir)!r}, '--config.input.data_dir={data_dir}',
                  '--config.gradcam.num_images=0']
      runpy.run_path({str(REPO / 'scripts' / 'train.py')!r}, run_name='__main__')
  """)
  env = dict(os.environ, PYTHONPATH=str(REPO), DRJAX_NO_DOWNLOAD='1')
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == -9, result.stderr[-3000:]
  assert not (workdir / 'metrics.json').exists()
  assert max(r['step'] for r in run_files.read_metrics_jsonl(workdir)) >= 4  # it got past step 3
  train.train_and_evaluate(_config(data_dir), workdir)  # restart: resumes by itself
  _assert_same_run(workdir, reference_run)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir,
                                                                   reference_run, caplog):
  workdir = tmp_path / 'corrupt'
  shutil.copytree(reference_run, workdir)
  (workdir / 'metrics.json').unlink()
  latest = workdir / 'checkpoints' / '6' / 'variables'
  for f in latest.rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncate every file
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(_config(data_dir), workdir)
  assert any('step 6' in r.getMessage() and 'unreadable' in r.getMessage()
             for r in caplog.records)
  assert len(list((workdir / 'corrupt_checkpoints').iterdir())) == 1
  # Resumed from step 3 and retrained 4-6: the same parameters as the reference.
  _assert_same_run(workdir, reference_run)


def test_workdir_of_another_architecture_is_a_clear_error(tmp_path, data_dir, reference_run):
  workdir = tmp_path / 'other'
  shutil.copytree(reference_run, workdir)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match='densenet_tiny.*resnet_tiny'):
    train.train_and_evaluate(_config(data_dir, model='resnet_tiny',
                                     trainable=('fc/.*',)), workdir)
  # Without config.json the checkpoint's own metadata catches it, before orbax reads arrays.
  (workdir / 'config.json').unlink()
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match='model'):
    train.train_and_evaluate(_config(data_dir, model='resnet_tiny',
                                     trainable=('fc/.*',)), workdir)


def test_zero_init_residual_on_a_non_resnet_is_a_clear_error(tmp_path, data_dir):
  config = _config(data_dir, **{'weights.zero_init_residual': True})
  with pytest.raises(ValueError, match='zero_init_residual=True applies to ResNets only'):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, data_dir, reference_run):
  workdir = tmp_path / 'nan'
  shutil.copytree(reference_run, workdir)
  # Resume at step 6 with a NaN learning rate: step 7 poisons the weights, step 8's loss is NaN.
  config = _config(data_dir, num_steps=12, **{'optimizer.lr': float('nan')})
  with pytest.raises(FloatingPointError, match='Non-finite training loss.*step 8'):
    train.train_and_evaluate(config, workdir)
  manager = checkpoint.make_manager(workdir / 'checkpoints', read_only=True)
  assert manager.latest_step() == 6
  manager.close()
  _, _, variables = evaluate.load_run(workdir)
  chex.assert_tree_all_finite(variables)


def _orbax_info_records(caplog, directory):
  """The INFO records orbax logs while saving a small checkpoint."""
  caplog.clear()
  manager = checkpoint.make_manager(directory, max_to_keep=1)
  with caplog.at_level(logging.INFO):
    checkpoint.save(manager, 1, {'params': {'w': jnp.ones(3)}},
                    {'step': jnp.int32(1), 'opt_state': {}}, {'model': 'none'})
    manager.wait_until_finished()
    manager.close()
  return [r for r in caplog.records
          if r.levelno < logging.WARNING and f'{os.sep}orbax{os.sep}' in r.pathname]


def test_quiet_orbax_info_logs_drops_orbax_info_records_only(tmp_path, caplog, monkeypatch):
  absl_logger = absl_logging.get_absl_logger()
  monkeypatch.setattr(absl_logger, 'filters', [])  # restored after the test
  assert _orbax_info_records(caplog, tmp_path / 'before')  # orbax does log a save at INFO

  checkpoint.quiet_orbax_info_logs()
  checkpoint.quiet_orbax_info_logs()  # idempotent
  assert len(absl_logger.filters) == 1
  assert not _orbax_info_records(caplog, tmp_path / 'after')

  def kept(level, pathname):
    return bool(absl_logger.filter(logging.LogRecord('absl', level, pathname, 1, 'm', None, None)))

  orbax_file = checkpoint.ocp.__file__
  assert kept(logging.WARNING, orbax_file)  # orbax's warnings stay
  assert kept(logging.INFO, checkpoint.__file__)  # and everybody else's INFO
  assert not kept(logging.INFO, orbax_file)
  verbosity = absl_logging.get_verbosity()
  try:
    absl_logging.set_verbosity(1)  # --verbosity=1 lets them through
    assert kept(logging.INFO, orbax_file)
  finally:
    absl_logging.set_verbosity(verbosity)


def test_a_read_only_manager_sets_no_saving_options(tmp_path, caplog):
  # Reading a finished run (evaluate, cam_study, export) gives orbax no saving options to
  # override and warn about; its one line saying the directory is read only remains.
  manager = checkpoint.make_manager(tmp_path / 'ckpt', max_to_keep=1)
  checkpoint.save(manager, 1, {'params': {'w': jnp.ones(3)}},
                  {'step': jnp.int32(1), 'opt_state': {}}, {'model': 'none'})
  manager.wait_until_finished()
  manager.close()
  assert checkpoint.has_steps(tmp_path / 'ckpt')
  assert not checkpoint.has_steps(tmp_path / 'missing')
  with caplog.at_level(logging.WARNING):
    reader = checkpoint.make_manager(tmp_path / 'ckpt', read_only=True)
    assert reader.latest_step() == 1
    reader.close()
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not [w for w in warnings if 'CheckpointManagerOptions' in w], warnings


def test_opening_a_manager_removes_interrupted_saves_before_it_returns(tmp_path):
  manager = checkpoint.make_manager(tmp_path / 'ckpt', max_to_keep=2)
  checkpoint.save(manager, 1, {'params': {'w': jnp.ones(3)}},
                  {'step': jnp.int32(1), 'opt_state': {}}, {'model': 'none'})
  manager.wait_until_finished()
  manager.close()
  interrupted = tmp_path / 'ckpt' / '2.orbax-checkpoint-tmp-1733500000'
  (interrupted / 'variables').mkdir(parents=True)  # as a SIGKILL mid-save leaves it
  manager = checkpoint.make_manager(tmp_path / 'ckpt', max_to_keep=2)
  assert not interrupted.exists()
  assert manager.latest_step() == 1
  manager.close()
