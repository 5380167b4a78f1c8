"""Feature banks across processes: two processes' banks come back to each host in the split's order
(kldino/evaluate/bank.py).

Run as a script, this file is one process of the two-process test below.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from kldino.core import sharding
from kldino.evaluate import bank as bank_lib
from tests.evaluate.test_bank import _mesh
from tests.helpers import REPO

ROWS_PER_PROCESS = 8


def run_process(port, process_id):
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=2,
                             process_id=process_id)
  mesh = _mesh()
  batches = []
  for step in range(3):
    ids = np.arange(2 * ROWS_PER_PROCESS * step, 2 * ROWS_PER_PROCESS * (step + 1))
    local_ids = ids[process_id * ROWS_PER_PROCESS:(process_id + 1) * ROWS_PER_PROCESS]
    # Multiples of 3 are padding, and process 1 has run out of data in the last batch.
    mask = (local_ids % 3 != 0) & ~(step == 2 and process_id == 1)
    local = {
        'image': local_ids[:, None].astype(np.float32),
        'label': local_ids.astype(np.int32),
        'mask': mask
    }
    batches.append(sharding.global_batch(local, mesh))
  bank = bank_lib.build_bank(lambda batch: 10 * batch['image'], batches)
  features, labels = bank_lib.host_features(bank)
  print('labels', labels.tolist(), 'features', (features[:, 0] / 10).astype(int).tolist())


def free_port():
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def test_host_features_gather_across_processes():
  port = free_port()
  # Two devices per process, so that each process also holds several blocks of the bank.
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  workers = [
      subprocess.Popen([sys.executable, __file__,
                        str(port), str(process_id)],
                       env=env,
                       stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT,
                       text=True) for process_id in range(2)
  ]
  try:
    outputs = [worker.communicate(timeout=180)[0] for worker in workers]
  finally:
    for worker in workers:
      worker.kill()
  expected = [i for i in range(48) if i % 3 and not 40 <= i < 48]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output
    assert f'labels {expected} features {expected}' in output


if __name__ == '__main__':
  run_process(port=int(sys.argv[1]), process_id=int(sys.argv[2]))
