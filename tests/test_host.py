"""drjax.host.keep_freed_memory: measured by what it is for, page faults on reuse."""

import os
import subprocess
import sys

import pytest

from drjax import host

# Allocates, touches and frees a 256 MiB buffer twice, and prints the minor page faults
# of the second round: with glibc's defaults the buffer is a fresh mmap each time and
# faults in all its 65536 pages again; with freed memory kept, it faults in none.
_PROBE = r'''
import ctypes, resource, sys
from drjax import host
applied = {apply}
if applied:
  applied = host.keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
for round_ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(ctypes.c_void_p(p))
print(applied, faults)
'''

glibc_only = pytest.mark.skipif(host._glibc() is None, reason='needs glibc')


def _probe(apply: bool, **env) -> tuple[str, int]:
  out = subprocess.run([sys.executable, '-c', _PROBE.format(apply=apply)],
                       env=dict(os.environ, **env), capture_output=True, text=True, check=True)
  applied, faults = out.stdout.split()
  return applied, int(faults)


@glibc_only
def test_keep_freed_memory_stops_refaulting_a_reused_buffer():
  applied, kept = _probe(True)
  _, default = _probe(False)
  assert applied == 'True'
  pages = (256 << 20) // os.sysconf('SC_PAGE_SIZE')
  assert default > pages // 2  # glibc default: the second buffer faults in again
  assert kept < pages // 20  # kept: the freed pages are reused


@glibc_only
def test_keep_freed_memory_can_be_switched_off():
  applied, faults = _probe(True, DRJAX_KEEP_FREED_MEMORY='0')
  assert applied == 'False'
  assert faults > (256 << 20) // os.sysconf('SC_PAGE_SIZE') // 2


@glibc_only
def test_keep_freed_memory_refuses_after_jax_started():
  code = ('import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready()\n'
          'from drjax import host; print(host.keep_freed_memory())')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == 'False'
  assert 'after jax started' in out.stderr


def test_host_imports_no_framework():
  code = 'import sys, drjax.host; print("jax" in sys.modules, "torch" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.split() == ['False', 'False']


