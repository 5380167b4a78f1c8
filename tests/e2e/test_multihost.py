"""Two local processes with 2 simulated devices each train exactly like one process with 4."""
import json
import os
import re
import socket

import jax
import numpy as np
import pytest

from configs.smoke import get_config as smoke_config
from kldino.train import Trainer
from tests.helpers import start_kldino, write_folder


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _overrides(root):
  # 129 training images: the two processes' shards (65 and 64) are uneven, and the prior pass's last
  # batch of 48 is padded.
  return [
      '--config=configs/smoke.py',
      '--config.data.name=folder',
      f'--config.data.path={root}',
      '--config.prior_pass_batch_size=48',
      '--config.eval.batch_size=64',
      '--config.data.shards=2',  # the single process reads both shards: the same batches
      # Without batch statistics in the head every parameter has a real gradient: biases
      # before a batch norm get only rounding noise, which Adam turns into full-size steps.
      '--config.model.head_norm=none'
  ]


def _env(devices):
  return {
      'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices} '
                   '--xla_backend_optimization_level=0'
  }


def _launch(workdir, root, devices, extra=()):
  return start_kldino(f'--workdir={workdir}', *_overrides(root), *extra, env=_env(devices))


def _finish(process):
  stdout, stderr = process.communicate(timeout=900)
  assert process.returncode == 0, stderr[-3000:]
  return stdout, stderr


def _config(root):
  config = smoke_config()
  config.data.name, config.data.path = 'folder', root
  config.prior_pass_batch_size, config.eval.batch_size, config.data.shards = 48, 64, 2
  config.model.head_norm = 'none'
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folder'))
  write_folder(root, per_class_train=13)
  os.remove(os.path.join(root, 'train', 'class_0', '0.png'))  # 129 images
  single_dir = str(tmp_path_factory.mktemp('single'))
  multi_dir = str(tmp_path_factory.mktemp('multi'))
  port = _free_port()
  processes = [
      _launch(
          multi_dir, root, 2,
          [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={index}'])
      for index in range(2)
  ]
  multi = [_finish(process) for process in processes]
  single = _finish(_launch(single_dir, root, 4))
  return root, single_dir, single, multi_dir, multi


def _prior_pass_counts(stderr):
  return [
      int(count) for count in re.findall(r'prior pass before epoch \d+: (\d+) examples', stderr)
  ]


def test_two_processes_equal_one_process_with_four_devices(runs):
  root, single_dir, single, multi_dir, multi = runs
  config = _config(root)
  single_state = jax.device_get(Trainer(config, single_dir).restore_or_init())
  multi_state = jax.device_get(Trainer(config, multi_dir).restore_or_init())
  steps = 2 * ((129 // 2) // (32 // 2))  # every process runs the steps of the shorter shard
  assert int(single_state.step) == int(multi_state.step) == steps
  # Equal up to the order of float sums (collectives across processes vs within one): every
  # array within 1% in norm of its own norm. Other batches or another prior would differ by
  # ~100%. (Per element, a near-zero entry whose gradient is mostly rounding noise can move by
  # ~1% of its array's largest entry: Adam scales noise up to a full step.)
  single_leaves = jax.tree_util.tree_leaves_with_path(single_state)
  for (path, single_leaf), multi_leaf in zip(single_leaves, jax.tree.leaves(multi_state)):
    single_leaf, multi_leaf = np.asarray(single_leaf, np.float64), np.asarray(multi_leaf)
    difference = np.linalg.norm(multi_leaf - single_leaf)
    assert difference <= 1e-2 * np.linalg.norm(single_leaf) + 1e-7, (jax.tree_util.keystr(path),
                                                                     difference,
                                                                     np.linalg.norm(single_leaf))
  # Only process 0 prints the JSON line; both runs report the same evaluation.
  assert not [line for line in multi[1][0].splitlines() if line.startswith('{')]
  single_results = json.loads(single[0].strip().splitlines()[-1])
  multi_results = json.loads(multi[0][0].strip().splitlines()[-1])
  assert multi_results['num_train'] == single_results['num_train'] == 129
  assert multi_results['knn_top1'] == pytest.approx(single_results['knn_top1'], abs=1 / 40)


def test_every_prior_pass_counts_each_example_once_across_processes(runs):
  _, _, single, _, multi = runs
  assert _prior_pass_counts(single[1]) == [129, 129]
  assert _prior_pass_counts(multi[0][1]) == [129, 129]  # the sum over both processes' shards


def test_only_process_0_writes_logs(runs):
  _, _, _, multi_dir, _ = runs
  event_files = [f for f in os.listdir(multi_dir) if f.startswith('events.out.tfevents')]
  assert len(event_files) == 1
