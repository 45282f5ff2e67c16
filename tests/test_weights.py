"""Tests for drjax.weights and scripts/convert_weights.py, on a tiny torchvision DenseNet.

The forward-pass parity of converted weights is in test_models.py; here:
strictness, file handling, the convert/load round trip and resolve's lookup order.
"""

import hashlib
import logging
import os
import pathlib
import re
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from drjax import models, weights

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
torch.set_num_threads(2)

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCH = 'densenet_tiny'
# The registry's densenet_tiny, built by torchvision's own class.
TINY_KWARGS = dict(growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8, bn_size=2)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
  """Never download, never touch the real ~/.cache."""
  monkeypatch.setenv('DRJAX_NO_DOWNLOAD', '1')
  monkeypatch.setenv('DRJAX_CACHE', str(tmp_path / 'drjax_cache'))
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))


@pytest.fixture(scope='module')
def torch_state():
  """state_dict (torch tensors) of a randomly initialised tiny DenseNet, 1000 classes."""
  torch.manual_seed(0)
  model = torchvision.models.DenseNet(num_classes=1000, **TINY_KWARGS)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
  return model.state_dict()


@pytest.fixture
def pth_file(tmp_path, torch_state):
  path = tmp_path / 'tiny.pth'
  torch.save(torch_state, path)
  return path


# --------------------------------------------------------------------------
# Conversion.


def test_conversion_layouts_and_head(torch_state, caplog):
  full = weights.from_torchvision(ARCH, torch_state, num_classes=1000)
  assert set(full) == {'params', 'batch_stats'}
  params, stats = full['params'], full['batch_stats']
  np.testing.assert_array_equal(params['features']['conv0']['kernel'],
                                torch_state['features.conv0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['classifier']['kernel'],
                                torch_state['classifier.weight'].numpy().T)
  layer = 'features.denseblock2.denselayer2.norm1'
  np.testing.assert_array_equal(
      stats['features']['denseblock2']['denselayer2']['norm1']['var'],
      torch_state[layer + '.running_var'].numpy())
  np.testing.assert_array_equal(params['features']['denseblock2']['denselayer2']['norm1']['scale'],
                                torch_state[layer + '.weight'].numpy())
  # Same structure as the model's own init.
  model = models.get_model(ARCH, num_classes=1000)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3))))
  chex.assert_trees_all_equal_shapes(full, template)

  with caplog.at_level(logging.INFO, logger='drjax.weights'):
    headless = weights.from_torchvision(ARCH, torch_state, num_classes=5)
  assert 'classifier' not in headless['params']
  assert 'skipped the checkpoint head classifier' in caplog.text


def test_old_densenet_names_numpy_and_module_prefix(torch_state):
  reference = weights.from_torchvision(ARCH, torch_state, num_classes=1000)
  # torchvision's published DenseNet files use 'norm.1', 'conv.2', ...
  old = {re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', k): v.numpy()
         for k, v in torch_state.items()}
  assert 'features.denseblock1.denselayer1.norm.1.weight' in old
  chex.assert_trees_all_equal(weights.from_torchvision(ARCH, old, num_classes=1000), reference)
  wrapped = {'module.' + k: v for k, v in torch_state.items()}  # nn.DataParallel
  chex.assert_trees_all_equal(weights.from_torchvision(ARCH, wrapped, num_classes=1000),
                              reference)


def test_wrong_architecture(torch_state):
  with pytest.raises(weights.WeightsError) as e:
    weights.from_torchvision('resnet_tiny', torch_state)
  message = str(e.value)
  assert 'does not match resnet_tiny' in message
  assert 'it looks like a DenseNet checkpoint' in message
  assert 'missing keys: bn1.bias, bn1.running_mean' in message
  assert 'unexpected keys: ' in message and 'features.conv0.weight' in message