def _devices_probe(code: str, **env) -> subprocess.CompletedProcess:
  environ = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  environ.update(env)
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        check=True, env=environ)


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='needs CPU affinity (Linux)')
def test_xla_cpu_threads_follows_the_cpu_affinity():
  """One thread when pinned to one core (as the benchmarks' `--threads 1` pins), and the
  cores' share of each CPU device when there are several."""
  first = min(os.sched_getaffinity(0))
  probe = ('import os; from drjax import host; a = host.xla_cpu_threads(); '
           f'os.sched_setaffinity(0, {{{first}}}); print(a, host.xla_cpu_threads())')
  cores = len(os.sched_getaffinity(0))
  assert _devices_probe(probe).stdout.split() == [str(cores), '1']
  # CPU devices share the cores: each device's program counts its share, at least one.
  for env in (dict(XLA_FLAGS='--xla_force_host_platform_device_count=2'),
              dict(JAX_NUM_CPU_DEVICES='2')):
    assert _devices_probe(probe, **env).stdout.split() == [str(max(1, cores // 2)), '1']
  out = _devices_probe('from drjax import host; host.one_cpu_device_per_core(); '
                       'print(host.xla_cpu_threads())')
  assert out.stdout.split() == ['1']


_DEVICES = ('from drjax import host; n = host.one_cpu_device_per_core(); import jax, os; '
            'print(n, jax.local_device_count(), len(os.sched_getaffinity(0)))')


@pytest.mark.skipif(not hasattr(os, 'sched_getaffinity'), reason='needs CPU affinity (Linux)')
def test_one_cpu_device_per_core():
  n, devices, cores = _devices_probe(_DEVICES).stdout.split()
  assert n == devices == cores
  # Pinned to one core: one device.
  first = min(os.sched_getaffinity(0))
  out = _devices_probe(f'import os; os.sched_setaffinity(0, {{{first}}}); {_DEVICES}')
  assert out.stdout.split() == ['1', '1', '1']


@pytest.mark.skipif(not hasattr(os, 'sched_getaffinity'), reason='needs CPU affinity (Linux)')
def test_one_cpu_device_per_core_leaves_an_explicit_count_alone():
  cores = str(len(os.sched_getaffinity(0)))
  out = _devices_probe(_DEVICES, XLA_FLAGS='--xla_force_host_platform_device_count=3')
  assert out.stdout.split() == ['0', '3', cores]
  out = _devices_probe(_DEVICES, JAX_NUM_CPU_DEVICES='5')
  assert out.stdout.split() == ['0', '5', cores]
  out = _devices_probe('import jax; jax.devices(); ' + _DEVICES)
  assert out.stdout.split() == ['0', '1', cores]
  assert 'after jax started' in out.stderr


# Compiles one small program after enable_compilation_cache() and prints the cache it
# got and how many programs were loaded from it (jax's own cache-hit event).
_CACHE_PROBE = r'''
import jax, jax.numpy as jnp
from drjax import host
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == '/jax/compilation_cache/cache_hits'
    else None)
where = host.enable_compilation_cache()
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(where, len(hits))
'''


def _cache_probe(**settings) -> tuple[str, int]:
  env = {k: v for k, v in os.environ.items() if k not in ('DRJAX_COMPILATION_CACHE',
                                                          'JAX_COMPILATION_CACHE_DIR')}
  env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', **settings)
  out = subprocess.run([sys.executable, '-c', _CACHE_PROBE], env=env, capture_output=True,
                       text=True, check=True)
  where, hits = out.stdout.split()
  return where, int(hits)


def test_compilation_cache_is_loaded_by_the_next_process(tmp_path):
  cache = tmp_path / 'cache'
  assert _cache_probe(DRJAX_COMPILATION_CACHE=str(cache)) == (str(cache), 0)
  stored = sorted(p.name for p in cache.iterdir() if p.name.endswith('-cache'))
  assert any(name.startswith('jit__lambda-') for name in stored), stored
  # Every program the first process stored (the lambda, and jnp.ones' own), the second
  # loads instead of compiling.
  assert _cache_probe(DRJAX_COMPILATION_CACHE=str(cache)) == (str(cache), len(stored))


def test_compilation_cache_is_bounded(tmp_path):
  # A cache smaller than one program keeps nothing: jax's LRU eviction is on.
  call = 'where = host.enable_compilation_cache()'
  probe = _CACHE_PROBE.replace(call, 'host.CACHE_MAX_BYTES = 100\n' + call)
  env = dict(os.environ, DRJAX_COMPILATION_CACHE=str(tmp_path / 'cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  out = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True,
                       check=True)
  assert out.stdout.split() == [str(tmp_path / 'cache'), '0']
  assert not [p for p in (tmp_path / 'cache').iterdir() if p.name.endswith('-cache')]


def test_compilation_cache_default_folder_is_per_processor(tmp_path):
  where, _ = _cache_probe(DRJAX_CACHE=str(tmp_path / 'drjax'))
  assert where == str(tmp_path / 'drjax' / 'xla' / host._processor_key())
  folder = tmp_path / 'drjax' / 'xla'
  assert [p.name for p in folder.iterdir()] == [host._processor_key()]
  assert len(host._processor_key()) == 12


def test_compilation_cache_can_be_switched_off(tmp_path):
  assert _cache_probe(DRJAX_COMPILATION_CACHE='0', DRJAX_CACHE=str(tmp_path / 'drjax')) == (
      'None', 0)
  assert not (tmp_path / 'drjax').exists()


def test_compilation_cache_leaves_a_jax_cache_alone(tmp_path):
  ours, theirs = tmp_path / 'ours', tmp_path / 'theirs'
  assert _cache_probe(DRJAX_COMPILATION_CACHE=str(ours),
                      JAX_COMPILATION_CACHE_DIR=str(theirs)) == (str(theirs), 0)
  assert not ours.exists() and any(theirs.iterdir())


def test_compilation_cache_in_an_impossible_folder_warns_and_compiles(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  env = dict(os.environ, DRJAX_COMPILATION_CACHE=str(blocker / 'cache'))
  out = subprocess.run([sys.executable, '-c', _CACHE_PROBE], env=env, capture_output=True,
                       text=True, check=True)
  assert out.stdout.split() == ['None', '0']
  assert 'cannot create' in out.stderr
