"""Checkpoints lose nothing: kill -9 and SIGTERM resume to the uninterrupted result, unreadable
checkpoints fall back, incompatible ones are refused, and any mesh restores any checkpoint."""
import glob
import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from configs.smoke import get_config as smoke_config
from kldino import errors
from kldino.modes import eval as eval_mode
from kldino.modes import export as export_mode
from kldino.modes import features as features_mode
from kldino.modes import export as export_lib
from kldino.errors import ConfigError
from kldino.train import Trainer
from tests.helpers import assert_states_equal, run_kldino, signal_at_log_line, start_kldino

TOTAL_STEPS = 2 * (1347 // 32)  # configs/smoke.py on digits: 2 epochs of 42 steps


def _args(workdir, *args, config='configs/smoke.py'):
  """kldino's arguments: --config (unless None), --workdir, then `args`."""
  return ([f'--config={config}'] if config else []) + [f'--workdir={workdir}', *args]


def _run(workdir, *args, env=None, config='configs/smoke.py'):
  return run_kldino(*_args(workdir, *args, config=config), env=env, check=True)


def _steps(workdir):
  """Committed checkpoint steps (orbax renames a step's directory only once it is complete)."""
  return sorted(
      int(os.path.basename(p))
      for p in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
      if os.path.basename(p).isdigit())


def _start_and_wait_for_step(workdir, min_step):
  process = start_kldino(*_args(workdir))
  deadline = time.time() + 400
  while not any(step >= min_step for step in _steps(workdir)):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)
  return process


def _final_state(workdir, step=TOTAL_STEPS):
  trainer = Trainer(smoke_config(), workdir)
  state = trainer.restore_or_init(step=step)
  return jax.device_get(state)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  result = _run(workdir)
  return workdir, json.loads(result.stdout.strip().splitlines()[-1])


def test_kill_9_then_rerun_ends_bit_identical(uninterrupted, tmp_path):
  reference, reference_results = uninterrupted
  workdir = str(tmp_path / 'killed')
  process = _start_and_wait_for_step(workdir, 20)
  process.kill()  # SIGKILL: no handler runs, an asynchronous save may be cut short
  process.communicate()
  killed_at = max(_steps(workdir))
  assert killed_at < TOTAL_STEPS
  result = _run(workdir)
  assert 'resuming from the checkpoint at step' in result.stderr
  assert_states_equal(_final_state(workdir), _final_state(reference))
  assert json.loads(result.stdout.strip().splitlines()[-1]) == reference_results


def test_sigterm_saves_exits_0_and_resumes_identically(uninterrupted, tmp_path):
  # A second run on the workdir meanwhile is refused: tests/e2e/test_cli.py holds the same lock.
  reference, _ = uninterrupted
  workdir = str(tmp_path / 'preempted')
  process = _start_and_wait_for_step(workdir, 10)
  process.send_signal(signal.SIGTERM)  # at once: the run has 70-odd steps to go
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  assert 'stopped at step' in stderr
  stopped_at = int(stderr.split('stopped at step ')[1].split()[0])
  assert stopped_at in _steps(workdir) and stopped_at < TOTAL_STEPS
  _run(workdir)
  assert_states_equal(_final_state(workdir), _final_state(reference))


def test_sigterm_in_the_final_evaluation_exits_0_and_the_rerun_evaluates(uninterrupted, tmp_path):
  reference, reference_results = uninterrupted
  workdir = str(tmp_path / 'evaluating')
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, 'eval.json'))  # trained to the end, not yet evaluated
  returncode, stdout, stderr = signal_at_log_line(_args(workdir),
                                                  f'the final evaluation of step {TOTAL_STEPS}')
  assert returncode == 0, stderr[-3000:]
  assert (f'stopped on request during the final evaluation; the checkpoint of step {TOTAL_STEPS}'
          ' is saved') in stderr.strip().splitlines()[-1]
  assert not stdout.strip() and not os.path.exists(os.path.join(workdir, 'eval.json'))
  result = _run(workdir)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == reference_results


def _event_files(workdir):
  return sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents*')))


