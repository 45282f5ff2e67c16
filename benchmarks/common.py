"""Benchmark harness shared by benchmarks/bench_*.py: fair, isolated, recorded measurements.

Every measurement (one framework, one model, one batch size) runs in its own fresh Python
process, so that

  * both frameworks get the same CPU budget: the process is pinned to the first N cores
    (`os.sched_setaffinity`, what `taskset -c 0-(N-1)` does) before jax or torch is
    imported; XLA sizes its thread pools from that affinity, and torch gets
    `torch.set_num_threads(N)`. With N = 1 XLA's multi-threaded Eigen is also switched off
    (`--xla_cpu_multi_thread_eigen=false`);
  * with `--keep_freed_memory`, both sides start with `KEEP_FREED_MEMORY` in GLIBC_TUNABLES
    (glibc's malloc keeps freed memory for reuse instead of unmapping it);
  * the peak memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to that
    measurement alone, not to whatever ran before it;
  * XLA flags and caches from one measurement cannot leak into the next.

Timing: `warmup` untimed calls (the first one compiles, and its time is recorded
separately), then `repeats` timed calls; the figure is the median. Every result records
the machine and library versions and is written as JSON; `readme_rows` makes the README
table lines.

Lockstep (the default when both frameworks are measured, `--no-interleave` turns it off):
the drjax and the PyTorch process of one comparison are started one after the other
(each compiles and warms up with its cores to itself), and then take turns, one timed
repeat at a time, in the order A B B A A B ..., the idle one blocked on its stdin. On
these shared machines the speed of a core drifts by 25-45% over tens of seconds, so two
measurements taken one after the other compare two moments of the machine as much as two
frameworks; taking turns gives both the same moments. `run_lockstep` is the parent's side,
`time_calls` the worker's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import queue
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # runnable from a checkout without installing drjax

RESULTS_DIR = os.path.join(REPO, 'benchmarks', 'results')

# A worker's last stdout line: its result as JSON (`emit`).
_RESULT = 'BENCH_RESULT'
# Lockstep protocol lines (worker -> parent); the parent answers `go` or `done`.
_READY = 'BENCH_READY'
_TIMED = 'BENCH_TIMED'
# Set by prepare_process: this worker's timed repeats are paced by the parent.
_lockstep = False


# ------------------------------------------------------------------- inside a worker


def limit_threads(threads: int | None) -> dict:
  """Pins this process to `threads` cores and sets every thread-count knob we know of.

  Must run before jax/torch are imported. Returns what was applied.
  """
  applied = {}
  for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    if threads:
      os.environ[var] = str(threads)
  flags = os.environ.get('XLA_FLAGS', '')
  # The test suite's forced host devices must not split the CPU in a benchmark.
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', flags)
  if threads == 1:
    flags += ' --xla_cpu_multi_thread_eigen=false'
  os.environ['XLA_FLAGS'] = flags.strip()
  applied['XLA_FLAGS'] = os.environ['XLA_FLAGS']
  if threads and hasattr(os, 'sched_setaffinity'):
    available = sorted(os.sched_getaffinity(0))
    if threads > len(available):
      raise ValueError(f'{threads} threads requested, only {len(available)} cores available')
    os.sched_setaffinity(0, available[:threads])
  if hasattr(os, 'sched_getaffinity'):
    applied['cpu_affinity'] = sorted(os.sched_getaffinity(0))
  applied['threads'] = threads
  return applied


# glibc's malloc with one arena, nothing mapped apart and nothing given back: a step's large
# buffers are reused instead of mapped (and zeroed by the kernel) afresh on every call.
KEEP_FREED_MEMORY = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                     'glibc.malloc.trim_threshold=2147483647')


def prepare_process(spec: dict) -> dict:
  """A worker's process settings, before jax or torch is imported; returns what was applied.

  The thread limits of `limit_threads`; the allocator settings were given to the process
  when it started (`_worker_command`), and are recorded here.
  """
  global _lockstep
  _lockstep = bool(spec.get('lockstep'))
  applied = limit_threads(spec['threads'])
  applied['glibc_tunables'] = os.environ.get('GLIBC_TUNABLES', '')
  return applied


def limit_torch_threads(threads: int | None) -> None:
  import torch

  if threads:
    torch.set_num_threads(threads)
    try:
      torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
      pass


def current_rss_mib() -> float:
  """Resident set size now (Linux /proc), MiB."""
  try:
    with open('/proc/self/statm') as f:
      pages = int(f.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE') / 2**20
  except (OSError, ValueError):
    return float('nan')


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
  scale = 1 if sys.platform == 'darwin' else 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def time_calls(fn: Callable[[], object], warmup: int, repeats: int,
               calls_per_repeat: int = 1, label: str = 'step') -> dict:
  """Times a blocking callable.

  Args:
    fn: runs one step and returns only when its results are computed (block_until_ready /
      cuda synchronize inside).
    warmup: untimed calls first (>= 1: the first call compiles).
    repeats: timed repeats (in lockstep, the parent decides how many).
    calls_per_repeat: calls per timed repeat (for steps far below a millisecond).
    label: what is timed; in lockstep both workers must time the same labels in the
      same order.

  Returns:
    dict(first_call_s, times_s [repeats] per call, median_s, min_s).
  """
  return time_calls_together({label: fn}, warmup, repeats, label, calls_per_repeat)[label]


def time_calls_together(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                        label: str, calls_per_repeat: int = 1) -> dict[str, dict]:
  """Times several blocking callables in the same repeats, so that their ratios pair up.

  Arguments as `time_calls`. Each callable is warmed up in turn; then every repeat times
  each of them, so that repeat i of each ran at the same moment of the machine: in the
  given order on repeats 0 and 1, reversed on 2 and 3, and so on. In lockstep, a repeat
  (all of them) is one turn of the worker, and the turns alternate which worker goes
  first (`run_lockstep`). Flipping the order every other repeat keeps the two cycles
  apart, so each callable is the first one after the other worker's turn (caches and
  the thread pool cold) as often as any other. Flipped on every repeat, the same
  callable was always that one: in bench_gradcam the drjax worker's Grad-CAM and the
  PyTorch worker's forward pass.

  Returns:
    {name: dict(first_call_s, times_s, median_s, min_s)}, as `time_calls` per callable.
  """
  firsts = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    fn()
    firsts[name] = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
      fn()
  times = {name: [] for name in fns}
  items = list(fns.items())

  def one_repeat():
    for name, fn in items if len(times[items[0][0]]) // 2 % 2 == 0 else reversed(items):
      times[name].append(_time_repeat(fn, calls_per_repeat))

  if _lockstep:
    _lockstep_repeats(one_repeat, label)
  else:
    for _ in range(repeats):
      one_repeat()
  return {name: dict(first_call_s=firsts[name], times_s=t, median_s=statistics.median(t),
                     min_s=min(t)) for name, t in times.items()}


def _time_repeat(fn: Callable[[], object], calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return (time.perf_counter() - start) / calls


def _lockstep_repeats(one_repeat: Callable[[], object], label: str) -> None:
  """Runs one repeat each time the parent writes `go`, until it writes `done`."""
  print(f'{_READY} {label}', flush=True)
  done = 0
  for line in sys.stdin:
    command = line.strip()
    if command == 'done':
      if not done:
        raise RuntimeError(f'lockstep: no repeat of {label!r} was asked for')
      return
    if command != 'go':
      raise RuntimeError(f'lockstep: unexpected command {command!r}')
    seconds = _time_repeat(one_repeat, 1)
    done += 1
    print(f'{_TIMED} {seconds!r}', flush=True)
  raise RuntimeError('lockstep: the parent closed stdin')


_VERSIONED = ('numpy', 'jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision', 'grad-cam')


def versions() -> dict:
  """Versions of everything that can change a number, from the installed packages' metadata.

  Nothing is imported: a drjax worker that imported torch to ask would pay seconds of
  start-up (and the reverse), and each worker records the other side's versions too.
  """
  out = {'python': platform.python_version()}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def machine() -> dict:
  """CPU model, core counts, OS; and the GPU if torch or jax sees one."""
  info = {'platform': platform.platform(), 'machine': platform.machine(),
          'cpu_count': os.cpu_count()}
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    info['cpu_model'] = names[0] if names else platform.processor()
  except OSError:
    info['cpu_model'] = platform.processor()
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                          '--format=csv,noheader'], capture_output=True, text=True,
                         timeout=20, check=False)
    if out.returncode == 0 and out.stdout.strip():
      info['gpu'] = out.stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    pass
  return info


def emit(result: dict) -> None:
  """A worker's last stdout line: its result as JSON (the parent parses it)."""
  print(f'{_RESULT} {json.dumps(result)}', flush=True)


