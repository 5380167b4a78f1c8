"""The device mesh, the partitioning rule, and global batches from process-local data.

One mesh with axes ('data', 'fsdp') over all devices of all processes. The batch is sharded over
both axes; every array of the train state (parameters, optimizer moments, normalisation state)
is sharded over 'fsdp' along its largest divisible dimension when it is big enough, and
replicated otherwise. The rule looks only at shapes, so the optimizer state, whose moments have
the parameters' shapes, is partitioned exactly like the parameters.
"""
from __future__ import annotations

import collections
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  fsdp = mesh_config.fsdp
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be >= 1 and divide the {len(devices)} devices')
  return jax.make_mesh((len(devices) // fsdp, fsdp),
                       BATCH_AXES,
                       axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
  """Shard the largest dimension divisible by the fsdp group; small arrays stay replicated."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      return P(*[None] * dim, 'fsdp')
  return P()


def state_shardings(abstract_state, mesh, min_size: int):
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size, min_size)),
                      abstract_state)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh) -> dict:
  """Assemble the global batch from each process's local part (axis 0 is the batch)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda local: jax.make_array_from_process_local_data(sharding, local),
                      local_batch)


def prefetch_global_batches(local_batches: Iterable[dict], mesh, depth: int = 2) -> Iterator[dict]:
  """Global batches, `depth` ahead of the consumer: their host-to-device copies (asynchronous in
  JAX) overlap the steps that run meanwhile."""
  queue = collections.deque()
  for local_batch in local_batches:
    queue.append(global_batch(local_batch, mesh))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
