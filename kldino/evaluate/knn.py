"""Weighted k-NN classification on frozen features, as in DINO's eval_knn.

Features are L2-normalised, similarities are cosines, the k most similar bank rows vote for their
labels with weight exp(sim / temperature), and the class with the largest summed vote wins.
The bank stays sharded over the mesh (no device or host holds more than its block; padding rows
never vote): one jitted `shard_map` gathers each chunk of queries on every device, scores it
against the device's own rows, merges the devices' top max(ks) lists with one all-to-all and
votes for every k of `ks` (docs/evaluation.md, "The sharded k-NN"). Shapes are static, so it
compiles once per input shape. `knn_predict` and `knn_accuracy` take host numpy arrays.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kldino.core import sharding

_AXES = sharding.BATCH_AXES


def _l2_normalise(x):
  # The floor keeps all-zero rows (padding) at zero instead of NaN.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _balanced_chunk(num_rows: int, max_chunk: int) -> int:
  """The smallest chunk size that needs as few chunks as max_chunk does.

  The last chunk then overlaps the previous one by less than one row per chunk, instead of by up
  to a whole chunk (e.g. a bank of 70k rows in two chunks of 35k, not two of 65536).
  """
  num_chunks = -(-num_rows // max_chunk)
  return -(-num_rows // num_chunks)


def _local_top_k(queries, bank, labels, valid, *, k: int, bank_chunk: int):
  """The best k (similarity, label) pairs of every query among this device's bank rows.

  The bank is read in chunks of `bank_chunk` rows. The last chunk starts early enough to end at the
  last row (so no padded copy of the bank is made); rows it shares with the previous chunk are
  masked, so every row is scored exactly once. Invalid and masked rows get similarity -inf.
  """
  num_rows = bank.shape[0]
  queries = _l2_normalise(queries.astype(jnp.float32))

  def step(best, chunk_index):
    best_sims, best_labels = best
    fresh_from = chunk_index * bank_chunk
    start = jnp.minimum(fresh_from, num_rows - bank_chunk)
    rows = jax.lax.dynamic_slice_in_dim(bank, start, bank_chunk)
    keep = jax.lax.dynamic_slice_in_dim(
        valid, start, bank_chunk).astype(bool) & (start + jnp.arange(bank_chunk) >= fresh_from)
    row_labels = jnp.where(keep, jax.lax.dynamic_slice_in_dim(labels, start, bank_chunk), 0)
    rows = _l2_normalise(rows.astype(jnp.float32))
    sims = jnp.matmul(queries, rows.T, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(keep[None, :], sims, -jnp.inf)
    chunk_sims, chunk_rows = jax.lax.top_k(sims, min(k, bank_chunk))
    candidate_sims = jnp.concatenate([best_sims, chunk_sims], axis=1)
    candidate_labels = jnp.concatenate(
        [best_labels, row_labels.astype(jnp.int32)[chunk_rows]], axis=1)
    best_sims, positions = jax.lax.top_k(candidate_sims, k)
    return (best_sims, jnp.take_along_axis(candidate_labels, positions, axis=1)), None

  init = (jnp.full((queries.shape[0], k), -jnp.inf,
                   jnp.float32), jnp.zeros((queries.shape[0], k), jnp.int32))
  init = jax.lax.pcast(init, _AXES, to='varying')
  num_chunks = -(-num_rows // bank_chunk)
  best, _ = jax.lax.scan(step, init, jnp.arange(num_chunks))
  return best


def _votes(best_sims, best_labels, temperature, *, ks, num_classes: int):
  """[len(ks), queries] int32 predictions from each query's sorted top max(ks) list."""
  # Subtracting each query's largest similarity rescales its votes by a common factor, which
  # leaves the argmax unchanged and keeps exp() finite at small temperatures. -inf similarities
  # (invalid rows; only possible beyond the valid-row count) weigh exactly 0, never NaN.
  finite = jnp.isfinite(best_sims)
  shifted = jnp.where(finite, best_sims - best_sims[:, :1], 0.0)
  weights = jnp.where(finite, jnp.exp(shifted / temperature), 0.0)
  query_index = jnp.arange(best_sims.shape[0])[:, None]
  predictions = []
  for k in ks:
    votes = jnp.zeros((best_sims.shape[0], num_classes), weights.dtype)
    votes = votes.at[query_index, best_labels[:, :k]].add(weights[:, :k])
    predictions.append(jnp.argmax(votes, axis=-1).astype(jnp.int32))
  return jnp.stack(predictions)