def test_a_finished_run_run_again_repeats_nothing(uninterrupted, tmp_path):
  reference, reference_results = uninterrupted
  workdir = str(tmp_path / 'finished')
  shutil.copytree(reference, workdir)
  events = {path: os.path.getsize(path) for path in _event_files(workdir)}
  result = _run(workdir)
  assert 'the run already ended at step' in result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1]) == reference_results
  # No second evaluation logged (nor any other event), no training.
  assert {path: os.path.getsize(path) for path in _event_files(workdir)} == events
  assert 'resuming from the checkpoint' in result.stderr and ' | loss ' not in result.stderr
  # Its config still has to fit the checkpoint, as when resuming.
  refused = run_kldino(*_args(workdir, '--config.model.num_prototypes=32'), timeout=300)
  assert refused.returncode == errors.UsageError.exit_code, refused.stderr[-3000:]
  assert 'model.num_prototypes=16 (now 32)' in refused.stderr.strip().splitlines()[-1]


_PAGE = 4096  # tmpfs allocates whole pages for each file's data


def _disk_bytes(path):
  """What the files under `path` take on a tmpfs."""
  return sum(-(-os.path.getsize(os.path.join(root, name)) // _PAGE) * _PAGE
             for root, _, names in os.walk(path)
             for name in names)


def _mount_tmpfs(disk, size_bytes):
  return subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={-(-size_bytes // 1024)}k', 'tmpfs',
       str(disk)],
      capture_output=True,
      check=False).returncode == 0


@pytest.fixture
def small_disk(uninterrupted, tmp_path):
  """A file system (tmpfs) with room for the run's files and one and a half checkpoints, sized
  from the uninterrupted run: the first checkpoint commits, the second cannot, whatever the
  device count, orbax's layout or the page size. Yields (the disk, a size that holds the run)."""
  reference, _ = uninterrupted
  steps = [os.path.join(reference, 'checkpoints', str(step)) for step in _steps(reference)]
  checkpoint = max(_disk_bytes(step) for step in steps)
  others = _disk_bytes(reference) - sum(_disk_bytes(step) for step in steps)
  disk = tmp_path / 'disk'
  disk.mkdir()
  if not _mount_tmpfs(disk, others + checkpoint * 3 // 2):
    pytest.skip('mounting a small tmpfs needs root (CAP_SYS_ADMIN)')
  yield disk, 2 * _disk_bytes(reference)
  subprocess.run(['umount', str(disk)], check=False)


def test_full_disk_stops_with_one_line_and_resumes_identically(uninterrupted, small_disk):
  reference, reference_results = uninterrupted
  disk, room = small_disk
  workdir = str(disk / 'run')
  result = run_kldino(*_args(workdir))
  assert result.returncode == errors.WriteFailed.exit_code, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and 'Exception in thread' not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('kldino: ') and ('No space left on device' in line or 'no space' in line)
  committed = _steps(workdir)
  assert committed and max(committed) < TOTAL_STEPS, line
  assert f'step {max(committed)}, is intact' in line or 'no space left' in line
  subprocess.run(['mount', '-o', f'remount,size={-(-room // 1024)}k', str(disk)], check=True)
  result = _run(workdir)
  assert f'resuming from the checkpoint at step {max(committed)}' in result.stderr
  assert_states_equal(_final_state(workdir), _final_state(reference))
  assert json.loads(result.stdout.strip().splitlines()[-1]) == reference_results


def test_a_disk_full_before_the_first_checkpoint_says_nothing_was_committed(
    uninterrupted, tmp_path):
  """A disk with no room for one checkpoint: the line says nothing was committed and what to
  free."""
  reference, _ = uninterrupted
  steps = [os.path.join(reference, 'checkpoints', str(step)) for step in _steps(reference)]
  others = _disk_bytes(reference) - sum(_disk_bytes(step) for step in steps)
  disk = tmp_path / 'disk'
  disk.mkdir()
  if not _mount_tmpfs(disk, others + min(_disk_bytes(step) for step in steps) // 4):
    pytest.skip('mounting a small tmpfs needs root (CAP_SYS_ADMIN)')
  try:
    result = run_kldino(*_args(str(disk / 'run')))
  finally:
    subprocess.run(['umount', str(disk)], check=False)
  assert result.returncode == errors.WriteFailed.exit_code, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert 'step None' not in line
  assert 'no checkpoint was committed yet' in line, line


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(reference, workdir)
  steps = _steps(workdir)
  latest, previous = steps[-1], steps[-2]
  for path in glob.glob(os.path.join(workdir, 'checkpoints', str(latest), 'state', '**', '*'),
                        recursive=True):
    if os.path.isfile(path):
      with open(path, 'wb'):  # truncate: a disk that lost the data
        pass
  # An interrupted save leaves only a temporary directory: never a candidate.
  os.makedirs(os.path.join(workdir, 'checkpoints', f'{latest + 1}.orbax-checkpoint-tmp-1'))
  state = _final_state(workdir, step=None)
  assert int(state.step) == previous
  assert_states_equal(state, _final_state(reference, step=previous))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_unreadable', str(latest)))
  assert latest not in _steps(workdir)


@pytest.mark.parametrize('key, value, fragment', [
    ('model.num_prototypes', 32, 'model.num_prototypes=16 (now 32)'),
    ('model.name', 'vit_micro', "model.name='vit_nano' (now 'vit_micro')"),
    ('batch_size', 16, 'batch_size=32 (now 16)'),
    ('data.shuffle', 'buffer', "data.shuffle='permutation' (now 'buffer')"),
])
def test_incompatible_config_is_refused(uninterrupted, key, value, fragment):
  reference, _ = uninterrupted
  config = smoke_config()
  parent, _, leaf = key.rpartition('.')
  (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ConfigError,
                     match='its parameters have other shapes|its data position') as error:
    Trainer(config, reference).restore_or_init()
  assert fragment in str(error.value) and '\n' not in str(error.value)


def test_eval_mode_on_one_device_restores_an_8_device_checkpoint(uninterrupted, tmp_path):
  reference, reference_results = uninterrupted
  one_device = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  output = str(tmp_path / 'eval.json')
  result = _run(reference, '--mode=eval', f'--output={output}', env=one_device, config=None)
  results = json.loads(result.stdout.strip().splitlines()[-1])
  with open(output) as f:
    assert json.load(f) == results
  assert results['step'] == TOTAL_STEPS
  # The same teacher on 1 device: the same k-NN (features agree to float rounding).
  assert abs(results['knn_top1'] - reference_results['knn_top1']) <= 1 / 450 + 1e-9
  assert abs(results['cluster_mi'] - reference_results['cluster_mi']) < 1e-3


def test_features_and_export_agree(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  config = smoke_config()
  images = np.random.default_rng(0).standard_normal((11, 16, 16, 1)).astype(np.float32)
  inputs = str(tmp_path / 'x.npy')
  np.save(inputs, images)
  dumped = features_mode.run(config,
                             reference,
                             step=None,
                             output=str(tmp_path / 'f.npy'),
                             split=None,
                             inputs=inputs)
  exported = export_mode.run(config, reference, step=None, output=str(tmp_path / 'backbone.npz'))
  assert dumped['step'] == exported['step'] == TOTAL_STEPS
  backbone, meta = export_lib.load_backbone(exported['export'])
  assert meta['feature_dim'] == dumped['feature_dim'] == 32
  np.testing.assert_allclose(np.asarray(backbone(images)),
                             np.load(dumped['features']),
                             atol=1e-5,
                             rtol=1e-5)
  split = features_mode.run(config,
                            reference,
                            step=None,
                            output=str(tmp_path / 't.npy'),
                            split='test',
                            inputs=None)
  labels = np.load(split['labels'])
  assert np.load(split['features']).shape == (450, 32) and labels.shape == (450,)
  assert set(labels.tolist()) == set(range(10))


def test_bad_inputs_are_refused_in_one_line(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  bad = str(tmp_path / 'bad.npy')
  np.save(bad, np.zeros((2, 16, 16, 3), np.float64))
  with pytest.raises(ConfigError, match=r'float32 \[N, H, W, 1\]'):
    features_mode.run(smoke_config(), reference, step=None, output=None, split=None, inputs=bad)
  with pytest.raises(ConfigError, match='no checkpoint at step 5'):
    eval_mode.run(smoke_config(), reference, step=5, output=None)
