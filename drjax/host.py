"""Host-process settings that make XLA:CPU runs faster, and jax's compilation cache.

XLA:CPU allocates the buffers of a compiled program afresh on every call and frees them
when the call returns. With glibc's default malloc, every allocation above 32 MiB, and on
XLA's worker threads every allocation above 64 MiB, is a fresh `mmap` that is unmapped
again on `free`. So each step faults in, and the kernel zeroes, every page of every large
activation again. VGG16's forward pass at 224 px and batch 64 touches about 12 GB of new
pages per call: 2.98 million page faults, 9.5 s of kernel time in a 37 s step on one
core (benchmarks/README.md has the measurements).

`keep_freed_memory()` tells glibc to serve every allocation from one heap and to keep
freed memory in it, so the next step reuses pages that are already mapped: the same step
then has no page faults. The price is that the process keeps its high-water mark of host
memory until it exits.

It must run before jax starts its CPU client (the first jax computation or device
query), because XLA's threads take their malloc arena when they start. drjax's scripts
call it first thing (except `cam_study.py` with several CPU devices, where one heap was
slower; see `one_cpu_device_per_core`); a notebook or your own script calls it before
touching jax:

    from drjax import host
    host.keep_freed_memory()

Set `DRJAX_KEEP_FREED_MEMORY=0` to leave malloc alone. It does nothing on a system
without glibc (macOS, musl).

`enable_compilation_cache()` keeps compiled programs on disk (jax's persistent cache,
one folder per kind of processor), so that the next run of a script loads them instead of
compiling again; `DRJAX_COMPILATION_CACHE` moves it, `=0` turns it off.

This module imports neither jax nor torch (`one_cpu_device_per_core` and
`enable_compilation_cache` import jax when called), so the benchmarks can apply the same
setting to their PyTorch side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import pathlib
import platform
import re
import sys

ENV_VAR = 'DRJAX_KEEP_FREED_MEMORY'

# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Largest trim threshold glibc accepts (an int); the heap is never given back below it.
_NEVER_TRIM = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
  if not sys.platform.startswith('linux'):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return None
  # musl also has a mallopt, which ignores everything; only glibc has this symbol.
  if not hasattr(libc, 'gnu_get_libc_version'):
    return None
  return libc


def _jax_started() -> bool:
  """True if jax has already created its backends (and with them XLA's threads)."""
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a jax without this private helper
    return False


def keep_freed_memory() -> bool:
  """Makes glibc malloc keep and reuse freed memory (see the module docstring).

  Returns:
    True if the setting was applied; False if it was not (disabled by
    DRJAX_KEEP_FREED_MEMORY=0, no glibc, or called after jax started, which is logged as
    a warning because it would only half work).
  """
  if os.environ.get(ENV_VAR, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return False
  libc = _glibc()
  if libc is None:
    return False
  if _jax_started():
    logging.warning(
        'drjax.host.keep_freed_memory() was called after jax started its CPU client; '
        'XLA\'s threads keep their own malloc arenas, so it is not applied. Call it '
        'before the first jax computation.')
    return False
  # One arena: the main heap is the only one that can hold chunks above 64 MiB instead of
  # mapping each of them separately. No mmap: every chunk comes from that heap. Never
  # trim: freed memory stays mapped for the next step.
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
  if ok:
    logging.info('glibc malloc now keeps freed memory for reuse (drjax.host; set %s=0 to '
                 'turn this off).', ENV_VAR)
  else:
    logging.warning('drjax.host.keep_freed_memory(): glibc refused a mallopt setting.')
  return ok


CACHE_ENV_VAR = 'DRJAX_COMPILATION_CACHE'
# The cache drjax sets up keeps at most this much, dropping the least recently used
# programs first (jax's LRU eviction, which locks the folder with `filelock`). A
# DenseNet121 run's four programs take about 4 MB.
CACHE_MAX_BYTES = 2 << 30


def cache_root() -> pathlib.Path:
  """drjax's cache folder: `$DRJAX_CACHE`, else ~/.cache/drjax (converted weights, programs)."""
  return pathlib.Path(os.environ.get('DRJAX_CACHE') or
                      pathlib.Path.home() / '.cache' / 'drjax').expanduser()


def default_compilation_cache_dir() -> pathlib.Path:
  """`cache_root()`/xla/<this processor>.

  XLA:CPU compiles for the processor it runs on, and jax's cache key names the program,
  the versions and the flags but not the CPU's features, so each kind of processor gets
  its own folder (a home directory shared by machines of several kinds stays safe).
  """
  return cache_root() / 'xla' / _processor_key()


def _processor_key() -> str:
  """A short hash of the machine type, CPU model and CPU feature flags."""
  described = [platform.machine(), platform.processor()]
  try:
    with open('/proc/cpuinfo') as f:
      described += sorted({line.strip() for line in f
                           if line.startswith(('model name', 'flags', 'Features'))})
  except OSError:
    pass
  return hashlib.sha256('\n'.join(described).encode()).hexdigest()[:12]


def enable_compilation_cache() -> str | None:
  """Keeps jax's compiled programs on disk, so that the next run of them skips compiling.

  jax's persistent compilation cache, pointed at `$DRJAX_COMPILATION_CACHE`, else at
  `default_compilation_cache_dir()`. jax stores a program that took at least a second to
  compile; a later process that compiles the same program, with the same jax, flags and
  devices, loads it instead. DenseNet121 at 64 px on this project's 2-core CPU: `jax.jit`
  of `model.init` took 12.6 s cold and 3.0 s warm, the first forward call 4.3 s and 1.5 s.
  A damaged entry is reported by jax as a warning and compiled again.

  drjax's scripts call it first thing. It leaves a cache the user set up for jax
  (`JAX_COMPILATION_CACHE_DIR` or `jax_compilation_cache_dir`) alone, and
  `DRJAX_COMPILATION_CACHE=0` turns it off. It holds at most `CACHE_MAX_BYTES`, the
  least recently used programs going first. Programs compiled before the call are not
  stored.

  Returns:
    The cache directory in use, or None if there is none (turned off, or the directory
    could not be created, which is logged as a warning).
  """
  import jax  # only here: this module otherwise imports no framework

  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  value = os.environ.get(CACHE_ENV_VAR, '').strip()
  if value.lower() in ('0', 'false', 'no', 'off'):
    return None
  path = pathlib.Path(value).expanduser() if value else default_compilation_cache_dir()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    logging.warning('drjax.host.enable_compilation_cache(): cannot create %s (%s); '
                    'compiling without a persistent cache.', path, e)
    return None
  jax.config.update('jax_compilation_cache_dir', str(path))
  if jax.config.jax_compilation_cache_max_size == -1:  # jax's default: no limit
    jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)
  logging.info('Compiled programs are cached in %s (drjax.host; set %s=0 to turn this off).',
               path, CACHE_ENV_VAR)
  return str(path)


def _chosen_cpu_device_count() -> int | None:
  """The CPU device count the user chose for jax, or None if they chose none."""
  jax = sys.modules.get('jax')
  if jax is not None and jax.config.jax_num_cpu_devices >= 0:
    return jax.config.jax_num_cpu_devices
  if 'JAX_NUM_CPU_DEVICES' in os.environ:
    value = os.environ['JAX_NUM_CPU_DEVICES'].strip()
    return int(value) if value.isdigit() else 1
  found = re.findall(r'--xla_force_host_platform_device_count=(\d+)',
                     os.environ.get('XLA_FLAGS', ''))
  return int(found[-1]) if found else None


def one_cpu_device_per_core() -> int:
  """Makes jax's CPU backend one device per core, for batches split across them.

  XLA:CPU runs many small convolutions on one thread (DenseNet121's 128 -> 32 and its
  7x7-pixel 3x3s, the 7x7 stems; see benchmarks/README.md), so one program
  leaves the other cores idle for part of a forward pass. With a device per core
  (`jax_num_cpu_devices`, the cores of this process's affinity), a batch sharded over
  them on a `Mesh` runs as one program per device, side by side, sharing XLA's thread
  pool. Each device's program is traced for its share of the cores (`xla_cpu_threads`).
  Two cores, DenseNet121's forward at 224 px, batch split over two
  devices against one device with every core, paired calls in one process: 1.11x
  faster at batch 4 and 1.23x at batch 16, compiled in 5.0-5.2 s against 14.8-17.1 s;
  the CAM study's core and input gradients compiled and ran first in 25-26 s against
  43 s. `scripts/cam_study.py` calls it (`--noone_device_per_core` turns it off;
  `cam_study.compute_heatmaps` splits each batch over whatever devices there are).
  Training does not: a replicated optimizer state is updated once per device (VGG16's
  120M trainable parameters: a train step at batch 16 on two cores went from 2.7 to
  5.1 s). With `keep_freed_memory`'s one heap the devices' threads contend for its lock:
  DenseNet121's Grad-CAM on two cores ran 10-20% slower than with glibc's defaults
  (`DRJAX_KEEP_FREED_MEMORY=0`), and ResNet101's no faster once its Winograd kernels
  are computed once (`drjax.models.with_winograd_kernels`), so `scripts/cam_study.py`
  leaves malloc alone when the process has several CPU devices. (A heap per thread with freed
  memory kept made ResNet101 slower: its blocks above 64 MiB were mapped afresh every
  call; benchmarks/README.md.)

  Like `keep_freed_memory` it must run before jax starts its CPU client. It leaves an
  explicit choice alone (`--xla_force_host_platform_device_count` in XLA_FLAGS,
  `JAX_NUM_CPU_DEVICES` or `jax_num_cpu_devices`).

  Returns:
    The number of CPU devices asked for, or 0 if nothing was changed (a choice already
    made, or called after jax started, which is logged as a warning).
  """
  if _chosen_cpu_device_count() is not None:
    return 0
  if _jax_started():
    logging.warning('drjax.host.one_cpu_device_per_core() was called after jax started its '
                    'CPU client; its device count is fixed. Call it before the first jax '
                    'computation.')
    return 0
  import jax  # only here: this module otherwise imports no framework

  count = _cores()
  jax.config.update('jax_num_cpu_devices', count)
  return count


def _cores() -> int:
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def cpu_device_count() -> int:
  """How many CPU devices jax makes (or made) in this process, without starting it."""
  return max(1, _chosen_cpu_device_count() or 1)


def xla_cpu_threads() -> int:
  """How many threads XLA:CPU spreads one device's program over in this process.

  XLA's CPU client sizes its thread pool to the cores the process may run on (its CPU
  affinity, as `taskset` or `os.sched_setaffinity` set it); YNNPACK's dots use that
  pool whatever `--xla_cpu_multi_thread_eigen` says. A dot of [12544, 224] x [224, 128]
  took 8.7 ms on one core and 5.3 ms on two, with or without that flag. Several CPU
  devices (`one_cpu_device_per_core`) share the pool, running their programs side by
  side, so each counts the cores divided among them, at least one.
  """
  return max(1, _cores() // cpu_device_count())