def test_missing_extra_and_mismatched_keys(torch_state):
  state = dict(torch_state)
  del state['features.norm5.running_var']
  with pytest.raises(weights.WeightsError, match=r'missing keys: features\.norm5\.running_var'):
    weights.from_torchvision(ARCH, state)

  state = dict(torch_state, **{'features.extra.weight': torch.zeros(3)})
  with pytest.raises(weights.WeightsError, match=r'unexpected keys: features\.extra\.weight'):
    weights.from_torchvision(ARCH, state)

  state = dict(torch_state, **{'features.conv0.weight': torch.zeros(8, 3, 5, 5)})
  with pytest.raises(weights.WeightsError,
                     match=r'shape mismatches: features\.conv0\.weight: checkpoint '
                           r'\(8, 3, 5, 5\), densenet_tiny expects \(8, 3, 7, 7\)'):
    weights.from_torchvision(ARCH, state)

  wider = torchvision.models.DenseNet(num_classes=1000, **dict(TINY_KWARGS, growth_rate=6))
  with pytest.raises(weights.WeightsError, match=r'shape mismatches: .*\(65 in all\)'):
    weights.from_torchvision(ARCH, wider.state_dict())

  with pytest.raises(weights.WeightsError, match='Expected a state_dict'):
    weights.from_torchvision(ARCH, [1, 2, 3])


# --------------------------------------------------------------------------
# Files.


def test_read_state_dict_formats(tmp_path, pth_file, torch_state):
  reference = {k: v.numpy() for k, v in torch_state.items()}
  chex.assert_trees_all_equal(weights.read_state_dict(pth_file), reference)

  wrapped = tmp_path / 'trainer.pth'  # a training checkpoint holding the state_dict
  torch.save({'state_dict': torch_state, 'epoch': 3}, wrapped)
  chex.assert_trees_all_equal(weights.read_state_dict(wrapped), reference)

  from safetensors.numpy import save_file
  safetensors_file = tmp_path / 'tiny.safetensors'
  save_file({k: np.ascontiguousarray(v) for k, v in reference.items()}, str(safetensors_file))
  chex.assert_trees_all_equal(weights.read_state_dict(safetensors_file), reference)

  with pytest.raises(FileNotFoundError):
    weights.read_state_dict(tmp_path / 'absent.pth')