# ------------------------------------------------------------------- the parent side


def _worker_command(script: str, spec: dict) -> tuple[list[str], dict]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH', '')) if p)
  if spec.get('keep_freed_memory'):
    env['GLIBC_TUNABLES'] = KEEP_FREED_MEMORY  # read by glibc when the process starts
  return [sys.executable, script, '--worker', json.dumps(spec)], env


def run_worker(script: str, spec: dict, timeout_s: float = 1800) -> dict:
  """Runs `script --worker SPEC_JSON` in a fresh process and returns its result dict.

  A crash or timeout becomes a result with `error` set, so one failing measurement does
  not stop a benchmark.
  """
  cmd, env = _worker_command(script, spec)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          check=False)
  except subprocess.TimeoutExpired:
    return dict(spec, error=f'timed out after {timeout_s} s')
  for line in reversed(proc.stdout.splitlines()):
    kind, _, value = line.partition(' ')
    if kind == _RESULT:
      return json.loads(value)
  tail = '\n'.join((proc.stdout + proc.stderr).splitlines()[-15:])
  return dict(spec, error=f'exit code {proc.returncode}: {tail}')


class _WorkerError(Exception):
  pass


class _LockstepWorker:
  """A worker process driven over its stdin and stdout (see `run_lockstep`)."""

  def __init__(self, script: str, spec: dict):
    self.name = spec.get('framework', '?')
    cmd, env = _worker_command(script, dict(spec, lockstep=True))
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._stderr, text=True, env=env)
    self._lines = queue.Queue()
    self._stdout_tail = []
    threading.Thread(target=self._read_stdout, daemon=True).start()

  def _read_stdout(self):
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put(None)

  def send(self, command: str) -> None:
    try:
      self.proc.stdin.write(command + '\n')
      self.proc.stdin.flush()
    except OSError as e:  # the worker has exited; next_event reports why
      self._stdout_tail.append(f'(writing {command!r}: {e})')

  def next_event(self, deadline: float) -> tuple[str, object]:
    """('ready', label), ('timed', seconds) or ('result', dict), the worker's next message."""
    while True:
      try:
        line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        raise _WorkerError(f'{self.name}: timed out') from None
      if line is None:
        raise _WorkerError(f'{self.name}: exit code {self.proc.wait()}: {self._tail()}')
      kind, _, value = line.rstrip('\n').partition(' ')
      if kind == _READY:
        return 'ready', value
      if kind == _TIMED:
        return 'timed', float(value)
      if kind == _RESULT:
        return 'result', json.loads(value)
      self._stdout_tail = (self._stdout_tail + [line.rstrip()])[-15:]

  def expect(self, kind: str, deadline: float) -> object:
    got, value = self.next_event(deadline)
    if got != kind:
      raise _WorkerError(f'{self.name}: expected {kind}, got {got} {value!r}')
    return value

  def _tail(self) -> str:
    self._stderr.seek(0)
    return '\n'.join((self._stdout_tail + self._stderr.read().splitlines())[-15:])

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    self._stderr.close()


