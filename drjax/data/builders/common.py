"""Pieces shared by the fundus dataset builders: label files, skip reports, parallel mapping.

A builder never dies halfway through a 35k-image build on a bad file: label-level problems
(missing file, unlabeled file, bad grade) and image-level problems (corrupt, no field of
view) are recorded in a `SkipReport`, logged, and written next to the data as
`build_report_<split>.json`. Only a split with nothing usable raises `NoUsableDataError`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import multiprocessing
import os
import pathlib
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import tqdm
from absl import logging

from drjax import errors
from drjax.data import images

NUM_GRADES = 5
GRADE_NAMES = ('0_no_dr', '1_mild', '2_moderate', '3_severe', '4_proliferative')
LESION_TYPES = images.LESION_TYPES
_MIN_ITEMS_FOR_PROCESSES = 100
IMAGE_EXTENSIONS = images.IMAGE_EXTENSIONS


class NoUsableDataError(errors.UserError, RuntimeError):
  """Raised when a split has no usable example left; the message is the skip summary."""


@dataclasses.dataclass
class Skipped:
  id: str
  reason: str
  path: str = ''


@dataclasses.dataclass
class SkipReport:
  """What a build skipped and why; written as JSON beside the generated files."""

  dataset: str
  split: str
  skipped: list[Skipped] = dataclasses.field(default_factory=list)
  num_written: int = 0

  def add(self, id_: str, reason: str, path: str | os.PathLike = '') -> None:
    self.skipped.append(Skipped(str(id_), reason, os.fspath(path)))

  def counts(self) -> dict[str, int]:
    """Skips per reason, with the variable part (e.g. a PIL message) cut after ':'."""
    return dict(collections.Counter(s.reason.split(':')[0] for s in self.skipped))

  def summary(self) -> str:
    lines = [f'{self.dataset} {self.split}: wrote {self.num_written} examples, '
             f'skipped {len(self.skipped)}']
    for reason, n in sorted(self.counts().items(), key=lambda kv: -kv[1]):
      examples = [s.id for s in self.skipped if s.reason.split(':')[0] == reason][:5]
      lines.append(f'  {n:6d} x {reason}  (e.g. {", ".join(examples)})')
    return '\n'.join(lines)

  def to_json(self) -> dict[str, Any]:
    return {'dataset': self.dataset, 'split': self.split, 'num_written': self.num_written,
            'num_skipped': len(self.skipped), 'skipped_by_reason': self.counts(),
            'skipped': [dataclasses.asdict(s) for s in self.skipped]}

  def write(self, directory: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(directory) / f'build_report_{self.split}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(self.to_json(), indent=1))
    return path

  def finish(self, directory: str | os.PathLike | None) -> None:
    """Writes the report; logs the summary, or raises with it if nothing was written."""
    text = self.summary()
    if directory is not None:
      # `directory` is tfds's temporary build folder, deleted if the build fails: a failed
      # build's report goes to the config folder above it instead.
      path = self.write(directory if self.num_written else pathlib.Path(directory).parent)
      text += f'\n  full list: {path}'
    if not self.num_written:
      # Not logged as well: whoever reports the error would show the summary twice.
      raise NoUsableDataError(f'No usable examples in {self.dataset} {self.split}.\n{text}')
    if self.skipped:
      logging.warning('%s', text)
    else:
      logging.info('%s', text)


def parse_grade(value: Any) -> int | None:
  """'3', '3.0', 3 -> 3; anything else, or outside 0-4, -> None."""
  try:
    f = float(str(value).strip())
  except ValueError:
    return None
  if not f.is_integer() or not 0 <= f < NUM_GRADES:
    return None
  return int(f)


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
  """CSV rows as dicts with stripped keys and values; blank rows and empty columns dropped.

  IDRiD's header is `Image name,Retinopathy grade,Risk of macular edema ,,,,...` (trailing
  space, CRLF, empty columns); Excel exports add a BOM.
  """
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    rows = []
    for raw in reader:
      row = {h: v.strip() for h, v in zip(header, raw, strict=False) if h}
      if any(row.values()):
        rows.append(row)
  return rows


def find_column(rows: list[dict[str, str]], candidates: Iterable[str], path: Any) -> str:
  """The first header among `candidates` (case-insensitive) present in the CSV."""
  keys = list(rows[0]) if rows else []
  lower = {k.lower(): k for k in keys}
  for c in candidates:
    if c.lower() in lower:
      return lower[c.lower()]
  raise NoUsableDataError(f'{path}: none of the columns {list(candidates)} found in {keys}')


def list_images(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Image files of a folder keyed by file stem (extension-insensitive)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return {}
  return {p.stem: p for p in sorted(directory.iterdir())
          if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def match_labels(labels: dict[str, Any], files: dict[str, pathlib.Path],
                 report: SkipReport) -> list[tuple[str, pathlib.Path, int, Any]]:
  """Joins label rows and image files; records rows without files and files without labels.

  Args:
    labels: id -> (raw grade, extra) from the label file.
    files: id -> path.
    report: where to record skips.

  Returns:
    Sorted list of (id, path, grade, extra) usable for the build.
  """
  out = []
  for id_, (raw_grade, extra) in sorted(labels.items()):
    path = files.get(id_)
    if path is None:
      report.add(id_, 'label row without image file')
      continue
    grade = parse_grade(raw_grade)
    if grade is None:
      report.add(id_, f'grade outside 0-{NUM_GRADES - 1}: {raw_grade!r}', path)
      continue
    out.append((id_, path, grade, extra))
  for id_, path in sorted(files.items()):
    if id_ not in labels:
      report.add(id_, 'image file without label', path)
  return out


def read_labels(path: pathlib.Path, id_cols: Iterable[str], grade_cols: Iterable[str],
                report: SkipReport, extra_cols: Iterable[str] = ()) -> dict[str, Any]:
  """id -> (raw grade, {extra column: value}); duplicate ids keep the first row."""
  rows = read_csv_rows(path)
  if not rows:
    raise NoUsableDataError(f'{path}: no label rows')
  id_col = find_column(rows, id_cols, path)
  grade_col = find_column(rows, grade_cols, path)
  extra_keys = {c: find_column(rows, [c], path) for c in extra_cols}
  labels = {}
  for row in rows:
    id_ = os.path.splitext(row.get(id_col, ''))[0]
    if not id_:
      continue
    if id_ in labels:
      report.add(id_, 'duplicate label row (kept the first)')
      continue
    labels[id_] = (row.get(grade_col, ''), {c: row.get(k, '') for c, k in extra_keys.items()})
  return labels


def _call_safely(fn: Callable[[Any], Any], item: Any) -> tuple[Any, Any, str | None]:
  """Runs fn(item) -> (item, result, None) or (item, None, reason); never raises."""
  try:
    return item, fn(item), None
  except images.BadImageError as e:
    return item, None, str(e)
  except Exception as e:  # noqa: BLE001 -- a bad file must not stop a 35k-image build
    logging.debug('%s', traceback.format_exc())
    return item, None, f'unexpected error: {e.__class__.__name__}: {e}'


def parallel_map(fn: Callable[[Any], Any], items: list[Any], num_workers: int | None,
                 desc: str) -> Iterator[tuple[Any, Any, str | None]]:
  """Applies `fn` to items in worker processes, with a progress bar, in completion order.

  Exceptions in `fn` are caught per item and come back as the reason string, so a corrupt
  file never aborts the build. Processes are started with 'spawn': the caller may have
  JAX (multithreaded) imported, and forking it can deadlock.

  Args:
    fn: picklable top-level function (or functools.partial of one).
    items: picklable work items.
    num_workers: processes; None = all CPUs (in-process below 100 items); <= 1 runs in
      this process.
    desc: progress bar label.

  Yields:
    (item, result or None, reason or None).
  """
  if num_workers is None:
    # Starting spawned workers costs seconds (each imports tfds): not worth it for a few items.
    num_workers = (os.cpu_count() or 1) if len(items) >= _MIN_ITEMS_FOR_PROCESSES else 1
  num_workers = min(num_workers, len(items))
  bar = tqdm.tqdm(total=len(items), desc=desc, unit='img', mininterval=1.0, leave=False)
  try:
    if num_workers <= 1:
      for item in items:
        yield _call_safely(fn, item)
        bar.update()
      return
    ctx = multiprocessing.get_context('spawn')
    chunksize = max(1, min(32, len(items) // (num_workers * 8)))
    with ctx.Pool(num_workers) as pool:
      for out in pool.imap_unordered(_SafeCall(fn), items, chunksize=chunksize):
        yield out
        bar.update()
  finally:
    bar.close()


class _SafeCall:
  """Picklable wrapper of `_call_safely` for Pool.imap."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, item):
    return _call_safely(self.fn, item)


