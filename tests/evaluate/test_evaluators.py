"""Named evaluators from config.evals: the choice of entries, and their refusals."""
import pytest

from kldino.core import program as program_lib
from kldino.errors import ConfigError
from kldino.evaluate import evaluators as evaluators_lib
from kldino.run import Run
from tests.helpers import tiny_config


def _config():
  config = tiny_config()
  config.batch_size = config.eval.batch_size = 64
  return config


def _teacher(run):
  return program_lib.build(run.config, run.graphdef, run.in_channels, run.mesh, 1).init(0).teacher


def test_unknown_type_is_refused_before_anything_runs(tmp_path):
  config = _config()
  config.evals.knn.type = 'knnn'
  with pytest.raises(ConfigError,
                     match="evals.knn: unknown evals.<name>.type 'knnn': choose "
                     'one of clusters, feature_probe, knn'):
    evaluators_lib.Evaluators(Run(config, str(tmp_path)))


def test_feature_probe_that_would_not_fit_the_host_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(evaluators_lib, 'FEATURE_PROBE_MAX_BYTES', 1000)
  with pytest.raises(ConfigError, match='--mode=linear_eval'):
    evaluators_lib.Evaluators(Run(_config(), str(tmp_path)))


def test_periodic_runs_the_entries_due_and_final_every_final_one(tmp_path):
  config = _config()
  config.eval.knn_k = (5, 20)
  config.evals.knn.every_epochs = 2
  config.evals.linear_probe.final = False
  run = Run(config, str(tmp_path))
  evaluators = evaluators_lib.Evaluators(run)
  teacher = _teacher(run)
  assert evaluators.periodic(teacher, 0.04, epochs_done=3) == {}
  periodic = evaluators.periodic(teacher, 0.04, epochs_done=4)
  assert set(periodic) == {'knn_top1', 'knn_top1_k5', 'knn_top1_k20'}
  assert periodic['knn_top1'] == periodic['knn_top1_k20']
  final = evaluators.final(teacher, 0.04)
  assert set(final) == {
      'knn_top1', 'knn_top1_k5', 'knn_top1_k20', 'cluster_mi', 'effective_clusters', 'num_train',
      'num_eval'
  }
  assert final['knn_top1_k5'] == periodic['knn_top1_k5']
  assert (final['num_train'], final['num_eval']) == (1347, 450)