# Pause before each lockstep turn (`run_lockstep`).
LOCKSTEP_SETTLE_S = 0.5


def run_lockstep(script: str, specs: Sequence[dict], timeout_s: float = 1800) -> list[dict]:
  """Runs the workers of `specs` side by side, taking turns at every timed repeat.

  On a CPU the workers start one after another, each when the one before it has
  finished its warm-up, so that no compilation shares a core with another process; on a
  GPU (`spec['device'] == 'gpu'`: the host has cores to spare, and warm-up is not timed)
  they start together. Then, for each
  `time_calls` label (the workers must time the same labels in the same order), the
  parent asks for `repeats` timed repeats (`specs[0]['repeats']`), alternating the order
  A B, B A, A B, ...; the worker that is not timing waits on its stdin. Each turn starts
  `LOCKSTEP_SETTLE_S` after the one before it ended, so that the other worker's threads
  have gone idle: PyTorch's OpenMP threads spin-wait after a parallel region. On a GPU there
  is no pause: the work is on the card, and each turn ends synchronised. After a label
  each worker in turn is let go on to its next phase. Returns the workers' results, in
  the order of `specs`; if any worker fails or times out (`timeout_s` per spec), every
  result is an error naming it, since a half-measured pair is no comparison.
  """
  deadline = time.monotonic() + timeout_s * len(specs)
  on_gpu = specs[0].get('device') == 'gpu'
  settle_s = 0.0 if on_gpu else LOCKSTEP_SETTLE_S
  workers = []
  try:
    if on_gpu:
      workers = [_LockstepWorker(script, spec) for spec in specs]
      events = [worker.next_event(deadline) for worker in workers]
    else:
      events = []
      for spec in specs:
        workers.append(_LockstepWorker(script, spec))
        events.append(workers[-1].next_event(deadline))
    while all(kind == 'ready' for kind, _ in events):
      labels = [label for _, label in events]
      if len(set(labels)) != 1:
        raise _WorkerError(f'workers out of step: they time {labels}')
      for i in range(specs[0]['repeats']):
        for worker in (workers if i % 2 == 0 else workers[::-1]):
          time.sleep(settle_s)
          worker.send('go')
          worker.expect('timed', deadline)
      for k, worker in enumerate(workers):
        worker.send('done')
        events[k] = worker.next_event(deadline)
    if not all(kind == 'result' for kind, _ in events):
      raise _WorkerError(f'workers out of step: {[value for _, value in events]}')
    return [value for _, value in events]
  except _WorkerError as e:
    return [dict(spec, error=f'lockstep: {e}') for spec in specs]
  finally:
    for worker in workers:
      worker.close()


