"""Tests for configs/*.py: the paper's recipe per backbone, smoke and 224 px variants, locked
fields."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
from ml_collections.config_flags import config_flags
from script_runner import run_script

from drjax import freeze, models, recipe, sweep, weights
from drjax.data import augment, pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ('densenet', 'resnet', 'vgg')


def _load(name, arg=None):
  module = config_flags._LoadConfigModule(f'{name}_config', str(REPO / 'configs' / f'{name}.py'))
  return module.get_config(arg)


def _param_paths(model_name, size=64):
  model = models.get_model(model_name, num_classes=5)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))
  return shapes['params']


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('arg', [None, 'smoke', 'paper'])
def test_config_is_locked_and_has_the_paper_hyper_parameters(name, arg):
  config = _load(name, arg)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.optimzer = None  # a typo cannot add a field
  assert config.optimizer.name == 'adam'
  if arg == 'paper':  # the paper's constant Adam 1e-4 and all its augmentations
    assert (config.optimizer.lr, config.optimizer.schedule) == (1e-4, 'constant')
    assert config.augment.rotation_deg == 180 and config.augment.grayscale_prob > 0
  else:  # the CPU-sized runs: 1e-3 with warm-up and cosine decay, lossless flips only
    assert (config.optimizer.lr, config.optimizer.schedule) == (1e-3, 'cosine')
    assert config.optimizer.warmup_steps < config.num_steps
    assert config.augment.hflip and config.augment.rotation_deg == 0
  assert config.num_classes == 5
  assert config.input.val_fraction == 0.2
  assert config.input.class_weights == (0.1, 1.0, 0.5, 3.0, 4.0)
  # A random-init ResNet starts its residual branches at 0; the others have none.
  assert config.weights.zero_init_residual == (name == 'resnet')
  assert config.mixed_precision == 'float32'
  assert config.cpu_conv is True  # the CPU convolutions, where jax runs on a CPU
  assert config.frozen_bn_inference
  assert config.model in models.MODEL_NAMES
  assert isinstance(config.trainable, tuple)
  if arg == 'paper':  # the 512 px EyePACS set of scripts/prepare_data.py, read at 224 px
    assert (config.batch_size, config.input.image_size, config.input.stored_size,
            config.input.dataset) == (256, 224, 512, 'eyepacs')
  elif arg is None:
    assert config.input.dataset == 'synthetic_fundus'


def test_unknown_config_argument_is_an_error():
  with pytest.raises(ValueError, match='smoke'):
    _load('densenet', 'smoek')


_DENSENET_PAPER_LAYERS = {'classifier', 'features/norm5', 'features/denseblock4/denselayer14',
                          'features/denseblock4/denselayer15',
                          'features/denseblock4/denselayer16'}


@pytest.mark.parametrize('name, arg, expected', [
    ('densenet', None, _DENSENET_PAPER_LAYERS),
    ('densenet', 'transfer224', _DENSENET_PAPER_LAYERS),  # the paper's frozen recipe
    ('resnet', None, {'fc', 'layer4/0', 'layer4/1', 'layer4/2'}),
    ('vgg', None, {'features/24', 'features/26', 'features/28', 'classifier/0', 'classifier/3',
                   'classifier/6'}),
])
def test_trainable_patterns_select_the_papers_layers(name, arg, expected):
  config = _load(name, arg)
  params = _param_paths(config.model)
  labels = freeze.trainable_labels(params, config.trainable)
  trainable = {path for path, label in zip(freeze.param_paths(params),
                                           jax.tree.leaves(labels), strict=True)
               if label == 'trainable'}
  depth = 3 if name == 'densenet' else 2
  modules = {'/'.join(p.split('/')[:depth]) if p.startswith(('features/denseblock', 'layer'))
             else '/'.join(p.split('/')[:-1]) for p in trainable}
  assert modules == expected


@pytest.mark.parametrize('name', CONFIGS)
def test_smoke_patterns_match_the_tiny_models(name):
  config = _load(name, 'smoke')
  assert config.model.endswith('_tiny')
  freeze.trainable_labels(_param_paths(config.model, 32), config.trainable)


def test_mistyped_config_field_is_an_error_naming_it(tmp_path):
  result = run_script('train.py', '--config', REPO / 'configs' / 'densenet.py:smoke',
                      '--config.optimzer.lr=0.1', '--workdir', tmp_path / 'run', cwd=tmp_path,
                      timeout=300)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Did you mean "optimizer"' in errors[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run').exists()


# The 224 px variants: (config file, argument, dataset, from a random init).
VARIANTS_224 = [
    ('densenet', 'study224', 'synthetic_fundus', True),
    ('resnet', 'study224', 'synthetic_fundus', True),
    ('vgg', 'study224', 'synthetic_fundus', True),
    ('densenet', 'idrid224', 'idrid', True),
    ('densenet', 'pretrain224', 'synthetic_fundus', True),
    ('densenet', 'transfer224', 'idrid', False),
]


@pytest.mark.parametrize('name, arg, dataset, scratch', VARIANTS_224)
def test_224_variants(name, arg, dataset, scratch):
  config = _load(name, arg)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.optimzer = None
  assert config.model == _load(name).model  # the full-size backbone
  assert config.input.image_size == 224 and config.input.stored_size == 0
  assert config.input.dataset == dataset and config.input.val_fraction == 0.2
  # The paper's augmentations: at 224 px a lesion survives a rotation.
  assert config.augment_enabled and config.augment.to_dict() == augment.default_config().to_dict()
  assert 0 <= config.optimizer.warmup_steps < config.num_steps
  assert config.checkpoint_every <= config.num_steps and config.eval_every <= config.num_steps
  # Paths come from the command line: nothing machine-specific in a config.
  assert config.input.data_dir == '' and config.input.manual_dir == ''
  assert config.weights.path in ('', weights.REQUIRED_PATH)
  if scratch:  # a random init whatever the machine's cache holds, every layer trained
    assert not config.weights.pretrained and config.trainable == ('.*',)
    assert config.optimizer.schedule == 'cosine' and config.optimizer.warmup_steps > 0
  else:  # the paper's frozen recipe from the weights the user passes, and its Adam 1e-4
    assert config.weights.pretrained and config.weights.path == weights.REQUIRED_PATH
    assert config.trainable == _load(name).trainable
    assert (config.optimizer.lr, config.optimizer.schedule) == (1e-4, 'constant')
  if dataset == 'idrid':
    assert config.input.idrid_task == 'grading'
    # IDRiD's grade mix is not EyePACS's: every photograph equally likely.
    assert config.input.class_weights == (1.0,) * 5
  else:
    assert config.input.class_weights == pipeline.PAPER_CLASS_WEIGHTS
    epochs = config.num_steps * config.batch_size / (0.8 * config.input.num_images)
    assert config.input.num_images >= 8000 and epochs >= 20


def test_cpu224_is_the_default_run_at_224_px_on_three_times_the_images():
  default, cpu = _load('densenet'), _load('densenet', 'cpu224')
  assert cpu.input.image_size == 224 and cpu.input.num_images == 3 * default.input.num_images
  assert (cpu.batch_size, cpu.num_steps) == (16, 600)
  assert cpu.augment.to_dict() == default.augment.to_dict()  # flips only, as the default run
  assert cpu.optimizer.to_dict() == default.optimizer.to_dict()
  assert not cpu.weights.pretrained and cpu.trainable == ('.*',)


def test_study224_sizes_and_the_pretraining_set():
  study, pretrain = _load('densenet', 'study224'), _load('densenet', 'pretrain224')
  assert (study.input.num_images, study.batch_size, study.num_steps) == (8000, 32, 6000)
  assert (study.optimizer.lr, study.optimizer.schedule) == (1e-3, 'cosine')
  # The three backbones share study224's data and schedule (Table 1), VGG16 at a lower lr.
  for name in ('resnet', 'vgg'):
    other = _load(name, 'study224')
    assert other.input.to_dict() == study.input.to_dict()
    assert (other.batch_size, other.num_steps) == (study.batch_size, study.num_steps)
    assert other.optimizer.lr == (1e-4 if name == 'vgg' else 1e-3)
  assert pretrain.input.num_images > study.input.num_images
  assert pretrain.input.synthetic_seed != study.input.synthetic_seed


@pytest.mark.parametrize('name', CONFIGS)
def test_every_offered_variant_is_in_the_docstring(name):
  text = (REPO / 'configs' / f'{name}.py').read_text()
  offered = [a for a in recipe.VARIANTS if _try_load(name, a)]
  assert 'study224' in offered
  for arg in offered:
    assert f'configs/{name}.py:{arg}' in text, arg
  if name != 'densenet':
    assert offered == ['smoke', 'paper', 'study224']


def _try_load(name, arg):
  try:
    return _load(name, arg)
  except ValueError:
    return None


def test_paper224_sweep_file():
  runs = sweep.load_sweep_file(REPO / 'configs' / 'sweeps' / 'paper224.py')
  assert [r['config'] for r in runs] == [
      'configs/densenet.py:study224', 'configs/resnet.py:study224', 'configs/vgg.py:study224']
  assert sweep.run_names(runs) == ['densenet-study224', 'resnet-study224', 'vgg-study224']


def test_transfer224_without_weights_is_an_error_at_run_time(tmp_path):
  """Not an ImageNet lookup, not a silent random init: one error line naming the flag."""
  # The tiny model on the smoke data: everything but the weights as transfer224 has it.
  result = run_script(
      'train.py', '--config', REPO / 'configs' / 'densenet.py:transfer224',
      '--config.model=densenet_tiny', '--config.input.dataset=synthetic_fundus',
      '--config.input.image_size=32', '--config.input.num_images=48', '--config.batch_size=8',
      '--config.eval_batch_size=8', '--workdir', tmp_path / 'run', cwd=tmp_path, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: config.weights.path is required')
  assert '--config.weights.path=' in last and 'export_weights.py' in last
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not any(
      (tmp_path / 'run' / 'checkpoints').iterdir())
