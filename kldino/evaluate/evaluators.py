"""Evaluators as plug-ins: `config.evals` names them, and every evaluation goes through them.

    config.evals.knn = {'type': 'knn', 'every_epochs': 0, 'final': True}

Each entry names a registered type (EVALUATORS: knn, clusters, feature_probe), how often it runs
during training (`every_epochs`, 0: not) and whether it runs at the end and in --mode=eval
(`final`); options are the `eval.*` keys. An evaluator is built once per run,
`Evaluator(banks, run)`, and `evaluator.run(params)` returns its JSON fields. The evaluators of
one evaluation share each split's feature bank (kldino/evaluate/bank.py): a split goes through
the backbone once. What each reports: docs/evaluation.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kldino.models import forward
from kldino.core import sharding
from kldino.errors import ConfigError
from kldino.data import pipeline
from kldino.evaluate import bank as bank_lib
from kldino.evaluate.knn import knn_accuracies
from kldino.evaluate.linear import linear_probe
from kldino.registry import Registry
from kldino.runtime import files

EVALUATORS = Registry('evaluator', key='evals.<name>.type')
# The feature probe gathers both splits' features to every host: refuse it beyond this size.
FEATURE_PROBE_MAX_BYTES = 4 * 2**30


def knn_ks(eval_config) -> tuple[int, ...]:
  """eval.knn_k as a tuple (it may be one int)."""
  ks = eval_config.knn_k
  return tuple(int(k) for k in ks) if isinstance(ks, (tuple, list)) else (int(ks),)


class SplitBanks:
  """Feature banks of one set of parameters, one per split, computed when first asked for.

  `features='teacher'` gives the teacher backbone's features (`feature_options` as
  kldino/models/forward.py:backbone_features takes them; default: CLS after the final norm) and,
  with `cluster_stats`, the eval split's cluster statistics in the same pass; `features='pixels'`
  the flattened evaluation views (the raw-pixel baseline). `clear()` frees the banks.
  """

  def __init__(self,
               run,
               features: str = 'teacher',
               *,
               feature_options=None,
               cluster_stats: bool = True):
    self.run = run
    self.features = features
    self.cluster_stats = cluster_stats and features == 'teacher'
    feature_options = feature_options or {}
    self._params, self._banks, self._cluster_sums = None, {}, None
    self._teacher_temp = None
    mesh = run.mesh
    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    graphdef = run.graphdef
    standardise = run.normalization.standardise_teacher_embedding

    def features_and_sums(params, images, mask, sums, teacher_temp):
      if features == 'pixels':
        return images.reshape(images.shape[0], -1), sums
      batch_features = forward.backbone_features(graphdef, params, images, **feature_options)
      if sums is None:
        return batch_features, sums
      logits = forward.teacher_logits(graphdef, params, images, mask=mask, standardise=standardise)
      return batch_features, bank_lib.add_cluster_sums(sums, logits, mask, teacher_temp)

    image_size, channels = run.config.data.image_size, run.in_channels
    self.feature_dim = (image_size**2 *
                        channels if features == 'pixels' else run.feature_dim(**feature_options))
    self._pass = jax.jit(
        features_and_sums,
        # The pixel baseline has no parameters (None).
        in_shardings=(None if features == 'pixels' else run.param_shardings, batch, batch,
                      replicated, replicated),
        out_shardings=(batch, replicated),
        donate_argnums=(3,))

  def start(self, params, teacher_temp: float | None = None):
    """Begin an evaluation of `params`; `teacher_temp` (the training schedule's tau_t at their
    step) is needed for the cluster statistics only."""
    self.clear()
    self._params, self._teacher_temp = params, teacher_temp

  def clear(self):
    self._params, self._banks, self._cluster_sums = None, {}, None

  def _batches(self, split: str):
    config = self.run.config
    local = pipeline.eval_batches(self.run.source,
                                  split,
                                  config,
                                  batch_size=config.eval.batch_size,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    return sharding.prefetch_global_batches(local, self.run.mesh)

  def _compute(self, params, split: str, with_clusters: bool):
    sums, teacher_temp = None, None
    if with_clusters:
      sums = jax.device_put(bank_lib.init_cluster_sums(self.run.config.model.num_prototypes),
                            sharding.replicated(self.run.mesh))
      teacher_temp = jnp.float32(self._teacher_temp)

    def batch_features(batch):
      nonlocal sums
      batch_features, sums = self._pass(params, batch['image'], batch['mask'], sums, teacher_temp)
      return batch_features

    bank = bank_lib.build_bank(batch_features, self._batches(split))
    return bank, sums

  def bank(self, params, split: str) -> bank_lib.FeatureBank:
    if params is not self._params:
      raise ValueError('SplitBanks.start(params, teacher_temp) must come first')
    if split not in self._banks:
      with_clusters = self.cluster_stats and split == self.run.config.data.eval_split
      self._banks[split], sums = self._compute(params, split, with_clusters)
      if with_clusters:
        self._cluster_sums = sums
    return self._banks[split]

  def cluster_sums(self, params) -> dict:
    """The eval split's cluster sums of `params` (the eval split's bank is made with them)."""
    if not self.cluster_stats:
      raise ValueError('these banks compute no cluster statistics (the pixel baseline has none)')
    self.bank(params, self.run.config.data.eval_split)
    return self._cluster_sums


@EVALUATORS.register('knn')
class KnnEvaluator:
  """DINO's weighted k-NN (cosine similarity, weights exp(s / T)) of the eval split against the
  train split's bank, both sharded over the mesh."""

  def __init__(self, banks: SplitBanks, run):
    self.banks, self._run = banks, run
    self.ks = knn_ks(run.config.eval)

  def run(self, params) -> dict:
    config = self._run.config
    train = self.banks.bank(params, config.data.train_split)
    query = self.banks.bank(params, config.data.eval_split)
    accuracies = knn_accuracies(train.features,
                                train.labels,
                                train.valid,
                                query.features,
                                query.labels,
                                query.valid,
                                mesh=self._run.mesh,
                                num_classes=self._run.source.info.num_classes,
                                ks=self.ks,
                                temperature=config.eval.knn_temperature)
    headline = 20 if 20 in self.ks else self.ks[0]
    results = {f'knn_top1_k{k}': float(accuracies[k]) for k in self.ks}
    results['knn_top1'] = results[f'knn_top1_k{headline}']
    return results


