"""The collapse guard (kldino/core/guard.py): the three kinds from synthetic per-step statistics,
the patience, and its settings' checks. (The loop's wiring, a run that stops collapsed:
tests/e2e/test_guard.py.)"""
import math

import numpy as np
import pytest

from kldino.core import guard
from kldino.config.checks import validate_config
from kldino.errors import ConfigError
from tests.helpers import config_module

K = 256


def _guard(mode='warn', patience_epochs=2, steps_per_epoch=10):
  config = config_module('digits').get_config().guard
  config.update(dict(collapse=mode, patience_epochs=patience_epochs))
  return guard.CollapseGuard(config, K, steps_per_epoch)


def _metrics(marginal_entropy, per_image_entropy):
  return {'teacher_entropy': per_image_entropy, 'teacher_mi': marginal_entropy - per_image_entropy}


HEALTHY = _metrics(4.0, 1.5)  # 55 clusters in use, sharp posteriors
ONE_CLUSTER = _metrics(0.05, 0.01)  # exp(0.05) = 1.05 clusters
UNIFORM = _metrics(math.log(K) - 0.01, math.log(K) - 0.02)  # flat posteriors, MI 0.01
# The same posterior for every image, even over 50 of the prototypes (the LayerNorm head with the
# prior, docs/results.md): 0.71 ln K, MI 0.001.
CONSTANT = _metrics(math.log(50) + 0.001, math.log(50))


@pytest.mark.parametrize('collapsed, kind', [(ONE_CLUSTER, 'one_cluster'), (UNIFORM, 'uniform'),
                                             (CONSTANT, 'constant')])
def test_a_collapse_counts_after_patience_epochs_of_logged_steps(collapsed, kind):
  monitor = _guard(patience_epochs=2, steps_per_epoch=10)  # patience: 20 steps
  stream = [HEALTHY] * 3 + [collapsed] * 2 + [HEALTHY] + [collapsed] * 5
  found = [(step, monitor.observe(step, metrics))
           for step, metrics in zip(range(5, 5 * len(stream) + 1, 5), stream)]
  detected = [(step, collapse) for step, collapse in found if collapse is not None]
  # The first run of collapsed steps (20, 25) is cut by a healthy one; the second starts at 35
  # and has lasted 20 steps at 55.
  assert [step for step, _ in detected] == [55]
  collapse = detected[0][1]
  assert (collapse.kind, collapse.step, collapse.since_step) == (kind, 55, 35)
  assert monitor.collapse is collapse and collapse.record()['kind'] == kind
  expected_clusters = math.exp(collapsed['teacher_entropy'] + collapsed['teacher_mi'])
  assert collapse.teacher_clusters == pytest.approx(expected_clusters)
  message = collapse.message()
  assert message.startswith(f'{kind.replace("_", "-")} collapse at step 55')
  assert 'since step 35' in message and f'{expected_clusters:.2f} effective clusters' in message


def test_healthy_runs_and_off_never_alarm():
  healthy, off = _guard(), _guard(mode='off')
  for step in range(0, 1000, 5):
    assert healthy.observe(step, HEALTHY) is None
    assert off.observe(step, ONE_CLUSTER) is None
  # A posterior that is flat but whose images still differ (MI above guard.uniform_mi) is not
  # uniform collapse.
  assert all(_guard().observe(step, _metrics(math.log(K) - 0.01,
                                             math.log(K) - 0.3)) is None
             for step in range(0, 100, 5))
  # Nor is a posterior of 50 clusters whose images differ.
  assert all(_guard().observe(step, _metrics(math.log(50),
                                             math.log(50) - 1.0)) is None
             for step in range(0, 100, 5))


def test_each_step_is_at_most_one_kind():
  """The kinds are named by the shared posterior's shape; a step is never two of them."""
  monitor = _guard()
  for marginal in np.linspace(0.0, math.log(K), 23):
    for per_image in np.linspace(0.0, marginal, 17):
      holds = monitor._holds(_metrics(marginal, per_image))  # pylint: disable=protected-access
      assert sum(holds.values()) <= 1, (marginal, per_image, holds)
      mi = marginal - per_image
      assert any(holds.values()) == (math.exp(marginal) < 1.5 or mi < 0.05), (marginal, per_image)


def test_bad_guard_settings_are_refused():
  for key, value, fragment in (('collapse', 'halt', 'choose one of off, warn, stop'),
                               ('patience_epochs', 0, 'must be >= 1'),
                               ('min_clusters', 1.0, 'must be > 1'), ('uniform_entropy', 1.5,
                                                                      'must be in (0, 1)'),
                               ('constant_mi', -0.1, 'guard.constant_mi=-0.1 must be >= 0')):
    config = config_module('digits').get_config()
    config.guard[key] = value
    with pytest.raises(ConfigError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
      validate_config(config, num_devices=1)


def test_with_ibot_the_patch_targets_are_watched_too():
  config = config_module('digits').get_config().guard
  config.update(dict(collapse='warn', patience_epochs=1))
  monitor = guard.CollapseGuard(config, K, 10, patches=True)
  patch = lambda metrics: {f'patch_{name}': value for name, value in metrics.items()}
  found = [monitor.observe(step, {**HEALTHY, **patch(ONE_CLUSTER)}) for step in range(5, 30, 5)]
  (collapse,) = [collapse for collapse in found if collapse is not None]  # healthy images
  assert (collapse.kind, collapse.targets, collapse.step) == ('one_cluster', 'patch', 15)
  assert collapse.message().startswith('patch-target one-cluster collapse at step 15')
  # Records of guards without the field read as the image targets'.
  record = {k: v for k, v in collapse.record().items() if k != 'targets'}
  assert guard.Collapse(**record).targets == 'image'