def in_lockstep(specs: Sequence[dict], interleave: bool) -> bool:
  return interleave and len(specs) > 1


def run_workers(script: str, specs: Sequence[dict], interleave: bool,
                timeout_s: float = 1800) -> list[dict]:
  """`run_lockstep` for two or more specs when `interleave`, else `run_worker` for each."""
  if in_lockstep(specs, interleave):
    return run_lockstep(script, specs, timeout_s)
  return [run_worker(script, spec, timeout_s) for spec in specs]


def print_result(result: dict, describe: Callable[[dict], str]) -> None:
  """One progress line per worker result: its error, or `describe(result)`."""
  if 'error' in result:
    print(f"  {result['framework']} ERROR: {result['error']}", flush=True)
  else:
    print(f"  {result['framework']}: {describe(result)}", flush=True)


def paired_speedups(ours: dict, theirs: dict, timing: str | None = None) -> list[float] | None:
  """Per-repeat speed-ups (their time / ours) of two results timed in lockstep, sorted.

  Repeat i of each side ran next to the other's repeat i, so each ratio compares the two
  at the same moment of the machine. `timing` names a sub-timing of the results (e.g.
  bench_gradcam's 'gradcam'); None: the results' own `times_s`. None unless both were
  timed in lockstep.
  """
  if not (ours.get('lockstep') and theirs.get('lockstep')):
    return None
  if timing is not None:
    ours, theirs = ours.get(timing, {}), theirs.get(timing, {})
  a, b = ours.get('times_s') or [], theirs.get('times_s') or []
  if not a or len(a) != len(b):
    return None
  return sorted(y / x for x, y in zip(a, b, strict=True))


def paired_summary(speedups: list[float] | None) -> dict:
  if not speedups:
    return dict(paired_ratio_median=None, paired_ratio_min=None, paired_ratio_max=None)
  return dict(paired_ratio_median=statistics.median(speedups), paired_ratio_min=speedups[0],
              paired_ratio_max=speedups[-1])


