"""benchmarks/bench_end_to_end.py: the real training loop against its step, on tiny shapes."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import bench_end_to_end  # noqa: E402
from drjax.data import augment  # noqa: E402


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp('results')
  payload = bench_end_to_end.main(['--quick', f'--data_dir={out / "data"}', f'--out_dir={out}'])
  return payload, out / 'bench_end_to_end_quick.json'


def test_quick_run_writes_what_it_promises(quick):
  payload, path = quick
  written = json.loads(path.read_text())
  assert written['rows'] == json.loads(json.dumps(payload['rows']))
  assert written['machine']['cpu_count'] >= 1 and 'jax' in written['versions']
  assert written['target_loop_vs_step'] == 0.9
  (row,) = written['rows']
  assert 'error' not in row, row.get('error')
  assert (row['model'], row['precision'], row['batch_size']) == ('densenet_tiny', 'fp32', 8)
  assert (row['stored_size'], row['image_size'], row['device']) == (64, 32, 'cpu')
  assert row['num_train_examples'] == 36  # 48 images, a quarter held out by patient
  assert row['loop_images_per_s'] > 0 and row['step_images_per_s'] > 0
  assert row['loop_vs_step'] == pytest.approx(row['loop_images_per_s'] / row['step_images_per_s'])
  assert row['meets_target'] == (row['loop_vs_step'] >= 0.9)
  assert row['step_images_per_s'] == pytest.approx(
      (row['step_before']['images_per_s'] + row['step_after']['images_per_s']) / 2)
  # Two log intervals of two steps timed, each synchronised with the device at its end.
  assert len(row['loop']['images_per_s_per_log_interval']) == 2
  assert row['loop']['seconds'] > 0 and row['loop']['run_s'] > row['loop']['seconds']
  memory = row['compiled_memory']
  # The step donates its state: XLA writes the new state into the old one's buffers.
  assert 0.9 * memory['output_mib'] < memory['alias_mib'] <= memory['argument_mib']
  assert memory['working_set_mib'] == pytest.approx(
      memory['argument_mib'] + memory['output_mib'] - memory['alias_mib'] + memory['temp_mib'])
  assert '| end-to-end | densenet_tiny | 8 | fp32 |' in written['readme']


def test_the_loop_runs_the_paper_recipe_at_the_benchmark_sizes():
  spec = dict(model='densenet121', precision='bf16', batch_size=64, image_size=224,
              data=dict(dataset='eyepacs', data_dir='/d', manual_dir='/m', stored_size=512),
              val_fraction=0.02, reader_threads=16, reader_processes=2, device_prefetch=2,
              log_every=10, warmup_steps=20, steps=100)
  config = bench_end_to_end.loop_config(spec)
  assert config.augment.to_dict() == augment.default_config().to_dict()  # all of the paper's
  assert (config.optimizer.lr, config.optimizer.schedule) == (1e-4, 'constant')
  assert 'features/denseblock4/denselayer1[4-6]/.*' in config.trainable
  assert (config.input.dataset, config.input.stored_size, config.input.image_size) == (
      'eyepacs', 512, 224)
  assert (config.input.num_workers, config.input.reader_processes) == (16, 2)
  assert config.mixed_precision == 'bfloat16'
  # Evaluation and the checkpoint come after the last timed step.
  assert config.num_steps == config.eval_every == config.checkpoint_every == 130
  assert not config.weights.pretrained and not config.weights.random_init_trains_all


def test_tiny_variants_take_their_smoke_layers():
  config = bench_end_to_end.paper_config('densenet_tiny')
  assert config.model == 'densenet_tiny'
  assert config.trainable == ('classifier/.*', 'features/norm5/.*', 'features/denseblock4/.*')
  with pytest.raises(ValueError, match='neither'):
    bench_end_to_end.paper_config('densenet169')


@pytest.mark.parametrize('flags', [['--steps=15'], ['--warmup_steps=0'], ['--steps=0']])
def test_the_timed_window_is_whole_log_intervals(flags):
  with pytest.raises(SystemExit):
    bench_end_to_end._parse_args(['--log_every=10', *flags])
