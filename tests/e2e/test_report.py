"""A miniature study: three tiny runs, then the report, checked against the runs' own logs."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from kldino.tools import report
from kldino import train
from tests.helpers import tiny_config, write_folder


def _logged(workdir, tag):
  values = []
  for name in sorted(os.listdir(workdir)):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        values += [(event.step, float(tf.make_ndarray(v.tensor)))
                   for v in event.summary.value
                   if v.tag == tag]
  return [value for _, value in sorted(values)]


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folder'))
  write_folder(root)
  study_dir = str(tmp_path_factory.mktemp('study'))
  variants = {
      'prior': dict(normalization='prior'),
      'prior_hot': dict(normalization='prior', teacher_temp=0.1, warmup_teacher_temp=0.1),
      'none': dict(normalization='none')
  }
  for name, objective in variants.items():
    config = tiny_config()
    config.data.name, config.data.path = 'folder', root
    config.num_epochs, config.batch_size = 2, 32
    config.prior_pass_batch_size, config.eval.batch_size, config.eval.probe_epochs = 48, 64, 5
    config.eval.prior_pass_diagnostics = True
    config.objective.update(objective)
    workdir = os.path.join(study_dir, name)
    train.train_and_evaluate(config, workdir)
  return study_dir, report.write_report(study_dir)


def test_report_and_plots_are_written(study):
  study_dir, _ = study
  for name in ('report.md', 'accuracy.png', 'knn_curves.png', 'training_curves.png',
               'prior_pass_curves.png', 'gap_vs_temperature.png', report.RECORD):
    path = os.path.join(study_dir, name)
    assert os.path.getsize(path) > 1000, name
  with open(os.path.join(study_dir, 'accuracy.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_table_and_plots_hold_the_logged_values(study):
  study_dir, plotted = study
  with open(os.path.join(study_dir, 'report.md')) as f:
    text = f.read()
  names = ['none', 'prior', 'prior_hot']  # sorted, as the report reads them
  for index, name in enumerate(names):
    with open(os.path.join(study_dir, name, 'eval.json')) as f:
      results = json.load(f)
    assert f"{results['knn_top1']:.4f} | {results['linear_top1']:.4f} | " \
           f"{results['cluster_mi']:.3f}" in text
    assert plotted['accuracy.png']['knn_top1'][index] == results['knn_top1']
    assert plotted['accuracy.png']['cluster_mi'][index] == results['cluster_mi']
    # Two diagnostic prior passes (before each epoch) in every run, whatever its normalisation.
    for tag in ('prior_pass/jensen_gap', 'prior_pass/effective_clusters',
                'prior_pass/prototype_mean_norm', 'prior_pass/empty_cluster_fraction'):
      logged = _logged(os.path.join(study_dir, name), tag)
      assert len(logged) == 2
      np.testing.assert_allclose(plotted['prior_pass_curves.png'][tag][name], logged)
  gaps = plotted['gap_vs_temperature.png']
  assert gaps['teacher_temp'] == [0.04, 0.1]
  np.testing.assert_allclose(gaps['jensen_gap'], [
      np.mean(_logged(os.path.join(study_dir, n), 'prior_pass/jensen_gap'))
      for n in ('prior', 'prior_hot')
  ])
  assert '`none` collapses' in text and 'inverse-prior normalisation prevents collapse' in text
  for name in plotted:
    assert f']({name})' in text  # every plot is shown in the report
  # One seed per setting: a setting's training curve is its run's logged metric.
  for run in report.load_runs(study_dir):
    np.testing.assert_allclose(plotted['training_curves.png']['teacher_entropy'][run.label],
                               _logged(os.path.join(study_dir, run.name), 'teacher_entropy'),
                               rtol=1e-6)
