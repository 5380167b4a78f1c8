"""Evaluation of frozen features: weighted k-NN, a linear probe, and feature extraction."""
from kldino.evaluate.features import extract_features
from kldino.evaluate.knn import knn_accuracies, knn_accuracy, knn_predict, knn_predictions
from kldino.evaluate.linear import linear_probe

__all__ = ['extract_features', 'knn_accuracies', 'knn_accuracy', 'knn_predict', 'knn_predictions',
           'linear_probe']
