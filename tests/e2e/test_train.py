"""End to end: a folder of images trains, runs prior passes, evaluates and writes eval.json."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from kldino import train
from tests.helpers import tiny_config, write_folder


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folder'))
  write_folder(root)
  config = tiny_config()
  config.data.name = 'folder'
  config.data.path = root
  config.num_epochs = 2
  config.batch_size = 32
  config.prior_pass_batch_size = 48  # 120 train images: the last prior-pass batch is padded
  config.eval.batch_size = 64
  config.eval.probe_epochs = 20
  config.eval.baselines = True
  workdir = str(tmp_path_factory.mktemp('workdir'))
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_folder_dataset_trains_and_reports(folder_run):
  config, workdir, results = folder_run
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert json.load(f) == results
  steps_per_epoch = 120 // config.batch_size
  assert results['step'] == config.num_epochs * steps_per_epoch
  assert (results['num_train'], results['num_eval']) == (120, 40)
  for key in ('knn_top1', 'linear_top1', 'init_knn_top1', 'pixels_knn_top1'):
    assert 0.0 <= results[key] <= 1.0
  # Raw digit pixels are far above chance (0.1) even with 12 images per class.
  assert results['pixels_knn_top1'] > 0.5
  k = config.model.num_prototypes
  assert 0.0 <= results['cluster_mi'] <= np.log(k) + 1e-6
  assert 1.0 <= results['effective_clusters'] <= k + 1e-3


def test_training_logs_prior_passes_and_metrics(folder_run):
  _, workdir, _ = folder_run
  event_files = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert event_files, os.listdir(workdir)
  scalars = {}
  for event_file in event_files:
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, event_file)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name in ('images', 'histograms'):
          continue  # test_tensorboard_shows_crops_attention_pca_and_the_prior
        scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
  tags = set(scalars)
  for tag in ('loss', 'kl', 'teacher_entropy', 'prior_effective_clusters', 'lr', 'teacher_momentum',
              'teacher_temp', 'images_per_sec', 'prior_pass/examples', 'prior_pass/jensen_gap',
              'eval/knn_top1'):
    assert tag in tags, sorted(tags)
  # One prior pass before each epoch (T = 1), each over all 120 training images exactly once.
  assert scalars['prior_pass/examples'] == [120.0, 120.0]


def test_tensorboard_shows_crops_attention_pca_and_the_prior(folder_run):
  """The first batch's crops, the teacher's attention maps and PCA at each evaluation and, at each
  prior pass, histograms of the prior and of the prototypes' usage, read back from the event
  files."""
  config, workdir, _ = folder_run
  pictures = {}
  for event_file in (f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, event_file)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name in ('images', 'histograms'):
          pictures.setdefault(value.tag, []).append(
              (value.metadata.plugin_data.plugin_name, event.step, tf.make_ndarray(value.tensor)))
  assert {
      'input/global_crops', 'input/local_crops', 'attention/teacher', 'pca/teacher',
      'prior_pass/prior', 'prior_pass/prototype_usage'
  } <= set(pictures), sorted(pictures)
  # Images are stored as [width, height, PNG, PNG, ...]: 4 examples x 2 global crops.
  kind, step, crops = pictures['input/global_crops'][0]
  assert (kind, step, crops[:2].tolist()) == ('images', 1, [b'16', b'16']) and len(crops) == 10
  last_step = config.num_epochs * (120 // config.batch_size)
  for tag in ('attention/teacher', 'pca/teacher'):
    assert last_step in {step for _, step, _ in pictures[tag]}, tag
  # The PCA: 4 images, each one row of three 96-pixel cells (image, first component, RGB).
  _, _, pca = pictures['pca/teacher'][-1]
  assert pca[:2].tolist() == [b'304', b'104'] and len(pca) == 6
  # A histogram is [buckets, 3] (left edge, right edge, count): the prior's K values, and the
  # usage counts of all 120 images.
  _, _, prior = pictures['prior_pass/prior'][-1]
  _, _, usage = pictures['prior_pass/prototype_usage'][-1]
  assert prior[:, 2].sum() == config.model.num_prototypes
  assert np.isclose((usage[:, 2] * (usage[:, 0] + usage[:, 1]) / 2).sum(), 120, rtol=0.2)
