"""Multi-process training (drjax.distributed): 2 CPU processes on loopback against 1 process.

The processes run the real entry point, `scripts/train.py` on the smoke config,
joined by JAX's distributed runtime (loopback coordinator, gloo collectives).
Every subprocess has a timeout, so a hang fails the test instead of the CI job.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from drjax import distributed, evaluate, run_files

REPO = pathlib.Path(__file__).resolve().parents[1]
# Generous: the runs take seconds on an idle machine; these only turn a hang into a failure.
RUN_TIMEOUT_S = 600
HEARTBEAT_TIMEOUT_S = 10


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices_per_process: int, cache_dir: pathlib.Path) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('DRJAX_', 'SLURM_', 'OMPI_', 'JAX_COORDINATOR'))}
  env.update(PYTHONPATH=str(REPO), DRJAX_NO_DOWNLOAD='1', JAX_PLATFORMS='cpu',
             # Compiling dominates these runs: LLVM's -O0 cuts ~30% of it (both sides of
             # every comparison use it), and later runs load the programs that earlier
             # ones compiled (e.g. the model init) from a persistent cache.
             XLA_FLAGS=(f'--xla_force_host_platform_device_count={devices_per_process} '
                        '--xla_backend_optimization_level=0'),
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return env


def _train_args(workdir: pathlib.Path, data_dir: pathlib.Path, num_steps: int, *extra: str):
  return [sys.executable, str(REPO / 'scripts' / 'train.py'),
          '--config', str(REPO / 'configs' / 'densenet.py:smoke'), '--workdir', str(workdir),
          f'--config.input.data_dir={data_dir}', f'--config.num_steps={num_steps}',
          '--config.log_every=1', '--config.eval_every=100000', '--config.gradcam.num_images=0',
          *extra]


def _launch(args, n: int, log_dir: pathlib.Path, heartbeat_s: int,
            cache_dir: pathlib.Path) -> list[subprocess.Popen]:
  """Starts `n` processes of `args` on a loopback coordinator, 1 CPU device each."""
  address = f'127.0.0.1:{_free_port()}'
  procs = []
  for i in range(n):
    log = (log_dir / f'process{i}.log').open('w')
    procs.append(subprocess.Popen(
        [*args, f'--coordinator_address={address}', f'--num_processes={n}', f'--process_id={i}',
         f'--heartbeat_timeout={heartbeat_s}', '--initialization_timeout=300'],
        cwd=log_dir, env=_env(1, cache_dir), stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait_all(procs, timeout_s):
  deadline = time.monotonic() + timeout_s
  try:
    return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _logs(log_dir: pathlib.Path) -> str:
  return '\n'.join(f'--- {f.name}\n{f.read_text()[-3000:]}'
                   for f in sorted(log_dir.glob('process*.log')))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  # Empty: the first multi-process run builds the smoke dataset (process 0 first).
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def test_two_processes_match_one_and_checkpoints_cross_process_counts(tmp_path, data_dir,
                                                                      cache_dir):
  """2 processes x 1 device train 4 steps; 1 process x 2 devices resumes their step 2.

  The pipeline gives process p rows [p*B/2, (p+1)*B/2) of every global batch, so
  both runs see the same global batches, and steps 3-4 of the 1-process run must
  reproduce those of the 2-process run from its own (2-process) checkpoint.
  """
  w2 = tmp_path / 'two_processes'
  logs2 = tmp_path / 'logs2'
  logs2.mkdir()
  args = _train_args(w2, data_dir, 4, '--config.checkpoint_every=2')
  codes = _wait_all(_launch(args, 2, logs2, heartbeat_s=60, cache_dir=cache_dir), RUN_TIMEOUT_S)
  assert codes == [0, 0], _logs(logs2)
  assert sorted(int(p.name) for p in (w2 / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 4]
  # Only process 0 logs: one line per step, not one per process.
  rows2 = [r for r in run_files.read_metrics_jsonl(w2) if 'train_loss' in r]
  assert [r['step'] for r in rows2] == [1, 2, 3, 4]
  assert (w2 / 'metrics.json').exists()

  # Resume the 2-process run's step 2 in a single process with 2 devices.
  w1 = tmp_path / 'one_process'
  shutil.copytree(w2, w1, ignore=shutil.ignore_patterns('4', 'metrics.json'))
  result = subprocess.run(_train_args(w1, data_dir, 4, '--config.checkpoint_every=2'),
                          cwd=tmp_path, env=_env(2, cache_dir), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert 'Resuming from checkpoint step 2' in result.stdout
  assert 'drjax: process' not in result.stdout  # a plain single-process run

  _, _, at2 = evaluate.load_run(w2, step=2)
  _, _, two = evaluate.load_run(w2, step=4)
  _, _, one = evaluate.load_run(w1, step=4)
  chex.assert_trees_all_close(one, two, rtol=1e-5, atol=1e-6)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       at2['params'], two['params'])
  assert max(jax.tree.leaves(moved)) > 1e-4  # steps 3-4 did change the parameters
  rows1 = {r['step']: r for r in run_files.read_metrics_jsonl(w1) if 'train_loss' in r}
  for r in rows2[2:]:
    np.testing.assert_allclose(rows1[r['step']]['train_loss'], r['train_loss'], rtol=1e-5)


def test_a_killed_process_stops_the_other_with_a_clear_error(tmp_path, data_dir, cache_dir):
  """SIGKILL process 1 once both joined the run: process 0 must exit with JAX's error.

  Process 0 then waits for its peer (at the dataset barrier or in an all-reduce:
  gloo would wait forever); the coordination service's heartbeat check is what
  stops it, whatever it is waiting in, so killing early keeps the test short.
  """
  workdir = tmp_path / 'run'
  logs = tmp_path / 'logs'
  logs.mkdir()
  args = _train_args(workdir, data_dir, 100000, '--config.checkpoint_every=100000')
  procs = _launch(args, 2, logs, heartbeat_s=HEARTBEAT_TIMEOUT_S, cache_dir=cache_dir)
  try:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not all(f'drjax: process {i} of 2' in (logs / f'process{i}.log').read_text()
                  for i in range(2)):
      assert all(p.poll() is None for p in procs), _logs(logs)
      assert time.monotonic() < deadline, 'the processes never connected\n' + _logs(logs)
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    try:
      code = procs[0].wait(timeout=HEARTBEAT_TIMEOUT_S + 120)
    except subprocess.TimeoutExpired:
      pytest.fail('process 0 still running after its peer was killed\n' + _logs(logs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  assert code != 0
  log0 = (logs / 'process0.log').read_text()
  assert 'stopped sending heartbeats' in log0 or 'another process probably died' in log0, \
      log0[-4000:]


@pytest.mark.parametrize('environ, expected', [
    ({}, distributed.Launch(None, None, None, None)),
    ({'DRJAX_NUM_PROCESSES': '1'}, distributed.Launch(None, 1, None, None)),
    ({'DRJAX_COORDINATOR_ADDRESS': 'h:1', 'DRJAX_NUM_PROCESSES': '4', 'DRJAX_PROCESS_ID': '3'},
     distributed.Launch('h:1', 4, 3, 'flags')),
    ({'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '8',
      'SLURM_PROCID': '5', 'SLURM_LOCALID': '1'}, distributed.Launch(None, None, None, 'slurm')),
    ({'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n1', 'SLURM_NTASKS': '1',
      'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}, distributed.Launch(None, None, None, None)),
    ({'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_MCA_orte_hnp_uri': 'x'},
     distributed.Launch(None, None, None, 'openmpi')),
])
def test_resolve_launch(environ, expected):
  assert distributed.resolve_launch(environ=environ) == expected


def test_resolve_launch_rejects_inconsistent_settings():
  with pytest.raises(ValueError, match='coordinator_address'):
    distributed.resolve_launch(num_processes=2, process_id=0, environ={})
  with pytest.raises(ValueError, match='process_id'):
    distributed.resolve_launch('h:1', 2, 2, environ={})
  with pytest.raises(ValueError, match='not an integer'):
    distributed.resolve_launch(environ={'DRJAX_NUM_PROCESSES': 'two'})


def test_single_process_helpers_are_identities():
  assert distributed.broadcast_str('x', 'value') == 'value'
  assert distributed.process_zero_first(lambda: 3, 'x') == 3
  np.testing.assert_array_equal(distributed.gather_rows(np.arange(3)), np.arange(3))
  ids = [d.id for d in distributed.global_devices()]
  assert ids == sorted(ids)


def test_a_failed_host_collective_is_reported_as_a_lost_peer():
  # What multihost_utils raised when its peer was killed during an all-gather.
  lost = ValueError('UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/'
                    'pair.cc:547] Connection closed by peer [127.0.0.1]:58033')
  assert distributed.collective_failed(lost)
  assert not distributed.collective_failed(ValueError('config.batch_size must be positive'))
  assert not distributed.collective_failed(KeyboardInterrupt())
