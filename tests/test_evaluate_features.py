"""extract_features: masked rows dropped, order kept, host numpy output, across processes too.

Run as a script, this file is one process of the two-process test below.
"""
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kldino.evaluate import extract_features

ROWS_PER_PROCESS = 4


def make_batches(masks):
  start = 0
  for mask in masks:
    ids = np.arange(start, start + len(mask))
    start += len(mask)
    yield {'image': np.repeat(ids[:, None], 3, axis=1).astype(np.float32),
           'label': ids % 5, 'mask': np.asarray(mask)}


def test_drops_masked_rows_and_keeps_order():
  feature_fn = jax.jit(
      lambda batch: jnp.stack([batch['image'][:, 0], -batch['image'][:, 1]], axis=1))
  masks = [[True, False, True, True], [False, False, False, False], [True, True, False, False]]
  features, labels = extract_features(feature_fn, make_batches(masks))
  kept_ids = np.flatnonzero(np.concatenate(masks))
  assert isinstance(features, np.ndarray) and features.dtype == np.float32
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(features, np.stack([kept_ids, -kept_ids], axis=1))
  np.testing.assert_array_equal(labels, kept_ids % 5)


def test_rejects_misaligned_rows():
  with pytest.raises(ValueError, match='rows differ'):
    extract_features(lambda batch: batch['image'][:2], make_batches([[True, True, True]]))


def global_batches(process_id, sharding):
  """3 global batches of 8 rows (row id = global position); multiples of 3 are padding, and
  process 1 has run out of data in the last batch."""
  for step in range(3):
    ids = np.arange(2 * ROWS_PER_PROCESS * step, 2 * ROWS_PER_PROCESS * (step + 1))
    local_ids = ids[process_id * ROWS_PER_PROCESS:(process_id + 1) * ROWS_PER_PROCESS]
    mask = (local_ids % 3 != 0) & ~(step == 2 and process_id == 1)
    local = {'image': local_ids[:, None].astype(np.float32), 'label': local_ids, 'mask': mask}
    yield jax.tree.map(
        lambda part: jax.make_array_from_process_local_data(sharding, part), local)


def run_process(port, process_id):
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id)
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  feature_fn = jax.jit(lambda batch: 10 * batch['image'], out_shardings=sharding)
  features, labels = extract_features(feature_fn, global_batches(process_id, sharding))
  print('labels', labels.tolist(), 'features', (features[:, 0] / 10).astype(int).tolist())


def free_port():
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def test_gathers_global_arrays_across_processes():
  port = free_port()
  # Two devices per process, so that each process also holds several shards of every batch.
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  workers = [subprocess.Popen([sys.executable, __file__, str(port), str(process_id)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for process_id in range(2)]
  try:
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
  finally:
    for worker in workers:
      worker.kill()
  expected = [i for i in range(24) if i % 3 and not 20 <= i < 24]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output
    assert f'labels {expected} features {expected}' in output


if __name__ == '__main__':
  run_process(port=int(sys.argv[1]), process_id=int(sys.argv[2]))