@EVALUATORS.register('clusters')
class ClusterEvaluator:
  """cluster_mi and effective_clusters of the teacher's posterior over the eval split."""

  def __init__(self, banks: SplitBanks, run):
    self.banks = banks
    del run

  def run(self, params) -> dict:
    return bank_lib.cluster_statistics(self.banks.cluster_sums(params))


@EVALUATORS.register('feature_probe')
class FeatureProbeEvaluator:
  """The quick probe: softmax regression on un-augmented features, gathered to the host."""

  def __init__(self, banks: SplitBanks, run):
    self.banks, self._run = banks, run

  def run(self, params) -> dict:
    config = self._run.config
    train_features, train_labels = bank_lib.host_features(
        self.banks.bank(params, config.data.train_split))
    eval_features, eval_labels = bank_lib.host_features(
        self.banks.bank(params, config.data.eval_split))
    probe = linear_probe(train_features,
                         train_labels,
                         eval_features,
                         eval_labels,
                         num_classes=self._run.source.info.num_classes,
                         epochs=config.eval.probe_epochs,
                         seed=config.seed)
    return {'linear_top1': probe['top1'], 'linear_weight_decay': probe['weight_decay']}


def check_feature_probe_size(run, feature_dim: int):
  """Refuse, before anything runs, a feature probe whose host arrays would not be small."""
  config = run.config
  rows = sum(
      run.source.num_examples(split) for split in (config.data.train_split, config.data.eval_split))
  size = rows * feature_dim * 4
  if size > FEATURE_PROBE_MAX_BYTES:
    raise ConfigError(
        f'the feature probe (evals entry of type feature_probe) would gather {size / 2**30:.1f} '
        f'GiB of features to every host ({rows} images x {feature_dim}): turn it off with '
        '--config.evals.<name>.final=False and use --mode=linear_eval (DINO\'s protocol)')


class Evaluators:
  """The config's `evals` entries, built once for a run; `run(params, ...)` runs those due."""

  def __init__(self, run, *, features: str = 'teacher', types=None):
    self.run = run
    self.banks = SplitBanks(run, features)
    self.entries = []
    for name, entry in run.config.evals.items():
      if types is not None and entry.type not in types:
        continue
      try:
        evaluator_class = EVALUATORS.get(entry.type)
      except ValueError as error:
        raise ConfigError(f'evals.{name}: {error}') from None
      self.entries.append((name, entry, evaluator_class(self.banks, run)))
      if entry.type == 'feature_probe' and entry.final:
        check_feature_probe_size(run, self.banks.feature_dim)

  def _run_entries(self, params, teacher_temp: float, selected) -> dict:
    self.banks.start(params, teacher_temp)
    results = {}
    try:
      for _, _, evaluator in selected:
        results.update(evaluator.run(params))
    finally:
      self.banks.clear()  # the banks are large: never keep them past one evaluation
    return results

  def final(self, params, teacher_temp: float) -> dict:
    """Every entry with `final` (the end of training, --mode=eval), and the splits' sizes."""
    results = self._run_entries(params, teacher_temp,
                                [item for item in self.entries if item[1].final])
    data = self.run.config.data
    return {
        **results, 'num_train': self.run.source.num_examples(data.train_split),
        'num_eval': self.run.source.num_examples(data.eval_split)
    }

  def periodic(self, params, teacher_temp: float, epochs_done: int) -> dict:
    """The entries due after `epochs_done` epochs of training ({} when none is)."""
    due = [
        item for item in self.entries
        if item[1].every_epochs and epochs_done % item[1].every_epochs == 0
    ]
    return self._run_entries(params, teacher_temp, due) if due else {}


def evaluate(evaluators: Evaluators,
             params,
             step: int,
             teacher_temp: float,
             *,
             epochs_done: int | None = None) -> dict:
  """The evaluation JSON of `params` at `step`: the final evaluators' fields (or, with
  `epochs_done`, those of the periodic ones due then; {} if none), the step and tau_t."""
  if epochs_done is None:
    results = evaluators.final(params, teacher_temp)
  else:
    results = evaluators.periodic(params, teacher_temp, epochs_done)
  if results:
    results.update(step=int(step), teacher_temp=teacher_temp)
  return results


def write_eval_json(results: dict, path: str):
  """The evaluation JSON at `path`, written by process 0."""
  if jax.process_index() == 0:
    files.write_json(path, results)
