"""The evaluation protocol of a teacher: k-NN, linear probe, and the collapse diagnostics.

Features are the teacher backbone's (ViT: CLS after the final norm), on un-augmented images; the
train split fits, the eval split scores. `cluster_mi` and `effective_clusters` use the teacher's
cluster posterior softmax(t / tau_t) on the eval split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kldino import forward
from kldino import objective
from kldino import sharding
from kldino.data import pipeline
from kldino.evaluate.features import extract_features
from kldino.evaluate.knn import knn_accuracy
from kldino.evaluate.linear import linear_probe


def _jit_outputs(graphdef, teacher_shardings, mesh, teacher_temp, standardise):
  """images -> [features | cluster posterior], one pass for both."""
  def outputs(params, images, mask):
    features = forward.backbone_features(graphdef, params, images)
    logits = forward.teacher_logits(graphdef, params, images, mask=mask, standardise=standardise)
    return jnp.concatenate([features, jax.nn.softmax(logits / teacher_temp, axis=-1)], axis=-1)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(outputs, in_shardings=(teacher_shardings, batch, batch), out_shardings=batch)


def split_outputs(graphdef, teacher_params, source, config, mesh, teacher_shardings, split, *,
                  teacher_temp, standardise):
  outputs = _jit_outputs(graphdef, teacher_shardings, mesh, teacher_temp, standardise)
  batches = (sharding.global_batch(batch, mesh) for batch in pipeline.eval_batches(
      source, split, config, batch_size=config.eval.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count()))
  def feature_fn(batch):
    return outputs(teacher_params, batch['image'], batch['mask'])
  values, labels = extract_features(feature_fn, batches)
  num_prototypes = config.model.num_prototypes
  return values[:, :-num_prototypes], values[:, -num_prototypes:], labels


def probe(train_features, train_labels, eval_features, eval_labels, config, num_classes, *,
          with_linear: bool = True) -> dict:
  """k-NN and (unless with_linear=False) linear-probe top-1 of one set of frozen features."""
  knn = knn_accuracy(train_features, train_labels, eval_features, eval_labels,
                     num_classes=num_classes, k=config.eval.knn_k,
                     temperature=config.eval.knn_temperature)
  if not with_linear:
    return {'knn_top1': float(knn)}
  linear = linear_probe(train_features, train_labels, eval_features, eval_labels,
                        num_classes=num_classes, epochs=config.eval.linear_epochs,
                        seed=config.seed)
  return {'knn_top1': float(knn), 'linear_top1': float(linear['top1']),
          'linear_weight_decay': float(linear['weight_decay'])}


def evaluate_teacher(graphdef, teacher_params, source, config, mesh, teacher_shardings, *,
                     teacher_temp: float, standardise: bool, with_linear: bool = True) -> dict:
  kwargs = dict(teacher_temp=teacher_temp, standardise=standardise)
  train_features, _, train_labels = split_outputs(
      graphdef, teacher_params, source, config, mesh, teacher_shardings,
      config.data.train_split, **kwargs)
  eval_features, eval_probs, eval_labels = split_outputs(
      graphdef, teacher_params, source, config, mesh, teacher_shardings,
      config.data.eval_split, **kwargs)
  mean_posterior = np.mean(eval_probs, axis=0)
  return {
      **probe(train_features, train_labels, eval_features, eval_labels, config,
              source.info.num_classes, with_linear=with_linear),
      'cluster_mi': float(objective.cluster_mutual_information(jnp.asarray(eval_probs))),
      'effective_clusters': float(np.exp(objective.entropy(jnp.asarray(mean_posterior)))),
      'teacher_temp': teacher_temp,
      'num_train': int(train_labels.shape[0]),
      'num_eval': int(eval_labels.shape[0]),
  }


def evaluate_pixels(source, config) -> dict:
  """The raw-pixel baseline: the same probes on the flattened, normalised eval views."""
  def pixels(split):
    batches = pipeline.eval_batches(source, split, config, batch_size=config.eval.batch_size)
    return extract_features(lambda batch: batch['image'].reshape(batch['image'].shape[0], -1),
                            batches)
  return probe(*pixels(config.data.train_split), *pixels(config.data.eval_split), config,
               source.info.num_classes)
