"""Weighted k-NN against an independent float64 brute force, on one and on several devices, and
chunking invariance."""
import types

import jax
import numpy as np
import pytest

from kldino.core import sharding
from kldino.evaluate import knn_accuracies, knn_accuracy, knn_predict, knn_predictions

NUM_CLASSES = 7


def brute_force_knn(train_features, train_labels, query_features, k, temperature):
  """(predictions, ambiguous): ambiguous marks queries with a near-tie at the k-th neighbour or
  between the two best classes, where float32 rounding may legitimately flip the answer."""

  def normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  sims = normalise(query_features.astype(np.float64)) @ normalise(train_features.astype(
      np.float64)).T
  order = np.argsort(-sims, axis=1)
  top_sims = np.take_along_axis(sims, order[:, :k], axis=1)
  votes = np.zeros((len(query_features), NUM_CLASSES))
  for query in range(len(query_features)):
    np.add.at(votes[query], train_labels[order[query, :k]], np.exp(top_sims[query] / temperature))
  ambiguous = np.zeros(len(query_features), bool)
  if k < train_features.shape[0]:
    next_sims = np.take_along_axis(sims, order[:, k:k + 1], axis=1)[:, 0]
    ambiguous |= top_sims[:, -1] - next_sims < 1e-5
  best_two = np.sort(votes, axis=1)[:, -2:]
  ambiguous |= best_two[:, 1] - best_two[:, 0] < 1e-4 * best_two[:, 1]
  return votes.argmax(axis=1), ambiguous


def random_problem(seed, num_train=203, num_query=97, dim=16):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_train, dim)).astype(np.float32),
          rng.integers(0, NUM_CLASSES,
                       num_train), rng.normal(size=(num_query, dim)).astype(np.float32))


@pytest.mark.parametrize(
    'k, temperature, query_chunk, bank_chunk',
    [
        (1, 0.07, 1024, 65536),
        (5, 0.07, 30, 50),
        (20, 0.07, 13, 7),  # bank chunk smaller than k
        (20, 0.5, 97, 64),
        (50, 0.005, 40, 203),  # small enough that a naive float32 exp(sim / T) overflows
        (203, 0.07, 33, 41),  # k = the whole bank
    ])
def test_matches_brute_force(k, temperature, query_chunk, bank_chunk):
  train_features, train_labels, query_features = random_problem(seed=k)
  expected, ambiguous = brute_force_knn(train_features, train_labels, query_features, k,
                                        temperature)
  predictions = knn_predict(train_features,
                            train_labels,
                            query_features,
                            num_classes=NUM_CLASSES,
                            k=k,
                            temperature=temperature,
                            query_chunk=query_chunk,
                            bank_chunk=bank_chunk)
  assert predictions.dtype == np.int32 and predictions.shape == (97,)
  assert ambiguous.sum() <= 3
  np.testing.assert_array_equal(predictions[~ambiguous], expected[~ambiguous])


def test_chunked_equals_unchunked():
  train_features, train_labels, query_features = random_problem(seed=1, num_train=500)
  options = dict(num_classes=NUM_CLASSES, k=10)
  whole = knn_predict(train_features,
                      train_labels,
                      query_features,
                      query_chunk=97,
                      bank_chunk=500,
                      **options)
  for query_chunk, bank_chunk in [(4, 3), (10, 9), (96, 499), (200, 1000)]:
    chunked = knn_predict(train_features,
                          train_labels,
                          query_features,
                          query_chunk=query_chunk,
                          bank_chunk=bank_chunk,
                          **options)
    np.testing.assert_array_equal(chunked, whole)


def test_padding_rows_never_vote():
  # Every real neighbour has negative cosine, so zero-filled padding (cosine 0, label 0) would
  # outrank all of them if it were not masked.
  train_features = np.abs(np.random.default_rng(0).normal(size=(10, 4))).astype(np.float32)
  predictions = knn_predict(train_features,
                            np.ones(10, np.int32),
                            -train_features[:3],
                            num_classes=2,
                            k=3,
                            bank_chunk=4)
  np.testing.assert_array_equal(predictions, [1, 1, 1])


