"""The linear probe: separable data, random labels, sklearn's logistic regression on digits."""
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from kldino.evaluate import linear_probe


def blobs(num_rows, separation, seed, num_classes=10, dim=128):
  rng = np.random.default_rng(seed)
  centres = separation * np.random.default_rng(0).normal(size=(num_classes, dim))
  labels = rng.integers(0, num_classes, num_rows)
  return centres[labels] + rng.normal(size=(num_rows, dim)), labels


def test_separable_data_is_learned():
  train_features, train_labels = blobs(1347, separation=0.5, seed=1)
  test_features, test_labels = blobs(1000, separation=0.5, seed=2)
  result = linear_probe(train_features, train_labels, test_features, test_labels, num_classes=10)
  assert result['top1'] > 0.95
  assert result['weight_decay'] in (0.0, 1e-4, 1e-3, 1e-2)


def test_random_labels_give_chance():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(3347, 128))
  labels = rng.integers(0, 10, 3347)
  result = linear_probe(features[:1347],
                        labels[:1347],
                        features[1347:],
                        labels[1347:],
                        num_classes=10)
  assert abs(result['top1'] - 0.1) < 0.03  # 4.5 standard errors on 2000 test rows


def test_agrees_with_sklearn_on_digits():
  features, labels = load_digits(return_X_y=True)
  train_features, test_features, train_labels, test_labels = train_test_split(features,
                                                                              labels,
                                                                              test_size=450,
                                                                              random_state=0,
                                                                              stratify=labels)
  reference = LogisticRegression(max_iter=5000).fit(train_features,
                                                    train_labels).score(test_features, test_labels)
  result = linear_probe(train_features, train_labels, test_features, test_labels, num_classes=10)
  assert reference > 0.93
  assert abs(result['top1'] - reference) < 0.03


def test_deterministic_from_seed_and_single_weight_decay():
  train_features, train_labels = blobs(300, separation=0.1, seed=1)
  test_features, test_labels = blobs(300, separation=0.1, seed=2)
  options = dict(num_classes=10, epochs=5, batch_size=64, weight_decays=(1e-3,))
  first = linear_probe(train_features, train_labels, test_features, test_labels, **options)
  second = linear_probe(train_features, train_labels, test_features, test_labels, **options)
  assert first == second and first['weight_decay'] == 1e-3


def test_rejects_bad_input():
  features, labels = blobs(20, separation=1.0, seed=0)
  with pytest.raises(ValueError, match='labels'):
    linear_probe(features, labels, features, labels + 10, num_classes=10)
  with pytest.raises(ValueError, match='weight_decays'):
    linear_probe(features, labels, features, labels, num_classes=10, weight_decays=())
  with pytest.raises(ValueError, match='widths'):
    linear_probe(features, labels, features[:, :5], labels, num_classes=10)


def test_weight_decay_chosen_on_held_out_rows():
  # Only the difference of the two features carries the class; a huge weight decay shrinks the
  # probe towards the class-mean direction, which sees almost none of it.
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 1200)
  nuisance = rng.normal(size=1200)
  features = np.stack([nuisance + 0.2 * labels - 0.1, nuisance], axis=1)
  result = linear_probe(features[:800],
                        labels[:800],
                        features[800:],
                        labels[800:],
                        num_classes=2,
                        weight_decays=(1e3, 0.0))
  assert result['weight_decay'] == 0.0
  assert result['top1'] > 0.95