@dataclasses.dataclass(frozen=True)
class WorkItem:
  """One image to process: its id, file, grade (-1 = ungraded) and dataset-specific extras."""

  id: str
  path: str
  grade: int = -1
  patient_id: str = ''
  extra: Any = None


def process_fundus(item: WorkItem, image_size: int, btgraham: bool = False,
                   image_format: str = 'jpeg', crop: bool = True) -> dict[str, Any]:
  """Worker: one graded photograph -> a tfds example with the image as encoded bytes."""
  image, _, _ = images.preprocess_fundus(item.path, image_size, crop=crop, btgraham=btgraham)
  return {'image': images.encode(image, image_format), 'label': item.grade, 'id': item.id,
          'patient_id': item.patient_id or item.id}


def generate_examples(items: list[WorkItem], fn: Callable[[WorkItem], dict[str, Any]],
                      report: SkipReport, report_dir: str | os.PathLike | None,
                      num_workers: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
  """Runs `fn` over items in parallel and yields (key, example) for tfds; finishes `report`.

  Examples come back in completion order; tfds sorts them by a hash of the key, so the
  written files do not depend on scheduling.
  """
  desc = f'{report.dataset} {report.split}'
  if not items:
    report.finish(report_dir)  # raises NoUsableDataError with the label-level summary
  for item, example, reason in parallel_map(fn, items, num_workers, desc):
    if example is None:
      report.add(item.id, reason, item.path)
      continue
    report.num_written += 1
    yield item.id, example
  report.finish(report_dir)
