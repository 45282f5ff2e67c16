"""drjax.runtime: the scripts' process set-up (compilation cache) and their one-line user errors."""

import os
import subprocess
import sys

from drjax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one small program after enable_compilation_cache() and prints the cache it
# got and how many programs were loaded from it (jax's own cache-hit event).
_CACHE_PROBE = r'''
import jax, jax.numpy as jnp
from drjax import runtime
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == '/jax/compilation_cache/cache_hits'
    else None)
where = runtime.enable_compilation_cache()
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
  call = 'where = runtime.enable_compilation_cache()'
  probe = _CACHE_PROBE.replace(call, 'runtime.CACHE_MAX_BYTES = 100\n' + call)
  env = dict(os.environ, DRJAX_COMPILATION_CACHE=str(tmp_path / 'cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  out = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True,
                       check=True)
  assert out.stdout.split() == [str(tmp_path / 'cache'), '0']
  assert not [p for p in (tmp_path / 'cache').iterdir() if p.name.endswith('-cache')]


def test_compilation_cache_default_folder_is_per_processor(tmp_path):
  where, _ = _cache_probe(DRJAX_CACHE=str(tmp_path / 'drjax'))
  folder = tmp_path / 'drjax' / 'xla'
  assert where == str(runtime.default_compilation_cache_dir()).replace(
      str(runtime.cache_root()), str(tmp_path / 'drjax'))
  (key,) = [p.name for p in folder.iterdir()]
  assert where == str(folder / key) and len(key) == 12


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
  assert 'Cannot create the compilation cache' in out.stderr


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', name), *args],
                        capture_output=True, text=True, cwd=REPO)


def test_a_damaged_checkpoint_is_one_line_and_exit_status_1(tmp_path):
  damaged = tmp_path / 'densenet121-a639ec97.pth'
  damaged.write_bytes(b'PK\x03\x04 this is not a torch checkpoint')
  out = _script('convert_weights.py', '--arch=densenet121', f'--torch_checkpoint={damaged}',
                f'--output={tmp_path / "out"}')
  assert out.returncode == 1
  assert 'Traceback' not in out.stderr
  (line,) = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
  assert str(damaged) in line
  assert not (tmp_path / 'out').exists()


def test_a_folder_that_is_no_run_is_one_line_and_exit_status_1(tmp_path):
  out = _script('explain.py', f'--workdir={tmp_path}', f'--images={tmp_path}',
                f'--out={tmp_path / "out"}')
  assert out.returncode == 1
  assert 'Traceback' not in out.stderr
  assert f'error: {tmp_path} is not a drjax run: it has no config.json' in out.stderr
