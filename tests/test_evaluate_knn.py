"""Weighted k-NN against an independent float64 brute force, and chunking invariance."""
import numpy as np
import pytest

from kldino.evaluate import knn_accuracy, knn_predict

NUM_CLASSES = 7


def brute_force_knn(train_features, train_labels, query_features, k, temperature):
  """(predictions, ambiguous): ambiguous marks queries with a near-tie at the k-th neighbour or
  between the two best classes, where float32 rounding may legitimately flip the answer."""
  def normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = normalise(query_features.astype(np.float64)) @ normalise(
      train_features.astype(np.float64)).T
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
          rng.integers(0, NUM_CLASSES, num_train),
          rng.normal(size=(num_query, dim)).astype(np.float32))


@pytest.mark.parametrize('k, temperature, query_chunk, bank_chunk', [
    (1, 0.07, 1024, 65536),
    (5, 0.07, 30, 50),
    (20, 0.07, 13, 7),     # bank chunk smaller than k
    (20, 0.5, 97, 64),
    (50, 0.005, 40, 203),  # small enough that a naive float32 exp(sim / T) overflows
    (203, 0.07, 33, 41),   # k = the whole bank
])
def test_matches_brute_force(k, temperature, query_chunk, bank_chunk):
  train_features, train_labels, query_features = random_problem(seed=k)
  expected, ambiguous = brute_force_knn(train_features, train_labels, query_features, k,
                                        temperature)
  predictions = knn_predict(train_features, train_labels, query_features,
                            num_classes=NUM_CLASSES, k=k, temperature=temperature,
                            query_chunk=query_chunk, bank_chunk=bank_chunk)
  assert predictions.dtype == np.int32 and predictions.shape == (97,)
  assert ambiguous.sum() <= 3
  np.testing.assert_array_equal(predictions[~ambiguous], expected[~ambiguous])


def test_chunked_equals_unchunked():
  train_features, train_labels, query_features = random_problem(seed=1, num_train=500)
  options = dict(num_classes=NUM_CLASSES, k=10)
  whole = knn_predict(train_features, train_labels, query_features, query_chunk=97,
                      bank_chunk=500, **options)
  for query_chunk, bank_chunk in [(4, 3), (10, 9), (96, 499), (200, 1000)]:
    chunked = knn_predict(train_features, train_labels, query_features,
                          query_chunk=query_chunk, bank_chunk=bank_chunk, **options)
    np.testing.assert_array_equal(chunked, whole)


def test_padding_rows_never_vote():
  # Every real neighbour has negative cosine, so zero-filled padding (cosine 0, label 0) would
  # outrank all of them if it were not masked.
  train_features = np.abs(np.random.default_rng(0).normal(size=(10, 4))).astype(np.float32)
  predictions = knn_predict(train_features, np.ones(10, np.int32), -train_features[:3],
                            num_classes=2, k=3, bank_chunk=4)
  np.testing.assert_array_equal(predictions, [1, 1, 1])


def test_accuracy_on_clustered_data():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(NUM_CLASSES, 32))
  train_labels, query_labels = rng.integers(0, NUM_CLASSES, 300), rng.integers(0, NUM_CLASSES, 100)
  train_features = centres[train_labels] + 0.3 * rng.normal(size=(300, 32))
  query_features = centres[query_labels] + 0.3 * rng.normal(size=(100, 32))
  accuracy = knn_accuracy(train_features, train_labels, query_features, query_labels,
                          num_classes=NUM_CLASSES)
  assert accuracy > 0.95
  shuffled = knn_accuracy(train_features, rng.permutation(train_labels), query_features,
                          query_labels, num_classes=NUM_CLASSES)
  assert shuffled < 0.4


def test_rejects_k_larger_than_bank():
  train_features, train_labels, query_features = random_problem(seed=0, num_train=10)
  with pytest.raises(ValueError, match='k=11'):
    knn_predict(train_features, train_labels, query_features, num_classes=NUM_CLASSES, k=11)


def test_rejects_out_of_range_labels():
  train_features, train_labels, query_features = random_problem(seed=0)
  with pytest.raises(ValueError, match='labels'):
    knn_predict(train_features, train_labels + NUM_CLASSES, query_features,
                num_classes=NUM_CLASSES)