def pair_rows(results: Sequence[dict], ours: str = 'jax', theirs: str = 'torch') -> list[dict]:
  """Joins jax and torch results of the same (model, batch, precision) into ratio rows."""
  keyed = {}
  for r in results:
    key = (r['model'], r['batch_size'], r.get('precision', 'fp32'))
    keyed.setdefault(key, {})[r['framework']] = r
  rows = []
  for (model, batch, precision), pair in keyed.items():
    a, b = pair.get(ours, {}), pair.get(theirs, {})

    ips_a, ips_b = a.get('images_per_s'), b.get('images_per_s')
    rows.append(dict(
        model=model, batch_size=batch, precision=precision,
        jax_images_per_s=ips_a, torch_images_per_s=ips_b,
        ratio=(ips_a / ips_b) if ips_a and ips_b else None,
        **paired_summary(paired_speedups(a, b)),
        jax_peak_rss_mib=a.get('peak_rss_mib'), torch_peak_rss_mib=b.get('peak_rss_mib'),
        jax_peak_device_mib=a.get('peak_device_mib'),
        torch_peak_device_mib=b.get('peak_device_mib'),
        jax_first_call_s=a.get('first_call_s'),
        jax_compiled_working_set_mib=(a.get('compiled_memory') or {}).get('working_set_mib'),
        jax_compiled_alias_mib=(a.get('compiled_memory') or {}).get('alias_mib'),
        # Fairness check: both sides must train the same parameters.
        same_trainable=(a.get('trainable_scalars') == b.get('trainable_scalars')
                        if 'trainable_scalars' in a and 'trainable_scalars' in b else None),
        errors={k: v['error'] for k, v in pair.items() if 'error' in v} or None))
  return rows


def _f(x, spec: str) -> str:
  return 'n/a' if x is None else format(x, spec)


def images_per_s_text(x: float | None) -> str:
  """Three significant figures, never in exponent form: 10.2, 779, 2040."""
  if x is None:
    return 'n/a'
  return f'{float(f"{x:.3g}"):.0f}' if abs(x) >= 1000 else f'{x:.3g}'


def paired_text(summary: dict) -> str:
  """'1.31x (1.21-1.42)' from `paired_summary`'s fields; 'n/a' if not in lockstep."""
  if summary.get('paired_ratio_median') is None:
    return 'n/a'
  return (f"{summary['paired_ratio_median']:.2f}x ({summary['paired_ratio_min']:.2f}-"
          f"{summary['paired_ratio_max']:.2f})")


def readme_rows(what: str, rows: Sequence[dict], threads: int | None, device: str,
                keep_freed_memory: bool = False) -> str:
  """Markdown table lines for the README, one per (model, batch)."""
  lines = ['| benchmark | model | batch | precision | device (threads) | drjax img/s | '
           'PyTorch img/s | ratio | per lockstep pair: median (range) | '
           'peak RSS MiB (drjax / PyTorch) |',
           '|---|---|---|---|---|---|---|---|---|---|']
  where = f'{device} ({threads})' if threads else device
  if keep_freed_memory:
    where += ', freed memory kept'
  # drjax's compiled step's own memory (workloads.compiled_memory), where it was recorded.
  compiled = any(r.get('jax_compiled_working_set_mib') is not None for r in rows)
  if compiled:
    lines[0] += ' drjax compiled MiB: working set (donated) |'
    lines[1] += '---|'
  for r in rows:
    mem = f"{_f(r['jax_peak_rss_mib'], '.0f')} / {_f(r['torch_peak_rss_mib'], '.0f')}"
    if r.get('jax_peak_device_mib') or r.get('torch_peak_device_mib'):
      mem += (f" (device {_f(r['jax_peak_device_mib'], '.0f')} / "
              f"{_f(r['torch_peak_device_mib'], '.0f')})")
    lines.append(f"| {what} | {r['model']} | {r['batch_size']} | {r['precision']} | {where} | "
                 f"{images_per_s_text(r['jax_images_per_s'])} | "
                 f"{images_per_s_text(r['torch_images_per_s'])} | "
                 f"{_f(r['ratio'], '.2f')}{'' if r['ratio'] is None else 'x'} | "
                 f"{paired_text(r)} | {mem} |"
                 + (f" {_f(r.get('jax_compiled_working_set_mib'), '.0f')} "
                    f"({_f(r.get('jax_compiled_alias_mib'), '.0f')}) |" if compiled else '')
                 + (' NOT THE SAME TRAINABLE PARAMETERS |' if r.get('same_trainable') is False
                    else ''))
  return '\n'.join(lines)


