"""The measured steps, each written the way its framework's user would write it.

drjax: `drjax.train.make_train_step` (the paper's fine-tuning step: gradients of the
trainable partition only, Adam, cross-entropy, frozen BatchNorms in inference mode) and
`drjax.evaluate.eval_step`, fed uint8 NHWC images as drjax's pipeline delivers them (the
step normalises on device), with the opt-in CPU convolutions if `spec['cpu_conv']`. No
augmentation on either side.

PyTorch: a torchvision model with `requires_grad=False` on the frozen parameters,
`model.train()`, `torch.optim.Adam` over the trainable parameters, `F.cross_entropy`,
fed float32 NCHW normalised tensors as a DataLoader with ToTensor+Normalize delivers them;
`model.eval()` + `torch.inference_mode()` for evaluation. Note that `model.train()` also
runs the frozen layers' BatchNorms with batch statistics and updates their running stats,
as such user code does; drjax runs them in inference mode (config.frozen_bn_inference).
bf16 on a GPU is `torch.autocast('cuda', dtype=torch.bfloat16)` (AMP; bf16 needs no
GradScaler).

Both sides freeze the same parameters: the patterns of TRAIN's configs (configs/*.py,
`config.trainable`) where present, else the paper's choice below, matched against
'/'-joined parameter paths (torchvision 'features.28.weight' -> 'features/28/weight', the
same path drjax uses); each result row says whether both sides train the same number of
scalars (`same_trainable`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import numpy as np

from benchmarks import common

# The paper's trainable layers (section 2.3 / 2.3.3), used when configs/ has no entry.
PAPER_TRAINABLE = {
    'densenet121': [r'features/denseblock4/denselayer1[4-6]/.*', r'features/norm5/.*',
                    r'classifier/.*'],
    'resnet101': [r'layer4/.*', r'fc/.*'],
    'vgg16': [r'features/(24|26|28)/.*', r'classifier/.*'],
}
_CONFIG_FILES = {'densenet': 'densenet.py', 'resnet': 'resnet.py', 'vgg': 'vgg.py'}
NUM_CLASSES = 5
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def trainable_patterns(model_name: str) -> tuple[list[str], bool, str]:
  """(patterns, frozen_bn_inference, source) for a model, from configs/ if possible."""
  family = re.sub(r'\d.*', '', model_name)
  path = os.path.join(common.REPO, 'configs', _CONFIG_FILES.get(family, ''))
  if os.path.isfile(path):
    spec = importlib.util.spec_from_file_location(f'bench_config_{family}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if config.model == model_name:
      return (list(config.trainable), bool(config.get('frozen_bn_inference', True)),
              os.path.relpath(path, common.REPO))
  if model_name not in PAPER_TRAINABLE:
    raise ValueError(f'no trainable patterns for {model_name}')
  return PAPER_TRAINABLE[model_name], True, 'benchmarks/workloads.py PAPER_TRAINABLE'


def fake_batch(batch_size: int, image_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
  return images, labels


# ------------------------------------------------------------------------- drjax


def jax_workload(mode: str, model_name: str, batch_size: int, image_size: int,
                 precision: str, device: str, freezing: tuple[list[str], bool, str],
                 cpu_conv: bool = False):
  """Returns (blocking step callable, info dict) for drjax."""
  import jax
  import jax.numpy as jnp
  import optax

  from drjax import evaluate, freeze, models, train
  from drjax.kernels import cpu_conv as cpu_conv_lib

  platform = 'gpu' if device == 'gpu' else 'cpu'
  dev = jax.devices(platform)[0]
  kwargs = {'dtype': jnp.bfloat16} if precision == 'bf16' else {}
  if cpu_conv:
    kwargs['conv_general_dilated'] = cpu_conv_lib.make()
  model = models.get_model(model_name, num_classes=NUM_CLASSES, **kwargs)
  images, labels = fake_batch(batch_size, image_size)
  with jax.default_device(dev):
    variables = models.init_variables(model, jax.random.key(0), image_size)
    # Committed to the device, like mesh.replicate does: an uncommitted first state would
    # make the second call (fed the committed output of the first) compile again.
    variables = jax.device_put(variables, dev)
    images = jax.device_put(images, dev)
    info = dict(jax_devices=str(jax.devices(platform)))
    if mode == 'eval':
      eval_fn = jax.jit(functools.partial(evaluate.eval_step, model=model))

      def run():
        eval_fn(variables, images).block_until_ready()
      run.compiled_memory = lambda: compiled_memory(eval_fn, variables, images)
      return run, info

    patterns, frozen_bn, source = freezing
    label_tree = freeze.trainable_labels(variables['params'], patterns)
    tx = optax.adam(1e-4)
    state = jax.device_put(train.create_train_state(variables, tx, label_tree), dev)
    step = train.make_train_step(model, tx, label_tree, augment_fn=None,
                                 frozen_bn_inference=frozen_bn,
                                 mixed_precision='bfloat16' if precision == 'bf16' else 'float32')
    batch = {'image': images, 'label': jax.device_put(labels, dev)}
    rng = jax.random.key(1)
    holder = [state]

    def run():
      holder[0], metrics = step(holder[0], batch, rng)
      metrics['loss'].block_until_ready()

    run.compiled_memory = lambda: compiled_memory(step, holder[0], batch, rng)
    info.update(trainable_patterns=patterns, trainable_source=source,
                frozen_bn_inference=frozen_bn,
                trainable_scalars=freeze.count(variables['params'], label_tree).get('trainable', 0))
    return run, info


def compiled_memory(jitted, *args) -> dict:
  """The compiled program's own working set from XLA's `memory_analysis()`, in MiB.

  `argument`, `output`, `alias` (outputs written into donated arguments: a train step that
  donates its state aliases about the whole state), `temp` (XLA's scratch buffers) and
  `generated_code`; `working_set` = argument + output - alias + temp, what the program needs
  on its device while it runs. Unlike the process's peak RSS, this excludes jax's runtime,
  the framework's libraries and anything else alive in the process. Empty where the
  backend reports nothing.
  """
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:
    return {}
  out = {f'{name}_mib': getattr(stats, f'{name}_size_in_bytes') / 2**20
         for name in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['working_set_mib'] = (out['argument_mib'] + out['output_mib'] - out['alias_mib'] +
                            out['temp_mib'])
  return out


def jax_peak_device_mib(device: str) -> float | None:
  if device != 'gpu':
    return None
  import jax
  stats = jax.devices('gpu')[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return peak / 2**20 if peak else None


# ------------------------------------------------------------------------- PyTorch


def torch_path(name: str) -> str:
  return name.replace('.', '/')


def torch_workload(mode: str, model_name: str, batch_size: int, image_size: int,
                   precision: str, device: str, freezing: tuple[list[str], bool, str],
                   channels_last: bool = False):
  """Returns (blocking step callable, info dict) for the PyTorch reference."""
  import torch
  import torch.nn.functional as F  # noqa: N812
  import torchvision

  dev = torch.device('cuda' if device == 'gpu' else 'cpu')
  model = getattr(torchvision.models, model_name)(weights=None, num_classes=NUM_CLASSES)
  model = model.to(dev)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  images, labels = fake_batch(batch_size, image_size)
  x = torch.from_numpy(((images / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
  x = x.contiguous(memory_format=memory_format).to(dev)
  y = torch.from_numpy(labels.astype(np.int64)).to(dev)
  autocast = (functools.partial(torch.autocast, device_type=dev.type, dtype=torch.bfloat16)
              if precision == 'bf16' else functools.partial(torch.autocast, device_type=dev.type,
                                                            enabled=False))
  sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
  info = dict(channels_last=channels_last)

  if mode == 'eval':
    model.eval()

    def run():
      with torch.inference_mode(), autocast():
        F.softmax(model(x).float(), dim=-1)
      sync()
    return run, info

  patterns, _, source = freezing
  compiled = [re.compile(p) for p in patterns]
  for name, p in model.named_parameters():
    p.requires_grad = any(r.fullmatch(torch_path(name)) for r in compiled)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=1e-4)
  model.train()

  def run():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    loss.item()  # a user logs the loss; this also waits for the step
    sync()

  info.update(trainable_patterns=patterns, trainable_source=source,
              trainable_scalars=sum(p.numel() for p in params))
  return run, info


def torch_peak_device_mib(device: str) -> float | None:
  if device != 'gpu':
    return None
  import torch
  return torch.cuda.max_memory_allocated() / 2**20


# ------------------------------------------------------------------------- worker


def worker(spec: dict, mode: str) -> dict:
  """Measures one spec in this (fresh) process; called by bench_train/bench_eval."""
  applied = common.prepare_process(spec)
  if spec['framework'] == 'torch':
    common.limit_torch_threads(spec['threads'])
  rss_start = common.current_rss_mib()
  build = jax_workload if spec['framework'] == 'jax' else torch_workload
  kwargs = dict(freezing=(spec['trainable'], spec['frozen_bn_inference'],
                          spec['trainable_source']))
  if spec['framework'] == 'torch' and spec.get('channels_last'):
    kwargs['channels_last'] = True
  if spec['framework'] == 'jax':
    kwargs['cpu_conv'] = bool(spec.get('cpu_conv'))
  run, info = build(mode, spec['model'], spec['batch_size'], spec['image_size'],
                    spec['precision'], spec['device'], **kwargs)
  rss_built = common.current_rss_mib()
  timing = common.time_calls(run, spec['warmup'], spec['repeats'],
                             spec.get('calls_per_repeat', 1))
  peak_device = (jax_peak_device_mib if spec['framework'] == 'jax'
                 else torch_peak_device_mib)(spec['device'])
  # After timing, so that first_call_s still is the first call's own compile.
  memory_fn = getattr(run, 'compiled_memory', None)
  return dict(
      spec, **timing, **info, mode=mode,
      compiled_memory=memory_fn() if memory_fn is not None else None,
      images_per_s=spec['batch_size'] / timing['median_s'],
      peak_rss_mib=common.peak_rss_mib(), rss_after_import_mib=rss_start,
      rss_after_build_mib=rss_built, peak_device_mib=peak_device,
      thread_limits=applied, versions=common.versions())
