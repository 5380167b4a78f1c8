"""kldino/runtime/distributed.py: a cluster is detected from its environment, and partial flags are
refused. (Two processes that train as one: tests/e2e/test_multihost.py.)"""
import pytest

from kldino.runtime import distributed


def test_cluster_detection_and_partial_flags():
  assert distributed.cluster_detected({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}) == 'tpu'
  assert distributed.cluster_detected({'TPU_WORKER_HOSTNAMES': 'localhost'}) is None
  assert distributed.cluster_detected({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}) == 'slurm'
  assert distributed.cluster_detected({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert distributed.initialize(None, None, None, environ={}) == 'single process'
  with pytest.raises(ValueError, match='go together'):
    distributed.initialize('localhost:1234', 2, None, environ={})
  with pytest.raises(ValueError, match=r'--process_id=2 must be in \[0, 2\)'):
    distributed.initialize('localhost:1234', 2, 2, environ={})
