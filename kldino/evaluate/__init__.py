"""Evaluation of frozen features: banks, k-NN, probes, DINO's linear protocol, named evaluators."""
from kldino.evaluate.bank import FeatureBank, build_bank, host_features
from kldino.evaluate.knn import knn_accuracies, knn_accuracy, knn_predict, knn_predictions
from kldino.evaluate.linear import linear_probe

__all__ = [
    'FeatureBank', 'build_bank', 'host_features', 'knn_accuracies', 'knn_accuracy', 'knn_predict',
    'knn_predictions', 'linear_probe'
]