def write_json(name: str, payload: dict, out_dir: str | None = None) -> str:
  out_dir = out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'{name}.json')
  with open(path, 'w') as f:
    json.dump(payload, f, indent=2)
  return path


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--models', default='densenet121,resnet101,vgg16',
                      help='comma-separated drjax/torchvision model names')
  parser.add_argument('--batch_sizes', default='16,64')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--threads', type=int, default=None,
                      help='cores for each side (default: all this process may use; CPU only)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  add_device_flags(parser)
  parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                      help='bf16: drjax bfloat16 compute with float32 master weights vs '
                           'PyTorch autocast(bfloat16) (AMP)')
  parser.add_argument('--frameworks', default='jax,torch')
  add_keep_freed_memory_flag(parser)
  add_cpu_conv_flag(parser)
  add_interleave_flag(parser)
  parser.add_argument('--quick', action='store_true',
                      help='densenet121, batch 16, 2 warm-up + 3 timed steps (1-2 min)')
  parser.add_argument('--out_dir', default=None, help=f'JSON results (default {RESULTS_DIR})')
  parser.add_argument('--timeout_s', type=float, default=1800, help='per measurement')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)


def add_device_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--calls_per_repeat', type=int, default=None,
                      help='calls per timed repeat (default 1 on CPU, 10 on GPU)')


def calls_per_repeat(args) -> int:
  """--calls_per_repeat, else 1 on a CPU and 10 on a GPU, where a call takes milliseconds."""
  return args.calls_per_repeat or (10 if args.device == 'gpu' else 1)


def add_keep_freed_memory_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--keep_freed_memory', action='store_true',
                      help='both sides start with GLIBC_TUNABLES=KEEP_FREED_MEMORY: glibc '
                           'malloc keeps freed memory instead of unmapping it')


def add_cpu_conv_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--cpu_conv', action='store_true',
                      help='drjax: the opt-in XLA:CPU convolutions (drjax.kernels.cpu_conv)')


def add_interleave_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--interleave', action=argparse.BooleanOptionalAction, default=True,
                      help='time the frameworks in lockstep, taking turns at every repeat '
                           '(run_lockstep); --no-interleave: one after the other')


def default_threads(args) -> int | None:
  """--threads, else every core this process may use; None (no limit) on a GPU."""
  if getattr(args, 'device', 'cpu') == 'gpu':
    return None
  if args.threads:
    return args.threads
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count()


