"""Feature banks: the features of every example of a split, kept sharded over the mesh.

One jitted pass over a split's evaluation batches (each example once, padding masked) yields the
features of each batch as a global array whose rows are spread over the devices. The bank joins
those batches *on each device*: device d keeps the rows it computed, so nothing moves between
devices or to a host, and no host ever holds the whole bank. The bank's row order is therefore
device-major, not the split's order; its labels and validity mask are joined the same way, so
rows still line up, which is all that k-NN and the cluster statistics need.

The same pass can reduce the teacher's cluster statistics on device (sums over the split, as the
prior pass of kldino/prior.py does): sum_i p(k|x_i), sum_i H(p(.|x_i)) and the count, from which
`cluster_mi` = H(mean p) - mean H(p) and `effective_clusters` = exp H(mean p). The [B, K]
posteriors of one batch are the largest array that ever exists: never [N, K].
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from kldino.core import objective


@dataclasses.dataclass(frozen=True)
class FeatureBank:
  features: jax.Array  # float32 [R, F], rows sharded over the mesh (R >= the split's examples)
  labels: jax.Array  # int32 [R], rows as `features`
  valid: jax.Array  # bool [R]: False for padding rows, which must never count
  num_examples: int  # valid rows
  num_batches: int  # batches joined (to restore the split's order on the host)

  @property
  def feature_dim(self) -> int:
    return int(self.features.shape[1])


def init_cluster_sums(num_prototypes: int) -> dict:
  return {
      'prob_sum': jnp.zeros((num_prototypes,), jnp.float32),
      'entropy_sum': jnp.zeros((), jnp.float32),
      'count': jnp.zeros((), jnp.float32)
  }


def add_cluster_sums(sums: dict, logits, mask, teacher_temp) -> dict:
  """`sums` plus one masked batch of teacher logits [B, K] (posterior softmax(t / tau_t))."""
  weight = mask.astype(jnp.float32)
  probs = jax.nn.softmax(logits / teacher_temp, axis=-1)
  return {
      'prob_sum': sums['prob_sum'] + jnp.sum(weight[:, None] * probs, axis=0),
      'entropy_sum': sums['entropy_sum'] + jnp.sum(weight * objective.entropy(probs)),
      'count': sums['count'] + jnp.sum(weight)
  }


def cluster_statistics(sums: dict) -> dict:
  """{'cluster_mi', 'effective_clusters'} from the sums over a split (host floats)."""
  sums = jax.device_get(sums)
  mean_posterior = sums['prob_sum'] / sums['count']
  marginal_entropy = float(objective.entropy(jnp.asarray(mean_posterior)))
  return {
      'cluster_mi': marginal_entropy - float(sums['entropy_sum'] / sums['count']),
      'effective_clusters': float(np.exp(marginal_entropy))
  }


def join_on_devices(arrays: list[jax.Array]) -> jax.Array:
  """Global arrays [b, ...] sharded over their rows -> one [n * b, ...] global array with the same
  kind of sharding, each device's block made of its own rows of every input (no transfer)."""
  first = arrays[0]
  per_device = {}
  for array in arrays:
    for shard in array.addressable_shards:
      per_device.setdefault(shard.device, []).append(shard.data)
  joined = [
      jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
      for parts in per_device.values()
  ]
  shape = (first.shape[0] * len(arrays), *first.shape[1:])
  return jax.make_array_from_single_device_arrays(shape, first.sharding, joined)


def build_bank(batch_features: Callable, batches: Iterable[dict]) -> FeatureBank:
  """The bank of global batches {'image', 'label', 'mask'}; `batch_features(batch)` -> [b, F]
  with the batch's row sharding."""
  features, labels, valid = [], [], []
  for batch in batches:
    features.append(batch_features(batch))
    labels.append(batch['label'])
    valid.append(batch['mask'])
  if not features:
    raise ValueError('the split yielded no batch')
  valid_bank = join_on_devices(valid)
  return FeatureBank(features=join_on_devices(features),
                     labels=join_on_devices(labels),
                     valid=valid_bank,
                     num_examples=int(jnp.sum(valid_bank)),
                     num_batches=len(features))


def to_host(array) -> np.ndarray:
  """The whole array on this host; a global array spanning several processes is gathered."""
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def _split_order(rows: np.ndarray, bank: FeatureBank) -> np.ndarray:
  """Host rows of a bank (device-major) back in the order of the batches they came from."""
  blocks = len(bank.features.sharding.device_set)
  per_block = rows.shape[0] // (blocks * bank.num_batches)
  by_block = rows.reshape(blocks, bank.num_batches, per_block, *rows.shape[1:])
  return by_block.swapaxes(0, 1).reshape(rows.shape)


def host_features(bank: FeatureBank) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, F], labels [N]) of the valid rows on every host, in the split's order: for
  the consumers that need host arrays (the feature probe, --mode=features); they bound N * F."""
  keep = _split_order(to_host(bank.valid), bank).astype(bool)
  features = _split_order(to_host(bank.features), bank)[keep]
  return features.astype(np.float32), _split_order(to_host(bank.labels),
                                                   bank)[keep].astype(np.int32)
