"""Input pipeline: grain over tfds ArrayRecord data sources, with the paper's oversampling.

`get_dataset` prepares the configured dataset (building synthetic_fundus on first use) and
splits it 80/20 by patient; `make_train_iterator` yields an infinite, deterministic stream of
batches oversampled with per-grade weights (the paper's w = [0.1, 1, 0.5, 3, 4]);
`make_eval_iterator` yields every example exactly once, padding the last batch and marking
real rows with `valid`.

The training stream is a pure function of (seed, global step, row): example k of the global
stream is drawn from "epoch" k // N with a generator seeded by (seed, epoch). So a run resumed
at `start_step` sees exactly the batches it would have seen, whatever the number of reader
threads, and process p of P reads rows [p * B/P, (p + 1) * B/P) of every global batch.
Images stored larger than the model's input (`stored_size`, e.g. prepare_data.py's 512 px
EyePACS) are decoded at reduced JPEG scale and resized on read. Augmentation is not done
here: it runs on device (drjax.data.augment).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import ml_collections as mlc
import numpy as np
from absl import flags, logging
from tensorflow_datasets.proto import tf_example_pb2

from drjax import errors
from drjax.data import builders, images, splits

# Oversampling weights per grade from the paper, eq. (2-1): with the EyePACS counts
# d = [25810, 2443, 5292, 873, 708], w * d is roughly balanced (~2.4k-2.8k per grade).
PAPER_CLASS_WEIGHTS = (0.1, 1.0, 0.5, 3.0, 4.0)
NUM_CLASSES = 5
# Long enough to never run out; grain's MapDataset is lazy, nothing is allocated per index.
_INFINITE = 2**62
# What tfds writes each record as (its own copy of the proto: no TensorFlow needed).
_EXAMPLE = tf_example_pb2.Example


def default_config() -> mlc.ConfigDict:
  """The `input` block of a training config (embed it as `config.input`)."""
  c = mlc.ConfigDict()
  c.dataset = 'synthetic_fundus'  # 'synthetic_fundus' | 'eyepacs' | 'idrid' | 'aptos2019'
  c.data_dir = ''  # tfds data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.manual_dir = ''  # downloaded files of eyepacs/idrid/aptos2019 (only needed to build)
  c.image_size = 224  # side of the images the model gets
  # Side of the stored images when it differs from image_size (e.g. 512, what
  # scripts/prepare_data.py writes for eyepacs): they are decoded at reduced JPEG scale and
  # resized on read. 0: stored at image_size (built at that size if missing).
  c.stored_size = 0
  c.num_images = 2000  # synthetic_fundus: training images
  c.num_test_images = 0  # synthetic_fundus: size of its 'test' split
  c.synthetic_seed = 0  # synthetic_fundus: seed of the generated set
  c.btgraham = False  # eyepacs/aptos2019/idrid: Ben Graham preprocessing at build time
  c.idrid_task = 'grading'  # idrid: 'grading' | 'segmentation' (masks, no grades)
  c.limit = 0  # eyepacs/aptos2019/idrid: keep only the first N images per split (0: all)
  c.class_weights = PAPER_CLASS_WEIGHTS  # per-grade oversampling weights; None: uniform
  c.val_fraction = 0.2  # paper: 80/20
  c.split_seed = 0
  c.num_workers = 8  # reader threads (decoding releases the GIL)
  c.prefetch = 8  # batches read ahead (at least num_workers)
  # Training batches are read in this many processes (grain's mp_prefetch), each with
  # num_workers threads, for hosts whose cores outrun one Python interpreter; 0: in-process.
  c.reader_processes = 0
  # Training batches copied to the devices ahead of the step that uses them, so that the copy
  # overlaps the steps before it (drjax.mesh.prefetch_to_mesh); 0: copied when needed.
  c.device_prefetch = 2
  c.build_workers = 0  # processes when building a dataset; 0: all CPUs
  c.with_masks = False  # yield lesion masks [B, H, W, 5] (synthetic_fundus, idrid segmentation)
  return c


@dataclasses.dataclass
class Source:
  """A random-access view of one tfds split restricted to `indices`, with its metadata.

  `source[i]` is the decoded tfds record `indices[i]`: dict(image uint8 [S, S, 3], label,
  id, ...). `labels`, `ids`, `patient_ids` are [len] arrays read without decoding images.
  """

  data_source: Any
  indices: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  patient_ids: np.ndarray
  has_masks: bool
  # The same records with the masks left encoded: inflating [S, S, 5] masks costs more than
  # reading the rest of a record, and classification training does not need them.
  maskless_source: Any = None
  # The serialized tf.train.Examples (ArrayRecord), for `encoded`; None for in-memory sources.
  records: Any = None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.data_source[int(self.indices[i])]

  def encoded(self, i: int) -> tuple[bytes, int]:
    """(encoded image bytes, label) of record i, parsed straight from its tf.train.Example.

    tfds's generic parsing of every feature holds the GIL several times longer than this,
    which caps what reader threads can deliver together.
    """
    feature = _EXAMPLE.FromString(self.records[int(self.indices[i])]).features.feature
    return feature['image'].bytes_list.value[0], int(feature['label'].int64_list.value[0])

  def get(self, i: int, with_masks: bool = True) -> dict[str, Any]:
    """Record i; masks (if any) decoded only when `with_masks`."""
    if with_masks or self.maskless_source is None:
      return self[i]
    return self.maskless_source[int(self.indices[i])]

  def subset(self, idx: np.ndarray) -> Source:
    idx = np.asarray(idx, np.int64)
    return dataclasses.replace(self, indices=self.indices[idx], labels=self.labels[idx],
                               ids=self.ids[idx], patient_ids=self.patient_ids[idx])


@dataclasses.dataclass
class DatasetSplits:
  """What `get_dataset` returns: the splits as `Source`s and the training class counts."""

  name: str
  train: Source
  validation: Source | None
  test: Source | None
  num_classes: int
  class_counts: np.ndarray  # [num_classes] int64, of the train split
  builder: Any


def stored_size(config_input: mlc.ConfigDict) -> int:
  """Side of the images as stored: `stored_size`, or `image_size` when that is 0."""
  return config_input.get('stored_size', 0) or config_input.image_size


def _read_size(config_input: mlc.ConfigDict) -> int | None:
  """Side the loaders resize to, or None where images are used as stored."""
  return config_input.image_size if stored_size(config_input) != config_input.image_size else None


def _builder_options(config_input: mlc.ConfigDict) -> dict[str, Any]:
  name = config_input.dataset
  size = stored_size(config_input)
  if name == 'synthetic_fundus':
    return dict(num_images=config_input.num_images, image_size=size,
                seed=config_input.synthetic_seed, num_test_images=config_input.num_test_images)
  options = dict(image_size=size, btgraham=config_input.btgraham, limit=config_input.limit)
  if name == 'idrid':
    options['task'] = config_input.idrid_task
  return options


def _read_index(builder, split: str) -> dict[str, np.ndarray]:
  """labels/ids/patient_ids of a split, reading records without decoding images.

  Cached as `drjax_index_<split>.npz` beside the data (skipped if the folder is read-only).
  """
  cache = os.path.join(builder.data_dir, f'drjax_index_{split}.npz')
  n = builder.info.splits[split].num_examples
  if os.path.exists(cache):
    with np.load(cache) as f:
      if len(f['labels']) == n:
        return dict(f)
  keys = builder.info.features.keys()
  skip = {k: _skip_decoding() for k in ('image', 'masks', 'optic_disc') if k in keys}
  raw = builder.as_data_source(split, decoders=skip)
  records = []
  for start in range(0, n, 1024):  # batched reads, in chunks to bound memory
    records.extend(raw.__getitems__(list(range(start, min(n, start + 1024)))))

  def text(r, key):
    v = r.get(key, r['id'])
    return v.decode() if isinstance(v, bytes) else str(v)

  index = {'labels': np.asarray([int(r['label']) for r in records], np.int64).reshape(n),
           'ids': np.asarray([text(r, 'id') for r in records]).reshape(n),
           'patient_ids': np.asarray([text(r, 'patient_id') for r in records]).reshape(n)}
  try:
    np.savez(cache, **index)
  except OSError:
    pass
  return index


def _records(data_source) -> Any:
  """The ArrayRecord reader under a tfds data source, or None if it is not one."""
  records = getattr(data_source, 'data_source', None)
  return records if hasattr(records, '__getitem__') else None


def _skip_decoding():
  import tensorflow_datasets as tfds  # noqa: PLC0415

  return tfds.decode.SkipDecoding()


def get_dataset(config_input: mlc.ConfigDict) -> DatasetSplits:
  """Prepares (builds if needed) the configured dataset and splits it.

  The builder's 'train' split is divided into train/validation by
  `splits.train_val_split` (stratified by grade, grouped by patient, `split_seed`); the
  builder's own 'test' split, when it has one, is `test` (else None).

  Args:
    config_input: see `default_config`.

  Returns:
    DatasetSplits with .train/.validation/.test `Source`s, .num_classes, .class_counts.
  """
  name = config_input.dataset
  builder = builders.prepare(
      name, data_dir=config_input.data_dir or None, manual_dir=config_input.manual_dir or None,
      num_workers=config_input.build_workers or None, **_builder_options(config_input))
  has_masks = 'masks' in builder.info.features.keys()
  if config_input.with_masks and not has_masks:
    raise errors.ConfigError(f'with_masks=True but {builder.info.full_name} has no lesion masks '
                             "(use synthetic_fundus, or idrid with idrid_task='segmentation')")

  mask_keys = [k for k in ('masks', 'optic_disc') if k in builder.info.features.keys()]

  def whole(split: str) -> Source:
    idx = _read_index(builder, split)
    maskless = builder.as_data_source(
        split, decoders={k: _skip_decoding() for k in mask_keys}) if mask_keys else None
    data_source = builder.as_data_source(split)
    return Source(data_source, np.arange(len(idx['labels'])), idx['labels'], idx['ids'],
                  idx['patient_ids'], has_masks, maskless, _records(data_source))

  full = whole('train')
  train_idx, val_idx = splits.train_val_split(full.labels, full.patient_ids,
                                              config_input.val_fraction,
                                              config_input.split_seed)
  test = whole('test') if 'test' in builder.info.splits else None
  counts = np.bincount(full.labels[train_idx][full.labels[train_idx] >= 0],
                       minlength=NUM_CLASSES).astype(np.int64)
  logging.info('%s: train %d, validation %d, test %s; train grade counts %s',
               builder.info.full_name, len(train_idx), len(val_idx),
               len(test) if test is not None else 'none', counts.tolist())
  return DatasetSplits(name=name, train=full.subset(train_idx),
                       validation=full.subset(val_idx) if len(val_idx) else None,
                       test=test, num_classes=NUM_CLASSES, class_counts=counts,
                       builder=builder)


def sampling_probabilities(labels: np.ndarray,
                           class_weights: Sequence[float] | None) -> np.ndarray | None:
  """Per-example probabilities proportional to `class_weights[label]`; None if no weights.

  `class_weights` None, () or (None,) means uniform sampling (returns None).

  This is PyTorch's WeightedRandomSampler with per-class weights, which the paper used:
  grade g is drawn with probability w_g * d_g / sum_h(w_h * d_h).
  """
  # A tuple-typed config field given `--config.input.class_weights=None` on the
  # command line arrives as (None,); it means uniform sampling, like None and ().
  if class_weights is None or all(w is None for w in class_weights):
    return None
  w = np.asarray(class_weights, np.float64)
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= len(w)):
    raise errors.ConfigError(f'class_weights {tuple(w)} cannot weight labels in '
                             f'[{labels.min()}, {labels.max()}] (-1 = ungraded images)')
  if (w < 0).any() or not (w[labels] > 0).any():
    raise errors.ConfigError(f'class_weights must be >= 0 and not all zero, got {tuple(w)}')
  p = w[labels]
  return p / p.sum()


class _TrainIndex:
  """Local position j of one process -> example index (and, `with_position`, its position k in
  the global stream), for a grain MapDataset."""

  def __init__(self, num_examples: int, probs: np.ndarray | None, seed: int, start_step: int,
               global_batch: int, process_index: int, local_batch: int,
               with_position: bool = False):
    self.n = num_examples
    self.probs = probs
    self.seed = seed
    self.start_step = start_step
    self.global_batch = global_batch
    self.offset = process_index * local_batch
    self.local_batch = local_batch
    self.with_position = with_position

  def __len__(self) -> int:
    return _INFINITE

  @functools.lru_cache(maxsize=4)  # noqa: B019 -- the instance lives as long as its iterator
  def _epoch(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
    if self.probs is None:
      return rng.permutation(self.n)
    return rng.choice(self.n, size=self.n, p=self.probs)

  def __getitem__(self, j: int) -> int | tuple[int, int]:
    step = self.start_step + j // self.local_batch
    k = step * self.global_batch + self.offset + j % self.local_batch
    i = int(self._epoch(k // self.n)[k % self.n])
    return (i, k) if self.with_position else i


class _Load:
  """Example index -> the dict the train step wants (no strings: everything goes to device).

  Images come out at `size` (None: as stored). Without masks, a record of a tfds source is
  parsed by `Source.encoded` and its image decoded by `images.decode_square`, which gives
  the same pixels as tfds's own decoding at the stored size.
  """

  def __init__(self, source: Source, with_masks: bool, size: int | None = None):
    self.source = source
    self.with_masks = with_masks
    self.size = size

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    if not self.with_masks and self.source.records is not None:
      data, label = self.source.encoded(i)
      return {'image': images.decode_square(data, self.size),
              'label': np.asarray(label, np.int32)}
    rec = self.source.get(i, self.with_masks)
    image = np.asarray(rec['image'], np.uint8)
    out = {'image': image if self.size is None else images.resize_square(image, self.size),
           'label': np.asarray(rec['label'], np.int32)}
    if self.with_masks:
      out['masks'] = self._masks(np.asarray(rec['masks'], np.uint8))
    return out

  def _masks(self, masks: np.ndarray) -> np.ndarray:
    if self.size is None or masks.shape[0] == self.size:
      return masks
    whole = (0.0, 0.0, float(masks.shape[1]), float(masks.shape[0]))
    return images.stack_masks([images.resize_mask(masks[..., k], whole, self.size)
                               for k in range(masks.shape[-1])], self.size)


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise errors.ConfigError(f'batch_size {batch_size} must divide by process_count '
                             f'{process_count}')
  return batch_size // process_count


def _batched(ds: grain.MapDataset, config_input: mlc.ConfigDict, local_batch: int,
             processes: int = 0) -> grain.IterDataset:
  """Batches, then reads whole batches on `num_workers` threads (in each of `processes`).

  Batching before `to_iter_dataset` makes a batch the unit of work of a reader thread:
  grain's per-element overhead then is paid once per batch, and images still decode in
  parallel (PIL releases the GIL) across the batches in flight. With processes, grain hands
  them batches in turn and yields them in the same order as one process would.
  """
  threads = max(1, config_input.num_workers)
  options = grain.ReadOptions(num_threads=threads,
                              prefetch_buffer_size=max(threads, config_input.prefetch))
  out = ds.batch(local_batch).to_iter_dataset(options)
  if processes > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain reads its absl flags; a notebook parsed none
    out = out.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=processes, per_worker_buffer_size=max(1, config_input.prefetch // processes)))
  return out


def make_train_iterator(config_input: mlc.ConfigDict, source: Source, batch_size: int,
                        seed: int, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1,
                        load: Callable[[tuple[int, int]], dict] | None = None
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of oversampled, shuffled training batches.

  Args:
    config_input: uses class_weights, with_masks, num_workers, prefetch.
    source: usually `get_dataset(...).train`.
    batch_size: the global batch size B; this process yields B / process_count rows.
    seed: fixes the whole stream.
    start_step: the first batch is global step `start_step` of the stream (resume).
    process_index, process_count: multi-host sharding (jax.process_index()/process_count()).
    load: `load((i, k))` -> the row of example i of `source` at position k of the global
      stream, instead of its decoded image (drjax.trunk_cache reads its cached features).

  Yields:
    dict(image=uint8 [b, S, S, 3], label=int32 [b], masks=uint8 [b, S, S, 5] if
    with_masks), or what `load` returns, b = B / process_count.
  """
  if len(source) == 0:
    raise ValueError('Cannot train on an empty source')
  local = _local_batch(batch_size, process_count)
  probs = sampling_probabilities(source.labels, config_input.class_weights)
  index = _TrainIndex(len(source), probs, seed, start_step, batch_size, process_index, local,
                      with_position=load is not None)
  ds = grain.MapDataset.source(index).map(
      load or _Load(source, config_input.with_masks, _read_size(config_input)))
  return iter(_batched(ds, config_input, local, config_input.get('reader_processes', 0)))


