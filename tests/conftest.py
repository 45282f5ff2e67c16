"""Test setup: several forced CPU devices, so that the sharded paths run on one machine."""

import atexit
import os
import shutil
import tempfile

# Must be set before jax is imported anywhere in the test session.
_FLAGS = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _FLAGS:
  os.environ['XLA_FLAGS'] = (_FLAGS + ' --xla_force_host_platform_device_count=4').strip()
# No test downloads anything: drjax.weights.resolve never tries torchvision's URLs
# (subprocesses inherit this).
os.environ['DRJAX_NO_DOWNLOAD'] = '1'
# The scripts keep compiled programs on disk (drjax.runtime.setup); in tests,
# in a folder of this session's own rather than the user's cache (subprocesses inherit it).
if 'DRJAX_COMPILATION_CACHE' not in os.environ:
  os.environ['DRJAX_COMPILATION_CACHE'] = tempfile.mkdtemp(prefix='drjax-test-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['DRJAX_COMPILATION_CACHE'], ignore_errors=True)

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from toy_model import TOY_SIZE, ToyNet  # noqa: E402

# A copy of IDRiD in its official layout ("A. Segmentation", "B. Disease Grading"), read-only.
IDRID_ENV_VAR = 'DRJAX_IDRID_DIR'


@pytest.fixture(scope='session')
def idrid_dir() -> pathlib.Path:
  """$DRJAX_IDRID_DIR, the IDRiD copy the real-data tests read (they skip without it)."""
  path = os.environ.get(IDRID_ENV_VAR)
  if not path or not pathlib.Path(path).is_dir():
    pytest.skip(f'no IDRiD copy: set {IDRID_ENV_VAR} to one')
  return pathlib.Path(path)


@pytest.fixture(scope='session')
def toy():
  """(ToyNet, its variables with non-trivial BatchNorm statistics, 3 images of TOY_SIZE)."""
  model = ToyNet()
  images = jax.random.normal(jax.random.PRNGKey(1), (3, TOY_SIZE, TOY_SIZE, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
  # Non-trivial BN statistics, so that the eval-mode BN is part of what is tested.
  stats = variables['batch_stats']['norm']
  variables = {
      'params': variables['params'],
      'batch_stats': {'norm': {'mean': stats['mean'] + 0.1, 'var': stats['var'] * 2.0}},
  }
  return model, variables, images
