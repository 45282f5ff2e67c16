"""Tests for drjax.run_files: the workdir lock and the metrics a run writes."""

import os
import signal
import subprocess
import sys

import ml_collections as mlc
import pytest

from drjax import run_files, train


def test_workdir_lock_refuses_a_second_run_and_touches_nothing(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text('{"step": 1}\n')
  with run_files.workdir_lock(workdir):
    assert f'pid {os.getpid()}' in (workdir / '.lock').read_text()
    busy = f'in use by another drjax run.*pid {os.getpid()}'
    with pytest.raises(run_files.WorkdirBusyError, match=busy):
      with run_files.workdir_lock(workdir):
        pass
    # The whole run refuses before reading its config or writing anything.
    with pytest.raises(run_files.WorkdirBusyError, match='--workdir'):
      train.train_and_evaluate(mlc.ConfigDict({'model': 'not read'}), workdir)
  assert (workdir / 'metrics.jsonl').read_text() == '{"step": 1}\n'
  assert sorted(p.name for p in workdir.iterdir()) == ['.lock', 'metrics.jsonl']
  with run_files.workdir_lock(workdir):  # released
    pass


def test_workdir_lock_dies_with_its_holder(tmp_path):
  """A SIGKILLed run leaves no stale lock: its resume must not be refused."""
  workdir = tmp_path / 'run'
  holder = subprocess.Popen(
      [sys.executable, '-c',
       'import pathlib, sys, time\n'
       'from drjax import run_files\n'
       f'with run_files.workdir_lock(pathlib.Path({str(workdir)!r})):\n'
       '  print("locked", flush=True)\n'
       '  time.sleep(600)\n'],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(run_files.WorkdirBusyError, match=f'pid {holder.pid}'):
      with run_files.workdir_lock(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with run_files.workdir_lock(workdir):
    pass


def test_metric_writer_replays_a_resumed_run_from_its_checkpoint(tmp_path):
  with run_files.metric_writer(tmp_path, 0) as write:
    for step in range(1, 6):
      write(step, {'train_loss': 1.0 / step})
  with run_files.metric_writer(tmp_path, 3) as write:  # resumed at step 3's checkpoint
    write(4, {'train_loss': 0.5})
  rows = run_files.read_metrics_jsonl(tmp_path)
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert rows[-1]['train_loss'] == 0.5 and rows[1]['train_loss'] == 0.5
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