def _device_predictions(bank, labels, valid, queries, temperature, *, ks, num_classes: int,
                        rows_per_device: int, bank_chunk: int, num_devices: int):
  """Per-device body: predictions [len(ks), local queries] for this device's query rows."""
  k = max(ks)
  num_queries = queries.shape[0]

  def one_chunk(chunk_index, predictions):
    # The last chunk ends at the last row; the rows it recomputes get identical predictions.
    start = jnp.minimum(chunk_index * rows_per_device, num_queries - rows_per_device)
    own = jax.lax.dynamic_slice_in_dim(queries, start, rows_per_device)
    chunk = jax.lax.all_gather(own, _AXES, tiled=True)  # Device d's rows at [d*m, (d+1)*m).
    best_sims, best_labels = _local_top_k(chunk, bank, labels, valid, k=k, bank_chunk=bank_chunk)
    # Block d of every device's lists goes to device d, stacked by source device.
    best_sims, best_labels = jax.lax.all_to_all((best_sims, best_labels), _AXES, 0, 0, tiled=True)

    def per_query(x):
      return x.reshape(num_devices, rows_per_device,
                       k).transpose(1, 0, 2).reshape(rows_per_device, num_devices * k)

    best_sims, positions = jax.lax.top_k(per_query(best_sims), k)
    best_labels = jnp.take_along_axis(per_query(best_labels), positions, axis=1)
    chunk_predictions = _votes(best_sims, best_labels, temperature, ks=ks, num_classes=num_classes)
    return jax.lax.dynamic_update_slice_in_dim(predictions, chunk_predictions, start, axis=1)

  predictions = jax.lax.pcast(jnp.zeros((len(ks), num_queries), jnp.int32), _AXES, to='varying')
  num_chunks = -(-num_queries // rows_per_device)
  return jax.lax.fori_loop(0, num_chunks, one_chunk, predictions)


@functools.lru_cache(maxsize=None)
def _predict_fn(mesh, ks, num_classes, rows_per_device, bank_chunk):
  body = functools.partial(_device_predictions,
                           ks=ks,
                           num_classes=num_classes,
                           rows_per_device=rows_per_device,
                           bank_chunk=bank_chunk,
                           num_devices=mesh.size)
  rows = P(_AXES)
  return jax.jit(
      jax.shard_map(body,
                    mesh=mesh,
                    in_specs=(rows, rows, rows, rows, P()),
                    out_specs=P(None, _AXES)))


@functools.lru_cache(maxsize=None)
def _bank_summary_fn(mesh):
  """(valid rows, smallest and largest valid label), replicated."""

  def summary(labels, valid):
    info = jnp.iinfo(jnp.int32)
    return (jnp.sum(valid, dtype=jnp.int32), jnp.min(jnp.where(valid, labels, info.max)),
            jnp.max(jnp.where(valid, labels, info.min)))

  return jax.jit(summary, out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=None)
def _replicate_fn(mesh):
  return jax.jit(lambda *arrays: arrays, out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=None)
def _correct_counts_fn(mesh):
  """(correct valid queries per k, valid queries), replicated."""

  def counts(predictions, labels, valid):
    correct = (predictions == labels[None, :]) & valid[None, :]
    return jnp.sum(correct, axis=1, dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32)

  return jax.jit(counts, out_shardings=sharding.replicated(mesh))


def _host_rows(mesh, array, fill=0):
  """A host array as a global array sharded by rows over the mesh, padded with `fill` rows to a
  multiple of the device count. Every process must pass the same array."""
  array = np.asarray(array)
  padding = -array.shape[0] % mesh.size
  array = np.concatenate([array, np.full((padding,) + array.shape[1:], fill, array.dtype)])
  return jax.make_array_from_callback(array.shape, sharding.batch_sharding(mesh),
                                      lambda index: array[index])


def _sharded_queries(mesh, queries, query_valid, dim):
  """(queries, valid) as row-sharded global arrays; host arrays are padded with invalid rows."""
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f'queries shape {queries.shape} must be [Q, {dim}] like the bank')
  if queries.shape[0] == 0:
    raise ValueError('queries has no rows')
  if query_valid is not None and tuple(query_valid.shape) != tuple(queries.shape[:1]):
    raise ValueError(f'query_valid shape {query_valid.shape} does not match {queries.shape[0]} '
                     f'query rows')
  if isinstance(queries, jax.Array):
    if queries.shape[0] % mesh.size:
      raise ValueError(f'sharded queries have {queries.shape[0]} rows, not a multiple of the '
                       f'{mesh.size} devices')
    if query_valid is None:
      query_valid = jnp.ones(queries.shape[0], bool, device=sharding.batch_sharding(mesh))
    elif not isinstance(query_valid, jax.Array):
      query_valid = _host_rows(mesh, np.asarray(query_valid, bool))
    return queries, query_valid
  queries = np.asarray(queries, np.float32)
  valid = (np.ones(queries.shape[0], bool) if query_valid is None else np.asarray(
      jax.device_get(query_valid), bool))
  return _host_rows(mesh, queries), _host_rows(mesh, valid, fill=False)