def run_benchmark(script: str, name: str, what: str, args) -> dict:
  """The parent loop of bench_train/bench_eval: one worker per measurement, then report."""
  if args.quick:
    args.models, args.batch_sizes, args.warmup, args.repeats = 'densenet121', '16', 2, 3
  threads = default_threads(args)
  # Resolved here, once, so that the torch worker need not import configs/ (and with it jax).
  from benchmarks import workloads
  freezing = {m: workloads.trainable_patterns(m) for m in args.models.split(',')}
  specs = [dict(framework=fw, model=m, batch_size=int(b), image_size=args.image_size,
                trainable=freezing[m][0], frozen_bn_inference=freezing[m][1],
                trainable_source=freezing[m][2],
                threads=threads, warmup=args.warmup, repeats=args.repeats,
                keep_freed_memory=args.keep_freed_memory, device=args.device,
                precision=args.precision, cpu_conv=args.cpu_conv,
                channels_last=getattr(args, 'torch_channels_last', False),
                calls_per_repeat=calls_per_repeat(args))
           for m in args.models.split(',') for b in args.batch_sizes.split(',')
           for fw in args.frameworks.split(',')]
  groups = {}  # the frameworks of one (model, batch): one comparison
  for spec in specs:
    groups.setdefault((spec['model'], spec['batch_size']), []).append(spec)
  results = []
  for (model, batch), group in groups.items():
    print(f"[{name}] {' vs '.join(s['framework'] for s in group)}: {model} batch {batch} "
          f"{args.precision} on {args.device} ({threads or 'all'} threads"
          f"{', in lockstep' if in_lockstep(group, args.interleave) else ''}) ...", flush=True)
    for r in run_workers(script, group, args.interleave, args.timeout_s):
      results.append(r)
      print_result(r, lambda r: f"{r['images_per_s']:.1f} images/s (median of "
                                f"{len(r['times_s'])}, first call {r['first_call_s']:.1f} s, "
                                f"peak RSS {r['peak_rss_mib']:.0f} MiB)")
  rows = pair_rows(results)
  table = readme_rows(what + (' (cpu_conv)' if args.cpu_conv else ''), rows, threads,
                      args.device, args.keep_freed_memory)
  payload = dict(benchmark=name, description=what, threads=threads, machine=machine(),
                 versions=versions(), args=vars(args), rows=rows, results=results,
                 readme=table, time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  suffix = ('_quick' if args.quick else '') + ('' if args.device == 'cpu' else '_gpu') + \
      ('' if args.precision == 'fp32' else f'_{args.precision}') + \
      ('_keep_freed_memory' if args.keep_freed_memory else '') + \
      ('_cpu_conv' if args.cpu_conv else '')
  path = write_json(name + suffix, payload, args.out_dir)
  print(table)
  print(f'results: {path}')
  return payload


# ------------------------------------------------------------------- data stand-ins


def eyepacs_standin(root: str, num_images: int, stored_size: int = 512,
                    unique_images: int = 64, build_workers: int | None = None) -> dict:
  """An EyePACS-sized stand-in, built by drjax's own eyepacs builder; returns its `input` fields.

  `unique_images` synthetic photographs (drjax.data.synthetic, rendered at `stored_size`)
  are saved as JPEG files named and graded like Kaggle's (`10_left`, EyePACS grade
  proportions), repeated up to `num_images` files, and built exactly as
  `scripts/prepare_data.py --dataset eyepacs --image_size STORED_SIZE` builds the real set
  (field-of-view crop, JPEG in ArrayRecord). Built once per (num_images, unique_images,
  stored_size) under `root`.

  Returns:
    dict(dataset, data_dir, manual_dir, stored_size) to `update` a pipeline config with.
  """
  import numpy as np
  from PIL import Image

  from drjax.data import builders, synthetic

  name = f'eyepacs_standin_s{stored_size}_n{num_images}_u{unique_images}'
  fields = dict(dataset='eyepacs', data_dir=os.path.join(root, name, 'tfds'),
                manual_dir=os.path.join(root, name, 'manual'), stored_size=stored_size)
  if builders.make_builder('eyepacs', fields['data_dir'], image_size=stored_size).is_prepared():
    return fields
  train = os.path.join(fields['manual_dir'], 'train')
  os.makedirs(train, exist_ok=True)
  photos = []
  for k in range(min(unique_images, num_images)):
    path = os.path.join(fields['manual_dir'], f'photo{k}.jpeg')
    if not os.path.exists(path):
      image = synthetic.generate_example(k, k % 5, image_size=stored_size)['image']
      Image.fromarray(image).save(path, quality=95)
    photos.append(path)
  grades = np.random.default_rng(0).choice(5, size=num_images, p=synthetic.EYEPACS_PRIOR)
  rows = ['image,level']
  for i, grade in enumerate(grades):
    image_name = f"{i // 2 + 1}_{'left' if i % 2 == 0 else 'right'}"
    path = os.path.join(train, image_name + '.jpeg')
    if not os.path.exists(path):
      os.link(photos[i % len(photos)], path)  # same bytes, one inode: no disk per copy
    rows.append(f'{image_name},{grade}')
  with open(os.path.join(fields['manual_dir'], 'trainLabels.csv'), 'w') as f:
    f.write('\n'.join(rows) + '\n')
  builders.prepare('eyepacs', data_dir=fields['data_dir'], manual_dir=fields['manual_dir'],
                   num_workers=build_workers, image_size=stored_size)
  return fields
