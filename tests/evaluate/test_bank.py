"""Feature banks: joined on each device without moving rows, back in the split's order on the
host (masked rows dropped); cluster statistics against numpy. (Across processes:
tests/e2e/test_bank.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kldino.core import sharding
from kldino.evaluate import bank as bank_lib


def _mesh(devices=None):
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices), 1),
                       sharding.BATCH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def _global_batches(masks, mesh):
  """Batches whose row i of batch j has id = running position; features [id, -id]."""
  start, batches = 0, []
  for mask in masks:
    ids = np.arange(start, start + len(mask))
    start += len(mask)
    local = {
        'image': np.stack([ids, -ids], axis=1).astype(np.float32),
        'label': (ids % 5).astype(np.int32),
        'mask': np.asarray(mask)
    }
    batches.append(sharding.global_batch(local, mesh))
  return batches


def test_bank_keeps_rows_on_their_devices_and_host_order_is_the_splits():
  mesh = _mesh()
  rng = np.random.default_rng(0)
  masks = [rng.random(16) < 0.7 for _ in range(5)]
  batches = _global_batches(masks, mesh)
  bank = bank_lib.build_bank(lambda batch: batch['image'] * 1.0, batches)
  assert bank.features.shape == (80, 2) and bank.num_batches == 5
  assert bank.num_examples == int(np.sum(np.concatenate(masks)))
  # Each device's block holds exactly the rows it computed, batch after batch.
  for shard in bank.features.addressable_shards:
    expected = np.concatenate([
        np.asarray(s.data)
        for batch in batches
        for s in batch['image'].addressable_shards
        if s.device == shard.device
    ])
    np.testing.assert_array_equal(np.asarray(shard.data), expected)
  features, labels = bank_lib.host_features(bank)
  kept = np.flatnonzero(np.concatenate(masks))
  np.testing.assert_array_equal(features, np.stack([kept, -kept], axis=1))
  np.testing.assert_array_equal(labels, kept % 5)
  assert features.dtype == np.float32 and labels.dtype == np.int32


def test_empty_split_is_refused():
  with pytest.raises(ValueError, match='no batch'):
    bank_lib.build_bank(lambda batch: batch['image'], [])


def test_cluster_statistics_equal_numpy():
  rng = np.random.default_rng(1)
  temperature, num_prototypes = 0.1, 12
  batches = [(rng.standard_normal((8, num_prototypes)).astype(np.float32), rng.random(8) < 0.8)
             for _ in range(3)]
  sums = bank_lib.init_cluster_sums(num_prototypes)
  for logits, mask in batches:
    sums = bank_lib.add_cluster_sums(sums, jnp.asarray(logits), jnp.asarray(mask), temperature)
  stats = bank_lib.cluster_statistics(sums)
  logits = np.concatenate([chunk for chunk, _ in batches
                          ])[np.concatenate([mask for _, mask in batches])]
  z = logits.astype(np.float64) / temperature
  probs = np.exp(z - z.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  mean = probs.mean(axis=0)
  marginal = -np.sum(mean * np.log(mean))
  conditional = -np.mean(np.sum(probs * np.log(probs), axis=1))
  assert stats['cluster_mi'] == pytest.approx(marginal - conditional, abs=1e-5)
  assert stats['effective_clusters'] == pytest.approx(np.exp(marginal), rel=1e-5)
