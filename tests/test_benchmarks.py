"""benchmarks/common.py's lockstep: two worker processes take turns at every timed repeat.

The workers here are stand-ins that time a step recording `time.monotonic()` (one clock
for every process), so the tests see exactly who ran when. At the end, bench_cam_methods.py
end to end on the tiny DenseNet.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402

WORKER = '''
import json, sys, time
from benchmarks import common

started = time.monotonic()
spec = json.loads(sys.argv[2])
common.prepare_process(spec)
stamps = []

def step(name=''):
  stamps.append(time.monotonic())
  names.append(name)
  if len(stamps) == 1:
    time.sleep(WARMUP_S)  # the first call compiles
  if len(stamps) == spec.get('exit_on_call'):
    sys.exit(3)

names = []
if spec.get('together'):
  timings = common.time_calls_together({'f': lambda: step('f'), 'g': lambda: step('g')},
                                       warmup=1, repeats=spec['repeats'], label='f+g')
else:
  timings = [common.time_calls(step, warmup=1, repeats=spec['repeats'], label=label)
             for label in spec['labels']]
common.emit(dict(spec, started=started, stamps=stamps, names=names, timings=timings))
'''
WARMUP_S = 0.5


@pytest.fixture
def worker_script(tmp_path):
  path = tmp_path / 'worker.py'
  path.write_text(f'WARMUP_S = {WARMUP_S}\n' + WORKER)
  return str(path)


def _spec(name, labels=('forward', 'gradcam'), **kw):
  return dict(framework=name, labels=list(labels), repeats=4, threads=None, **kw)


def _who_ran_when(results):
  calls = [(t, r['framework']) for r in results for t in r['stamps']]
  return ''.join(name for _, name in sorted(calls))


@pytest.fixture(autouse=True)
def no_settle(monkeypatch):
  monkeypatch.setattr(common, 'LOCKSTEP_SETTLE_S', 0.0)


def test_lockstep_turns_start_after_a_pause(worker_script, monkeypatch):
  monkeypatch.setattr(common, 'LOCKSTEP_SETTLE_S', 0.3)
  results = common.run_workers(worker_script, [_spec('A', labels=['f']), _spec('B', labels=['f'])],
                               interleave=True, timeout_s=120)
  assert [r.get('error') for r in results] == [None, None]
  timed = sorted((t, r['framework']) for r in results for t in r['stamps'][1:])
  assert ''.join(who for _, who in timed) == 'ABBAABBA'
  gaps = [t1 - t0 for (t0, _), (t1, _) in itertools.pairwise(timed)]
  assert min(gaps) >= 0.3


def test_lockstep_on_a_gpu_starts_together_and_does_not_pause(worker_script, monkeypatch):
  # The pause is for PyTorch's spinning CPU threads; on a GPU each turn ends synchronised.
  monkeypatch.setattr(common, 'LOCKSTEP_SETTLE_S', 2.0)
  specs = [_spec(name, labels=['f'], device='gpu') for name in 'AB']
  results = common.run_workers(worker_script, specs, interleave=True, timeout_s=120)
  assert [r.get('error') for r in results] == [None, None]
  # B's process started before A's first (compiling) call had returned.
  assert results[1]['started'] < results[0]['stamps'][0] + WARMUP_S
  timed = sorted((t, r['framework']) for r in results for t in r['stamps'][1:])
  assert ''.join(who for _, who in timed) == 'ABBAABBA'
  assert max(t1 - t0 for (t0, _), (t1, _) in itertools.pairwise(timed)) < 1.0


def test_lockstep_takes_turns_and_warms_up_alone(worker_script):
  results = common.run_workers(worker_script, [_spec('A'), _spec('B')], interleave=True,
                               timeout_s=120)
  assert [r.get('error') for r in results] == [None, None]
  # Per label: A's warm-up, B's warm-up (B starts once A is ready), then A B, B A, A B, B A.
  assert _who_ran_when(results) == 'AB' + 'ABBAABBA' + 'AB' + 'ABBAABBA'
  # B's process started after A's first (compiling) call had returned.
  assert results[1]['started'] > results[0]['stamps'][0] + WARMUP_S
  for r in results:
    assert r['lockstep'] is True
    assert [len(t['times_s']) for t in r['timings']] == [4, 4]


def test_calls_timed_together_alternate_within_each_lockstep_turn(worker_script):
  """`time_calls_together`: each turn of a worker runs every callable once, in the
  given order on repeats 0 and 1 and reversed on 2 and 3; the turns alternate as above,
  so each callable is as often the first one after the other worker's turn."""
  specs = [_spec('A', together=True), _spec('B', together=True)]
  results = common.run_workers(worker_script, specs, interleave=True, timeout_s=120)
  assert [r.get('error') for r in results] == [None, None]
  assert _who_ran_when(results) == 'AABB' + 'AABBBBAAAABBBBAA'
  for r in results:
    assert ''.join(r['names']) == 'fg' + 'fgfggfgf'  # warm-ups, then 4 repeats
    assert sorted(r['timings']) == ['f', 'g']
    assert all(len(t['times_s']) == 4 for t in r['timings'].values())
  # The timed call right after the other worker's turn (caches cold) is f once and g once
  # in each worker. (Flipping the order on every repeat made it g, g in A and f, f in B.)
  calls = sorted((t, r['framework'], n) for r in results
                 for t, n in zip(r['stamps'][2:], r['names'][2:], strict=True))
  after_other = {'A': [], 'B': []}
  for (_, before, _), (_, who, name) in itertools.pairwise(calls):
    if who != before:
      after_other[who].append(name)
  assert after_other == {'A': ['f', 'g'], 'B': ['f', 'g']}