def test_accuracy_on_clustered_data():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(NUM_CLASSES, 32))
  train_labels, query_labels = rng.integers(0, NUM_CLASSES, 300), rng.integers(0, NUM_CLASSES, 100)
  train_features = centres[train_labels] + 0.3 * rng.normal(size=(300, 32))
  query_features = centres[query_labels] + 0.3 * rng.normal(size=(100, 32))
  accuracy = knn_accuracy(train_features,
                          train_labels,
                          query_features,
                          query_labels,
                          num_classes=NUM_CLASSES)
  assert accuracy > 0.95
  shuffled = knn_accuracy(train_features,
                          rng.permutation(train_labels),
                          query_features,
                          query_labels,
                          num_classes=NUM_CLASSES)
  assert shuffled < 0.4


def test_rejects_k_larger_than_bank():
  train_features, train_labels, query_features = random_problem(seed=0, num_train=10)
  with pytest.raises(ValueError, match='k=11'):
    knn_predict(train_features, train_labels, query_features, num_classes=NUM_CLASSES, k=11)


def test_rejects_out_of_range_labels():
  train_features, train_labels, query_features = random_problem(seed=0)
  with pytest.raises(ValueError, match='labels'):
    knn_predict(train_features, train_labels + NUM_CLASSES, query_features, num_classes=NUM_CLASSES)


# The sharded core. The bank has 203 valid rows scattered among 53 invalid ones (256 rows in all,
# 32 per device on 8 devices); each invalid row copies a query and carries a label that would
# change that query's answer, so that any vote from one would show.
KS = (1, 5, 20, 203)


def sharded_problem(seed=0, num_valid=203, num_rows=256, num_query=97):
  train_features, train_labels, query_features = random_problem(seed, num_valid, num_query)
  rng = np.random.default_rng(seed + 1)
  expected = {k: brute_force_knn(train_features, train_labels, query_features, k, 0.07) for k in KS}
  copied = rng.integers(0, num_query, num_rows - num_valid)
  bank = np.concatenate([train_features, 5 * query_features[copied]])
  labels = np.concatenate([train_labels,
                           (expected[1][0][copied] + 1) % NUM_CLASSES]).astype(np.int32)
  valid = np.arange(num_rows) < num_valid
  order = rng.permutation(num_rows)
  return bank[order], labels[order], valid[order], query_features, expected


def on_mesh(mesh, *arrays):
  return [jax.device_put(array, sharding.batch_sharding(mesh)) for array in arrays]


def mesh_of(fsdp=1, devices=None):
  return sharding.make_mesh(types.SimpleNamespace(fsdp=fsdp), devices)


def assert_matches_brute_force(predictions, expected, num_query=97):
  assert set(predictions) == set(expected)
  for k, (wanted, ambiguous) in expected.items():
    assert predictions[k].dtype == np.int32 and predictions[k].shape == (num_query,)
    assert ambiguous.sum() <= 3
    np.testing.assert_array_equal(predictions[k][~ambiguous], wanted[~ambiguous], err_msg=f'k={k}')


def test_sharded_bank_matches_one_device_and_brute_force():
  bank, labels, valid, queries, expected = sharded_problem()
  results = {}
  for name, mesh in [('8', mesh_of()), ('4x2', mesh_of(fsdp=2)),
                     ('1', mesh_of(devices=jax.devices()[:1]))]:
    results[name] = knn_predictions(*on_mesh(mesh, bank, labels, valid),
                                    queries,
                                    mesh=mesh,
                                    num_classes=NUM_CLASSES,
                                    ks=KS)
    assert_matches_brute_force(results[name], expected)
  for k in KS:
    np.testing.assert_array_equal(results['8'][k], results['1'][k])
    np.testing.assert_array_equal(results['4x2'][k], results['1'][k])
  # Had the invalid rows (query copies) voted, k=1 would predict their labels for most queries.
  assert np.mean(results['8'][1] == expected[1][0]) > 0.95