class _EvalIndex:
  """Local position -> (example index, valid) for padded evaluation batches."""

  def __init__(self, num_examples: int, global_batch: int, process_index: int,
               local_batch: int):
    self.n = num_examples
    self.global_batch = global_batch
    self.offset = process_index * local_batch
    self.local_batch = local_batch
    self.num_batches = -(-num_examples // global_batch)

  def __len__(self) -> int:
    return self.num_batches * self.local_batch

  def __getitem__(self, j: int) -> tuple[int, bool]:
    k = (j // self.local_batch) * self.global_batch + self.offset + j % self.local_batch
    return (k, True) if k < self.n else (0, False)


class _LoadPadded:
  def __init__(self, load: Callable[[int], dict[str, np.ndarray]]):
    self.load = load
    self._template = None

  def __call__(self, index_valid: tuple[int, bool]) -> dict[str, np.ndarray]:
    i, valid = index_valid
    if valid:
      out = self.load(i)
    else:
      if self._template is None:
        self._template = {k: np.zeros_like(v) for k, v in self.load(0).items()}
      out = dict(self._template)
    out['valid'] = np.asarray(valid)
    return out


def make_eval_iterator(config_input: mlc.ConfigDict, source: Source, batch_size: int,
                       process_index: int = 0, process_count: int = 1,
                       load: Callable[[int], dict] | None = None
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Finite iterator over every example exactly once, in order, last batch padded.

  All processes yield the same number of batches (ceil(N / B)); padded rows are zeros with
  valid=False, so metrics must weight rows by `valid`. `load(i)` replaces the decoding of
  example i of `source` (drjax.trunk_cache reads its cached features).

  Yields:
    dict(image=uint8 [b, S, S, 3], label=int32 [b], valid=bool [b], masks=uint8
    [b, S, S, 5] if with_masks), or what `load` returns and valid, b = batch_size /
    process_count.
  """
  local = _local_batch(batch_size, process_count)
  index = _EvalIndex(len(source), batch_size, process_index, local)
  ds = grain.MapDataset.source(index).map(
      _LoadPadded(load or _Load(source, config_input.with_masks, _read_size(config_input))))
  return iter(_batched(ds, config_input, local))