def test_calls_timed_together_without_lockstep():
  calls = []
  timings = common.time_calls_together({'f': lambda: calls.append('f'),
                                        'g': lambda: calls.append('g')},
                                       warmup=2, repeats=3, label='f+g')
  assert ''.join(calls) == 'ffgg' + 'fgfggf'
  assert {name: len(t['times_s']) for name, t in timings.items()} == {'f': 3, 'g': 3}
  assert timings['f']['median_s'] >= timings['f']['min_s'] >= 0


def test_without_interleave_one_worker_after_the_other(worker_script):
  results = common.run_workers(worker_script, [_spec('A'), _spec('B')], interleave=False,
                               timeout_s=120)
  assert _who_ran_when(results) == 'A' * 10 + 'B' * 10
  assert 'lockstep' not in results[0]


def test_lockstep_a_worker_that_dies_fails_the_pair(worker_script):
  # B exits on its third call: its second timed repeat of 'forward'.
  results = common.run_workers(worker_script, [_spec('A'), _spec('B', exit_on_call=3)],
                               interleave=True, timeout_s=120)
  for r in results:
    assert 'B: exit code 3' in r['error']
    assert 'stamps' not in r


def test_lockstep_workers_timing_different_things_fail(worker_script):
  results = common.run_workers(worker_script, [_spec('A'), _spec('B', labels=('train',))],
                               interleave=True, timeout_s=120)
  for r in results:
    assert 'out of step' in r['error']
    assert "'forward', 'train'" in r['error']


def test_lockstep_times_out_instead_of_hanging(worker_script, tmp_path):
  hang = tmp_path / 'hang.py'
  hang.write_text('import time\ntime.sleep(600)\n')
  results = common.run_lockstep(str(hang), [_spec('A'), _spec('B')], timeout_s=1)
  assert all('A: timed out' in r['error'] for r in results)


