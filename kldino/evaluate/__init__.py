"""Evaluation of frozen features: feature banks, weighted k-NN, the quick linear probe, DINO's
linear-evaluation protocol, and the named evaluators that combine them."""
from kldino.evaluate.bank import FeatureBank, build_bank, host_features
from kldino.evaluate.knn import knn_accuracies, knn_accuracy, knn_predict, knn_predictions
from kldino.evaluate.linear import linear_probe

__all__ = [
    'FeatureBank', 'build_bank', 'host_features', 'knn_accuracies', 'knn_accuracy', 'knn_predict',
    'knn_predictions', 'linear_probe'
]