def _check_options(num_classes, ks, temperature, query_chunk, bank_chunk):
  if not ks:
    raise ValueError('ks must name at least one k')
  if num_classes < 1:
    raise ValueError(f'num_classes={num_classes} must be >= 1')
  if temperature <= 0:
    raise ValueError(f'temperature={temperature} must be positive')
  if query_chunk < 1 or bank_chunk < 1:
    raise ValueError(f'query_chunk={query_chunk} and bank_chunk={bank_chunk} must be >= 1')


def _all_predictions(bank, bank_labels, bank_valid, queries, query_valid, *, mesh, num_classes, ks,
                     temperature, query_chunk, bank_chunk):
  """(predictions [len(ks), Q'] sharded like the queries, query valid mask [Q'], ks as a tuple)."""
  ks = tuple(dict.fromkeys(int(k) for k in ks))
  _check_options(num_classes, ks, temperature, query_chunk, bank_chunk)
  if bank.ndim != 2:
    raise ValueError(f'bank must be 2-D, got shape {bank.shape}')
  if bank_labels.shape != bank.shape[:1] or bank_valid.shape != bank.shape[:1]:
    raise ValueError(f'bank_labels {bank_labels.shape} and bank_valid {bank_valid.shape} must '
                     f'have one entry per bank row ({bank.shape[0]})')
  if bank.shape[0] % mesh.size:
    raise ValueError(f'the bank has {bank.shape[0]} rows, not a multiple of the {mesh.size} '
                     f'devices')
  num_valid, lowest, highest = map(int, _bank_summary_fn(mesh)(bank_labels, bank_valid))
  for k in ks:
    if not 1 <= k <= num_valid:
      raise ValueError(f'k={k} must be between 1 and the {num_valid} valid bank rows')
  if lowest < 0 or highest >= num_classes:
    raise ValueError(f'valid bank labels span [{lowest}, {highest}], outside [0, '
                     f'num_classes={num_classes})')
  queries, query_valid = _sharded_queries(mesh, queries, query_valid, bank.shape[1])
  local_queries = queries.shape[0] // mesh.size
  rows_per_device = _balanced_chunk(local_queries, -(-query_chunk // mesh.size))
  local_bank_chunk = _balanced_chunk(bank.shape[0] // mesh.size, bank_chunk)
  predict = _predict_fn(mesh, ks, num_classes, rows_per_device, local_bank_chunk)
  predictions = predict(bank, bank_labels, bank_valid, queries, jnp.float32(temperature))
  return predictions, query_valid, ks


def knn_predictions(bank,
                    bank_labels,
                    bank_valid,
                    queries,
                    query_valid=None,
                    *,
                    mesh,
                    num_classes: int,
                    ks,
                    temperature: float = 0.07,
                    query_chunk: int = 1024,
                    bank_chunk: int = 65536) -> dict[int, np.ndarray]:
  """{k: int32 predicted class of every valid query, in row order} for every k in `ks`.

  bank [N, D], bank_labels [N] and bank_valid [N] are global arrays sharded by rows with
  `sharding.batch_sharding(mesh)` (N a multiple of the device count); rows where bank_valid is
  False never vote. `queries` [Q, D] is either a host array (every process passing the same one)
  or a global array sharded like the bank; `query_valid` [Q] (host or sharded like the queries)
  selects the rows to return, all rows when it is None. Each k must lie between 1 and the number
  of valid bank rows. Query chunks hold at most ceil(query_chunk / devices) rows of every device;
  bank chunks hold at most `bank_chunk` rows of one device.
  """
  predictions, query_valid, ks = _all_predictions(bank,
                                                  bank_labels,
                                                  bank_valid,
                                                  queries,
                                                  query_valid,
                                                  mesh=mesh,
                                                  num_classes=num_classes,
                                                  ks=ks,
                                                  temperature=temperature,
                                                  query_chunk=query_chunk,
                                                  bank_chunk=bank_chunk)
  predictions, query_valid = jax.device_get(_replicate_fn(mesh)(predictions, query_valid))
  return {k: np.asarray(row[query_valid], np.int32) for k, row in zip(ks, predictions)}


def knn_accuracies(bank,
                   bank_labels,
                   bank_valid,
                   queries,
                   query_labels,
                   query_valid=None,
                   *,
                   mesh,
                   num_classes: int,
                   ks,
                   temperature: float = 0.07,
                   query_chunk: int = 1024,
                   bank_chunk: int = 65536) -> dict[int, float]:
  """{k: fraction of valid queries whose k-NN prediction equals their label}.

  Arguments as in `knn_predictions`; `query_labels` [Q] is a host array or a global array sharded
  like the queries. Only the per-k counts of correct queries leave the devices.
  """
  if tuple(query_labels.shape) != tuple(queries.shape[:1]):
    raise ValueError(f'query_labels shape {query_labels.shape} does not match {queries.shape[0]} '
                     f'query rows')
  predictions, query_valid, ks = _all_predictions(bank,
                                                  bank_labels,
                                                  bank_valid,
                                                  queries,
                                                  query_valid,
                                                  mesh=mesh,
                                                  num_classes=num_classes,
                                                  ks=ks,
                                                  temperature=temperature,
                                                  query_chunk=query_chunk,
                                                  bank_chunk=bank_chunk)
  if not isinstance(query_labels, jax.Array) or query_labels.shape[0] != predictions.shape[1]:
    query_labels = _host_rows(mesh, np.asarray(jax.device_get(query_labels), np.int32), fill=-1)
  correct, num_valid = map(
      np.asarray, jax.device_get(_correct_counts_fn(mesh)(predictions, query_labels, query_valid)))
  if num_valid == 0:
    raise ValueError('query_valid marks no query rows')
  return {k: float(count) / float(num_valid) for k, count in zip(ks, correct)}


def _local_mesh():
  return sharding.make_mesh(types.SimpleNamespace(fsdp=1), jax.local_devices())


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
  _check_options(num_classes, (k,), temperature, query_chunk, bank_chunk)


def _host_bank(mesh, train_features, train_labels):
  valid = np.ones(train_features.shape[0], bool)
  return (_host_rows(mesh,
                     train_features), _host_rows(mesh,
                                                 train_labels), _host_rows(mesh, valid, fill=False))


def knn_predict(train_features,
                train_labels,
                query_features,
                *,
                num_classes: int,
                k: int = 20,
                temperature: float = 0.07,
                query_chunk: int = 1024,
                bank_chunk: int = 65536) -> np.ndarray:
  """Predicted class (int32) of every query row by temperature-weighted k-NN over the bank.

  Host arrays in and out; the bank is sharded over this process's local devices.
  """
  train_features = np.asarray(train_features, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  query_features = np.asarray(query_features, np.float32)
  _check_inputs(train_features, train_labels, query_features, num_classes, k, temperature,
                query_chunk, bank_chunk)
  mesh = _local_mesh()
  predictions = knn_predictions(*_host_bank(mesh, train_features, train_labels),
                                query_features,
                                mesh=mesh,
                                num_classes=num_classes,
                                ks=(k,),
                                temperature=temperature,
                                query_chunk=query_chunk,
                                bank_chunk=bank_chunk)
  return predictions[k]


def knn_accuracy(train_features,
                 train_labels,
                 query_features,
                 query_labels,
                 *,
                 num_classes: int,
                 k: int = 20,
                 temperature: float = 0.07,
                 query_chunk: int = 1024,
                 bank_chunk: int = 65536) -> float:
  """Fraction of query rows whose k-NN prediction equals their label."""
  query_labels = np.asarray(query_labels)
  if query_labels.shape != np.shape(query_features)[:1]:
    raise ValueError(f'query_labels shape {query_labels.shape} does not match the query rows')
  predictions = knn_predict(train_features,
                            train_labels,
                            query_features,
                            num_classes=num_classes,
                            k=k,
                            temperature=temperature,
                            query_chunk=query_chunk,
                            bank_chunk=bank_chunk)
  return float(np.mean(predictions == query_labels))