def test_paired_speedups_only_for_timings_taken_in_lockstep():
  ours = dict(lockstep=True, times_s=[1.0, 2.0, 4.0])
  theirs = dict(lockstep=True, times_s=[3.0, 2.0, 6.0])
  assert common.paired_speedups(ours, theirs) == [1.0, 1.5, 3.0]
  assert common.paired_speedups(dict(ours, lockstep=False), theirs) is None
  assert common.paired_speedups(ours, dict(theirs, times_s=[1.0])) is None
  # bench_gradcam's results hold one timing per timed callable.
  assert common.paired_speedups(dict(lockstep=True, gradcam=ours),
                                dict(lockstep=True, gradcam=theirs), 'gradcam') == [1.0, 1.5, 3.0]
  rows = common.pair_rows([
      dict(ours, framework='jax', model='m', batch_size=2, images_per_s=1.0),
      dict(theirs, framework='torch', model='m', batch_size=2, images_per_s=0.5)])
  assert (rows[0]['ratio'], rows[0]['paired_ratio_median']) == (2.0, 1.5)
  assert '| 2.00x | 1.50x (1.00-3.00) |' in common.readme_rows('train', rows, 1, 'cpu')
  alone = common.pair_rows([dict(ours, framework='jax', model='m', batch_size=2,
                                 images_per_s=1.0)])
  assert '| n/a | n/a |' in common.readme_rows('train', alone, 1, 'cpu')


def test_images_per_s_text_never_uses_an_exponent():
  assert [common.images_per_s_text(x) for x in (2037.7, 5414.6, 779.0, 10.04, 4.126, None)] == [
      '2040', '5410', '779', '10', '4.13', 'n/a']


def test_versions_come_from_metadata_without_importing_the_frameworks():
  probe = ('import sys; from benchmarks import common; v = common.versions(); '
           'print(sorted(v), "torch" in sys.modules or "jax" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True,
                       cwd=common.REPO)
  names, imported = out.stdout.rsplit(' ', 1)
  assert imported.strip() == 'False'
  for name in ('jax', 'flax', 'torch', 'torchvision', 'grad-cam', 'python'):
    assert repr(name) in names


def test_bench_cam_methods_quick_writes_a_row_per_method(tmp_path):
  from benchmarks import bench_cam_methods

  bench_cam_methods.main(['--quick', '--arch=densenet_tiny', '--methods=gradcam,scorecam',
                          '--threads=1', f'--out_dir={tmp_path}'])
  payload = json.loads((tmp_path / 'bench_cam_methods_quick.json').read_text())
  rows = {r['method']: r for r in payload['rows']}
  assert list(rows) == ['gradcam', 'scorecam']
  for r in rows.values():
    assert r['errors'] is None, r['errors']
    assert r['torch_side'] == 'pytorch-grad-cam'
    assert r['jax_images_per_s'] > 0 and r['torch_images_per_s'] > 0
    assert r['paired_ratio_median'] is not None   # timed in lockstep
  # Score-CAM runs on --slow_batch images, one timed repeat; every repeat is in the results.
  assert (rows['gradcam']['batch'], rows['scorecam']['batch']) == (2, 1)
  assert {(r['method'], r['framework']): len(r['cam']['times_s'])
          for r in payload['results']} == {('gradcam', 'jax'): 2, ('gradcam', 'torch'): 2,
                                           ('scorecam', 'jax'): 1, ('scorecam', 'torch'): 1}
  assert abs(rows['gradcam']['forward_passes'] - 1) < 0.05
  # The tiny DenseNet's 9 channels at denseblock4 make one chunk of 32 masked forward passes
  # inside a loop (XLA's own cost analysis counts a loop's body once).
  assert 32 < rows['scorecam']['forward_passes'] < 34
  assert '| scorecam (batch 1) |' in payload['readme']


def test_bench_cam_methods_a_worker_past_its_timeout_is_a_failed_row(tmp_path):
  from benchmarks import bench_cam_methods

  # 2 s per worker: the drjax worker is still starting (importing, compiling) when it is killed.
  payload = bench_cam_methods.main(['--quick', '--arch=densenet_tiny', '--methods=gradcam',
                                    '--threads=1', '--timeout_s=2', f'--out_dir={tmp_path}'])
  (row,) = payload['rows']
  assert 'jax: timed out' in row['errors']['jax']
  assert row['jax_images_per_s'] is None and row['forward_passes'] is None
  assert '| gradcam | n/a | n/a | n/a | FAILED: jax: lockstep: jax: timed out' in payload['readme']
  # Where it was when it stalled: its Python stacks, dumped shortly before the timeout.
  (jax_result,) = [r for r in payload['results'] if r['framework'] == 'jax']
  assert 'File ' in jax_result['stall_traceback']
  assert (tmp_path / 'bench_cam_methods_quick.json').exists()