def test_chunking_invariance():
  bank, labels, valid, queries, _ = sharded_problem(seed=2, num_valid=550, num_rows=600)
  mesh = mesh_of()
  arrays = on_mesh(mesh, bank, labels, valid)
  options = dict(mesh=mesh, num_classes=NUM_CLASSES, ks=(1, 10, 60))
  # 75 local rows: one chunk of 75, 25 of 3 (fewer than k), or two of 38 (the second overlapping
  # the first by one row). 13 local queries: one chunk, 13 of one row, or five of three (the last
  # overlapping the fourth by two rows).
  reference = knn_predictions(*arrays, queries, query_chunk=1024, bank_chunk=65536, **options)
  for query_chunk, bank_chunk in [(7, 3), (20, 50)]:
    chunked = knn_predictions(*arrays,
                              queries,
                              query_chunk=query_chunk,
                              bank_chunk=bank_chunk,
                              **options)
    for k in (1, 10, 60):
      np.testing.assert_array_equal(chunked[k],
                                    reference[k],
                                    err_msg=f'{query_chunk=} {bank_chunk=} {k=}')


def test_sharded_queries_match_host_queries():
  bank, labels, valid, queries, expected = sharded_problem()
  mesh = mesh_of()
  arrays = on_mesh(mesh, bank, labels, valid)
  options = dict(mesh=mesh, num_classes=NUM_CLASSES, ks=KS)
  # 104 rows = the 97 queries in order, and 7 invalid NaN rows scattered among them.
  query_valid = np.ones(104, bool)
  query_valid[np.random.default_rng(4).choice(104, 7, replace=False)] = False
  padded_queries = np.full((104, queries.shape[1]), np.nan, np.float32)
  padded_queries[query_valid] = queries
  sharded_queries, sharded_valid = on_mesh(mesh, padded_queries, query_valid)

  host = knn_predictions(*arrays, queries, **options)
  assert_matches_brute_force(host, expected)
  # Without the mask every row comes back, padding included.
  unmasked = knn_predictions(*arrays, sharded_queries, **options)
  from_sharded = knn_predictions(*arrays, sharded_queries, sharded_valid, **options)
  for k in KS:
    assert unmasked[k].shape == (104,)
    np.testing.assert_array_equal(unmasked[k][query_valid], host[k])
    np.testing.assert_array_equal(from_sharded[k], host[k])

  query_labels = np.random.default_rng(3).integers(0, NUM_CLASSES, len(queries)).astype(np.int32)
  query_labels[:40] = expected[20][0][:40]  # Some right answers, so that accuracies vary.
  padded_labels = np.empty(104, np.int32)
  padded_labels[query_valid] = query_labels
  # Padding rows "right" at k=20: they must not count.
  padded_labels[~query_valid] = unmasked[20][~query_valid]
  accuracies = knn_accuracies(*arrays, sharded_queries, *on_mesh(mesh, padded_labels),
                              sharded_valid, **options)
  host_accuracies = knn_accuracies(*arrays, queries, query_labels, **options)
  for k in KS:
    assert accuracies[k] == host_accuracies[k] == np.mean(host[k] == query_labels)
  assert 0.3 < accuracies[20] < 1


def test_overlapping_bank_chunks_count_rows_once():
  # Five valid rows on device 3 (40 rows, 5 per device): with bank_chunk=3 its chunks are rows
  # 0-2 and 2-4. All five vote (k=5) with nearly equal weights (T=100): labels 1, 1, 0, 0, 1 give
  # class 1, but counting row 2 twice (and so dropping row 4, the least similar) would give 0.
  features = np.zeros((40, 2), np.float32)
  features[15:20] = [[1, 0.1 * row] for row in range(5)]
  labels = np.zeros(40, np.int32)
  labels[15:20] = [1, 1, 0, 0, 1]
  valid = np.arange(40) // 5 == 3
  mesh = mesh_of()
  predictions = knn_predictions(*on_mesh(mesh, features, labels, valid),
                                np.array([[1.0, 0.0]]),
                                mesh=mesh,
                                num_classes=2,
                                ks=(5,),
                                temperature=100.0,
                                bank_chunk=3)
  np.testing.assert_array_equal(predictions[5], [1])


@pytest.mark.parametrize('ks, bad_k', [((10, 204), 204), ((0, 5), 0)])
def test_rejects_k_outside_valid_rows(ks, bad_k):
  bank, labels, valid, queries, _ = sharded_problem()
  mesh = mesh_of()
  with pytest.raises(ValueError, match=f'k={bad_k} must be between 1 and the 203 valid') as error:
    knn_predictions(*on_mesh(mesh, bank, labels, valid),
                    queries,
                    mesh=mesh,
                    num_classes=NUM_CLASSES,
                    ks=ks)
  assert '\n' not in str(error.value)
