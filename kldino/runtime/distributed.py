"""Multi-process start-up: `jax.distributed.initialize` from explicit flags or the cluster.

Explicit (`--coordinator_address`, `--num_processes`, `--process_id`): any cluster, and several
processes on one machine for tests. Otherwise JAX's own cluster detection is used when the
environment is a multi-host TPU VM slice or a SLURM job with several tasks; a single host runs as
one process without the distributed service.
"""
from __future__ import annotations

import os

import jax
from absl import logging


def cluster_detected(environ=os.environ) -> str | None:
  """The kind of multi-process environment we run in, if any."""
  if len(environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    return 'tpu'
  if environ.get('SLURM_JOB_ID') and int(environ.get('SLURM_NTASKS', '1')) > 1:
    return 'slurm'
  return None


def initialize(coordinator_address: str | None,
               num_processes: int | None,
               process_id: int | None,
               environ=os.environ) -> str:
  """Start JAX's distributed runtime if needed (before any JAX computation); says how."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together: '
                       'pass all three (or none, to auto-detect TPU VMs and SLURM)')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, {num_processes})')
    jax.distributed.initialize(coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    how = 'explicit'
  else:
    how = cluster_detected(environ)
    if how is None:
      return 'single process'
    jax.distributed.initialize()  # JAX reads the TPU / SLURM environment itself
  logging.info('distributed (%s): process %d of %d, %d local of %d devices',
               how, jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return how
