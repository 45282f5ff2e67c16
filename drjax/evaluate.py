"""Evaluating a model and loading a finished run: eval_step, evaluate, load_run, evaluate_run."""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import linen as nn

from drjax import checkpoint, distributed, errors, metrics, models
from drjax import mesh as mesh_lib
from drjax.kernels import cpu_conv

PyTree = Any


def eval_step(variables: PyTree, images: jax.Array, *, model: nn.Module) -> jax.Array:
  """Class probabilities [B, K] for uint8 images [B, H, W, 3] (inference-mode BN)."""
  return predict_probs(model, variables, models.normalize(images))


def predict_probs(model: nn.Module, variables: PyTree, x: jax.Array) -> jax.Array:
  """Class probabilities [B, K] for ImageNet-normalised images [B, H, W, 3]."""
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  logits = model.apply(variables, x, train=False)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def evaluate(model: nn.Module, variables: PyTree, batches: Iterator[Mapping[str, np.ndarray]],
             mesh: jax.sharding.Mesh, eval_fn: Callable | None = None,
             input_key: str = 'image') -> tuple[np.ndarray, np.ndarray]:
  """Runs the model over an eval iterator (padded batches with `valid`).

  Args:
    model, variables: what `eval_fn` (default `eval_step`) runs.
    batches: dicts of `input_key` (what `eval_fn` takes: 'image' uint8 [b, H, W, 3], or the
      trunk cache's 'trunk' [b, h, w, C]), `label` and `valid`.
    mesh: the batches are sharded over its 'data' axis.

  Returns:
    `(labels [N] int, probs [N, K] float32)` over the valid examples.
  """
  eval_fn = eval_fn or jax.jit(functools.partial(eval_step, model=model))
  variables = mesh_lib.replicate(variables, mesh)
  all_labels, all_probs = [], []
  for batch in batches:
    batch = dict(batch)
    valid = np.asarray(batch.pop('valid', np.ones(len(batch['label']), bool)))
    inputs = mesh_lib.shard_batch({input_key: batch[input_key]}, mesh)[input_key]
    probs = eval_fn(variables, inputs)
    probs = np.asarray(jax.device_get(probs))
    # probs cover the global batch; labels/valid are this process's rows of it.
    valid = distributed.gather_rows(valid)
    all_probs.append(probs[valid])
    all_labels.append(distributed.gather_rows(batch['label'])[valid])
  if not all_probs:
    raise ValueError('the evaluation split is empty')
  return np.concatenate(all_labels).astype(np.int64), np.concatenate(all_probs)


def eval_summary(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, float]:
  """Loss, accuracy and quadratic weighted kappa of validation predictions."""
  loss = -np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)))
  preds = probs.argmax(-1)
  return {
      'val_loss': float(loss),
      'val_accuracy': float(np.mean(preds == labels)),
      'val_kappa': float(metrics.quadratic_weighted_kappa(labels, preds,
                                                          num_classes=num_classes)),
  }


def build_model(config: mlc.ConfigDict, **kwargs) -> nn.Module:
  """`config.model` with `config.num_classes`, on the CPU convolutions if `config.cpu_conv`."""
  conv = cpu_conv.make() if config.get('cpu_conv', False) else None
  return models.get_model(config.model, num_classes=config.num_classes,
                          conv_general_dilated=conv, **kwargs)


def load_config(workdir: str | pathlib.Path) -> mlc.ConfigDict:
  """The run's config.json as a locked ConfigDict."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.is_file():
    raise errors.UserError(f'{workdir} is not a drjax run: it has no config.json')
  config = mlc.ConfigDict(json.loads(path.read_text()))
  config.lock()
  return config


def load_run(workdir: str | pathlib.Path, step: int | None = None
             ) -> tuple[mlc.ConfigDict, nn.Module, PyTree]:
  """(config, model, variables) of a run's latest (or given) checkpoint, on one device."""
  config = load_config(workdir)
  model = build_model(config)
  shapes = jax.eval_shape(functools.partial(models.init_variables, model,
                                            image_size=config.input.image_size),
                          jax.random.key(0))
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          shapes)
  _, variables, _ = checkpoint.load_variables(pathlib.Path(workdir) / 'checkpoints', abstract,
                                              step=step)
  return config, model, variables


def evaluate_run(workdir: str | pathlib.Path, split: str = 'validation',
                 config_input: mlc.ConfigDict | None = None, batch_size: int | None = None,
                 step: int | None = None) -> dict:
  """classification_report of a saved run on `split` of its dataset (or of `config_input`'s).

  Args:
    workdir: a run of `drjax.train.train_and_evaluate`.
    split: 'validation' (the run's held-out 20%), 'test' (the dataset's own test split, if
      any) or 'train'.
    config_input: another `input` block (e.g. IDRiD) to evaluate on; default the run's.
    batch_size: default the run's eval_batch_size (rounded up to the device count).
    step: checkpoint step; default the latest.
  """
  from drjax.data import pipeline

  config, model, variables = load_run(workdir, step=step)
  config_input = config.input if config_input is None else config_input
  ds = pipeline.get_dataset(config_input)
  source = {'validation': ds.validation, 'test': ds.test, 'train': ds.train}[split]
  if source is None:
    raise errors.ConfigError(f'{config_input.dataset} has no {split!r} split')
  mesh = mesh_lib.make_mesh()
  n = mesh.devices.size
  batch_size = batch_size or config.eval_batch_size
  batch_size = -(-batch_size // n) * n
  labels, probs = evaluate(model, variables,
                           pipeline.make_eval_iterator(config_input, source, batch_size), mesh)
  report = metrics.classification_report(labels, probs)
  report.update({'split': split, 'dataset': config_input.dataset, 'model': config.model,
                 'workdir': str(workdir)})
  return report
