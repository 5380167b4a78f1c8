"""Features and labels of a whole evaluation set, gathered to host numpy arrays.

The input pipeline pads the last batch (and gives processes with fewer examples all-masked
batches) and marks padding rows with mask False; those rows are dropped here, in order.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def to_host(array) -> np.ndarray:
  """The whole array on the host; a global array spanning several processes is gathered first."""
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def extract_features(feature_fn, batches) -> tuple[np.ndarray, np.ndarray]:
  """(features float32 [N, D], labels int32 [N]) of the unmasked rows of every batch, in order.

  feature_fn maps a batch (the whole dict: a model with batch statistics also needs the mask) to
  [b, D] features. Pass the batches in the same form as
  feature_fn's output (all process-local, or all global arrays), so that rows line up.
  """
  features, labels = [], []
  for batch in batches:
    batch_features = to_host(feature_fn(batch))
    batch_labels = to_host(batch['label'])
    keep = to_host(batch['mask']).astype(bool)
    if not batch_features.shape[0] == batch_labels.shape[0] == keep.shape[0]:
      raise ValueError(f'batch rows differ: features {batch_features.shape[0]}, labels '
                       f'{batch_labels.shape[0]}, mask {keep.shape[0]}')
    features.append(batch_features[keep].astype(np.float32))
    labels.append(batch_labels[keep].astype(np.int32))
  if not features:
    raise ValueError('batches yielded no batch')
  return np.concatenate(features), np.concatenate(labels)