@pytest.mark.parametrize('kind', ['truncated_pth', 'text_pth', 'list_pth', 'truncated_safetensors'])
def test_read_state_dict_bad_files(tmp_path, pth_file, kind):
  path = tmp_path / ('bad.safetensors' if 'safetensors' in kind else 'bad.pth')
  if kind == 'truncated_pth':
    data = pth_file.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    match = 'not a readable torch checkpoint'
  elif kind == 'text_pth':
    path.write_text('this is not a checkpoint\n')
    match = 'not a readable torch checkpoint'
  elif kind == 'list_pth':
    torch.save([torch.zeros(2)], path)
    match = 'does not hold a state_dict'
  else:
    from safetensors.numpy import save_file
    save_file({'a': np.zeros((64, 64), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    match = 'not a readable .safetensors file'
  with pytest.raises(weights.WeightsError, match=match):
    weights.read_state_dict(path)


def test_save_load_round_trip_and_bad_files(tmp_path, torch_state, monkeypatch):
  variables = weights.from_torchvision(ARCH, torch_state, num_classes=5)
  path = weights.save(variables, tmp_path / 'out', arch=ARCH)
  assert path == tmp_path / 'out' / 'variables.msgpack'
  chex.assert_trees_all_equal(weights.load(ARCH, tmp_path / 'out'), variables)
  chex.assert_trees_all_equal(weights.load(ARCH, path), variables)

  with pytest.raises(weights.WeightsError, match='holds densenet_tiny weights, not resnet_tiny'):
    weights.load('resnet_tiny', tmp_path / 'out')
  weights.save(variables, tmp_path / 'anon')  # no arch recorded: checked by structure
  with pytest.raises(weights.WeightsError, match='does not fit resnet_tiny'):
    weights.load('resnet_tiny', tmp_path / 'anon')

  truncated = tmp_path / 'truncated' / 'variables.msgpack'
  truncated.parent.mkdir()
  truncated.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(weights.WeightsError, match='truncated or corrupt'):
    weights.load(ARCH, truncated.parent)
  with pytest.raises(FileNotFoundError):
    weights.load(ARCH, tmp_path / 'nowhere')

  # A crash while writing leaves the previous file intact and no temporary file.
  before = path.read_bytes()
  def crash(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(os, 'replace', crash)
  with pytest.raises(KeyboardInterrupt):
    weights.save(weights.from_torchvision(ARCH, torch_state, num_classes=1000),
                 tmp_path / 'out', arch=ARCH)
  assert path.read_bytes() == before
  assert sorted(p.name for p in path.parent.iterdir()) == ['variables.msgpack']


def test_convert_weights_script_round_trip(tmp_path, pth_file, torch_state):
  out = tmp_path / 'converted'
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, str(REPO / 'scripts' / 'convert_weights.py'), '--arch', ARCH,
                  '--torch_checkpoint', str(pth_file), '--output', str(out)],
                 check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600)
  loaded = weights.load(ARCH, out)
  chex.assert_trees_all_equal(loaded,
                              weights.from_torchvision(ARCH, torch_state, num_classes=1000))


# --------------------------------------------------------------------------
# resolve(): explicit path, drjax cache, torch hub cache, download, random init.


def _no_download(url, dst):
  raise AssertionError(f'unexpected download of {url}')


def test_resolve_explicit_path(pth_file, torch_state, tmp_path):
  variables, source = weights.resolve(ARCH, pth_file, num_classes=5, download_fn=_no_download)
  assert source == f'explicit:{pth_file}'
  converted = weights.from_torchvision(ARCH, torch_state, num_classes=5)
  chex.assert_trees_all_equal(variables['batch_stats'], converted['batch_stats'])
  chex.assert_trees_all_equal(variables['params']['features'], converted['params']['features'])
  chex.assert_shape(variables['params']['classifier']['kernel'], (9, 5))  # fresh 5-class head

  # A converted directory, and a given init's head.
  weights.save(weights.from_torchvision(ARCH, torch_state, num_classes=1000), tmp_path / 'conv',
               arch=ARCH)
  init = {'params': {'classifier': {'kernel': np.ones((9, 5)), 'bias': np.zeros(5)}}}
  variables, source = weights.resolve(ARCH, tmp_path / 'conv', num_classes=5,
                                      init_variables=init)
  assert source.startswith('explicit:')
  np.testing.assert_array_equal(variables['params']['classifier']['kernel'], np.ones((9, 5)))

  with pytest.raises(FileNotFoundError):
    weights.resolve(ARCH, tmp_path / 'absent.pth')


def test_resolve_torch_hub_then_drjax_cache(pth_file, torch_state, monkeypatch):
  monkeypatch.setitem(weights.TORCHVISION_FILENAMES, ARCH, ('densenet_tiny-0123abcd.pth',))
  hub = weights.torch_hub_checkpoint_dir()
  hub.mkdir(parents=True)
  (hub / 'densenet_tiny-0123abcd.pth').write_bytes(pth_file.read_bytes())

  variables, source = weights.resolve(ARCH, num_classes=1000, download_fn=_no_download)
  assert source == f'torch_hub:{hub / "densenet_tiny-0123abcd.pth"}'
  reference = weights.from_torchvision(ARCH, torch_state, num_classes=1000)
  chex.assert_trees_all_equal(variables, reference)

  cached = weights.cache_dir() / ARCH / 'variables.msgpack'
  assert cached.is_file()
  (hub / 'densenet_tiny-0123abcd.pth').unlink()  # converted once: the cache is used now
  variables, source = weights.resolve(ARCH, num_classes=1000, download_fn=_no_download)
  assert source == f'drjax_cache:{cached}'
  chex.assert_trees_all_equal(variables, reference)


def test_resolve_download_with_hash_check(pth_file, torch_state, monkeypatch, caplog):
  digest = hashlib.sha256(pth_file.read_bytes()).hexdigest()
  monkeypatch.delenv('DRJAX_NO_DOWNLOAD')
  monkeypatch.setattr(weights, '_network_reachable', lambda timeout=2.0: True)
  monkeypatch.setitem(weights.TORCHVISION_URLS, ARCH, pth_file.as_uri())

  # A file whose sha256 does not start with the prefix in its name is refused.
  monkeypatch.setitem(weights.TORCHVISION_FILENAMES, ARCH, ('densenet_tiny-deadbeef.pth',))
  with caplog.at_level(logging.WARNING, logger='drjax.weights'):
    variables, source = weights.resolve(ARCH, num_classes=1000)
  assert variables is None and source.startswith('random_init')
  assert 'expected a hash starting with deadbeef' in caplog.text
  assert not (weights.torch_hub_checkpoint_dir() / 'densenet_tiny-deadbeef.pth').exists()

  name = f'densenet_tiny-{digest[:8]}.pth'
  monkeypatch.setitem(weights.TORCHVISION_FILENAMES, ARCH, (name,))
  variables, source = weights.resolve(ARCH, num_classes=1000)
  assert source == f'download:{pth_file.as_uri()}'
  assert (weights.torch_hub_checkpoint_dir() / name).is_file()
  chex.assert_trees_all_equal(variables,
                              weights.from_torchvision(ARCH, torch_state, num_classes=1000))


def test_resolve_nothing_found_warns(monkeypatch, caplog):
  monkeypatch.setattr(weights, '_network_reachable', lambda timeout=2.0: True)
  with caplog.at_level(logging.WARNING, logger='drjax.weights'):
    # DRJAX_NO_DOWNLOAD=1 (set by the fixture) wins over a reachable network.
    variables, source = weights.resolve('densenet121', download_fn=_no_download)
  assert variables is None
  assert source.startswith('random_init: no ImageNet weights for densenet121')
  assert 'RANDOMLY INITIALISED' in caplog.text
  assert 'densenet121-a639ec97.pth' in caplog.text


# --------------------------------------------------------------------------
# A config that needs weights, and a trunk without its head.


def test_resolve_refuses_the_required_path_placeholder():
  """configs/densenet.py:transfer224 without --config.weights.path: what to pass, no lookup."""
  with pytest.raises(weights.WeightsError, match=r'--config.weights.path=DIR.*export_weights'):
    weights.resolve(ARCH, weights.REQUIRED_PATH, download_fn=_no_download)


def test_a_trunk_without_its_head_gets_a_new_head(torch_state, tmp_path):
  # A run's variables: a trained 5-way head on the converted trunk.
  variables = weights.from_torchvision(ARCH, torch_state, num_classes=1000)
  variables['params']['classifier'] = {'kernel': np.full((9, 5), 2.0, np.float32),
                                       'bias': np.ones(5, np.float32)}
  trunk = weights.without_head(ARCH, variables)
  assert 'classifier' not in trunk['params'] and 'classifier' in variables['params']
  weights.save(trunk, tmp_path / 'trunk', arch=ARCH)
  chex.assert_trees_all_equal(weights.load(ARCH, tmp_path / 'trunk'), trunk)
  init = jax.device_get(models.init_variables(models.get_model(ARCH, num_classes=5),
                                              jax.random.key(7)))
  resolved, _ = weights.resolve(ARCH, tmp_path / 'trunk', num_classes=5, init_variables=init)
  chex.assert_trees_all_equal(resolved['params']['classifier'], init['params']['classifier'])
  chex.assert_trees_all_equal(resolved['params']['features'], variables['params']['features'])
  chex.assert_trees_all_equal(resolved['batch_stats'], variables['batch_stats'])
  # A head of the right size that was kept is used as it is.
  weights.save(variables, tmp_path / 'whole', arch=ARCH)
  resolved, _ = weights.resolve(ARCH, tmp_path / 'whole', num_classes=5, init_variables=init)
  chex.assert_trees_all_equal(resolved['params']['classifier'], variables['params']['classifier'])
