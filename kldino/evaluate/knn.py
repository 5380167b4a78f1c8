"""Weighted k-NN classification on frozen features, as in DINO's eval_knn.

Features are L2-normalised, similarities are cosines, the k most similar train rows vote for
their labels with weight exp(sim / temperature), and the class with the largest summed vote wins.

Neither the query set nor the train bank has to fit in one device computation: queries are
processed in chunks of at most `query_chunk` rows and the bank in chunks of at most `bank_chunk`
rows, keeping the best k (similarity, label) pairs of every query across bank chunks. All chunks
of a kind have one shape (the last is padded), so that the kernels compile once per call.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _l2_normalise(x):
  # The floor keeps all-zero rows (chunk padding) at zero instead of NaN.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


@functools.partial(jax.jit, static_argnames=('k',))
def _merge_bank_chunk(best_sims, best_labels, queries, bank, bank_labels, valid_rows, *, k):
  """Merge one bank chunk into the running best k (sim, label) pairs of a query chunk."""
  sims = _l2_normalise(queries) @ _l2_normalise(bank).T
  is_real_row = jnp.arange(bank.shape[0]) < valid_rows
  sims = jnp.where(is_real_row[None, :], sims, -jnp.inf)
  chunk_sims, chunk_rows = jax.lax.top_k(sims, min(k, bank.shape[0]))
  candidate_sims = jnp.concatenate([best_sims, chunk_sims], axis=1)
  candidate_labels = jnp.concatenate([best_labels, bank_labels[chunk_rows]], axis=1)
  best_sims, best_positions = jax.lax.top_k(candidate_sims, k)
  return best_sims, jnp.take_along_axis(candidate_labels, best_positions, axis=1)


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _vote(best_sims, best_labels, temperature, *, num_classes):
  # Subtracting each query's largest similarity rescales its votes by a common factor, which
  # leaves the argmax unchanged and keeps exp() finite at small temperatures.
  weights = jnp.exp((best_sims - best_sims[:, :1]) / temperature)
  votes = jnp.sum(jax.nn.one_hot(best_labels, num_classes) * weights[..., None], axis=1)
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)


def _balanced_chunk(num_rows: int, max_chunk: int) -> int:
  """The smallest chunk size that needs as few chunks as max_chunk does.

  Padding then wastes less than one row per chunk, instead of up to a whole chunk (e.g. a bank of
  70k rows in two chunks of 35k, not two of 65536).
  """
  num_chunks = -(-num_rows // max_chunk)
  return -(-num_rows // num_chunks)


def _padded_chunks(array, chunk: int):
  """(chunk, number of real rows) pairs; the last chunk is zero-padded to `chunk` rows."""
  for start in range(0, array.shape[0], chunk):
    part = array[start:start + chunk]
    padding = [(0, chunk - part.shape[0])] + [(0, 0)] * (array.ndim - 1)
    yield np.pad(part, padding), part.shape[0]


def _check_inputs(train_features, train_labels, query_features, num_classes, k, temperature,
                  query_chunk, bank_chunk):
  if train_features.ndim != 2 or query_features.ndim != 2:
    raise ValueError(f'features must be 2-D, got train {train_features.shape} and query '
                     f'{query_features.shape}')
  if train_features.shape[1] != query_features.shape[1]:
    raise ValueError(f'train features have {train_features.shape[1]} dims, query features '
                     f'{query_features.shape[1]}')
  if query_features.shape[0] == 0:
    raise ValueError('query_features has no rows')
  if train_labels.shape != train_features.shape[:1]:
    raise ValueError(f'train_labels shape {train_labels.shape} does not match '
                     f'{train_features.shape[0]} train rows')
  if not 1 <= k <= train_features.shape[0]:
    raise ValueError(f'k={k} must be between 1 and the {train_features.shape[0]} train rows')
  if num_classes < 1 or train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f'train labels must lie in [0, num_classes={num_classes})')
  if temperature <= 0:
    raise ValueError(f'temperature={temperature} must be positive')
  if query_chunk < 1 or bank_chunk < 1:
    raise ValueError(f'query_chunk={query_chunk} and bank_chunk={bank_chunk} must be >= 1')


def knn_predict(train_features, train_labels, query_features, *, num_classes: int, k: int = 20,
                temperature: float = 0.07, query_chunk: int = 1024,
                bank_chunk: int = 65536) -> np.ndarray:
  """Predicted class (int32) of every query row by temperature-weighted k-NN over the bank."""
  train_features = np.asarray(train_features, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  query_features = np.asarray(query_features, np.float32)
  _check_inputs(train_features, train_labels, query_features, num_classes, k, temperature,
                query_chunk, bank_chunk)
  query_chunk = _balanced_chunk(query_features.shape[0], query_chunk)
  bank_chunk = _balanced_chunk(train_features.shape[0], bank_chunk)
  query_chunks = [jnp.asarray(chunk) for chunk, _ in _padded_chunks(query_features, query_chunk)]
  running = [(jnp.full((query_chunk, k), -jnp.inf), jnp.zeros((query_chunk, k), jnp.int32))
             for _ in query_chunks]
  # Bank chunks are the outer loop so that each crosses to the device once.
  for (bank, valid_rows), (bank_labels, _) in zip(_padded_chunks(train_features, bank_chunk),
                                                 _padded_chunks(train_labels, bank_chunk)):
    bank, bank_labels = jnp.asarray(bank), jnp.asarray(bank_labels)
    running = [_merge_bank_chunk(*best, queries, bank, bank_labels, valid_rows, k=k)
               for best, queries in zip(running, query_chunks)]
  predictions = [_vote(*best, temperature, num_classes=num_classes) for best in running]
  return np.concatenate(jax.device_get(predictions))[:query_features.shape[0]]


def knn_accuracy(train_features, train_labels, query_features, query_labels, *,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 query_chunk: int = 1024, bank_chunk: int = 65536) -> float:
  """Fraction of query rows whose k-NN prediction equals their label."""
  query_labels = np.asarray(query_labels)
  if query_labels.shape != np.shape(query_features)[:1]:
    raise ValueError(f'query_labels shape {query_labels.shape} does not match the query rows')
  predictions = knn_predict(train_features, train_labels, query_features,
                            num_classes=num_classes, k=k, temperature=temperature,
                            query_chunk=query_chunk, bank_chunk=bank_chunk)
  return float(np.mean(predictions == query_labels))
