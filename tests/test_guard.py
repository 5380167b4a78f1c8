"""The collapse guard (kldino/core/guard.py): the three kinds from synthetic per-step statistics,
the patience, and the loop's wiring: warn records, stop saves, exits 6 and is not undone by a rerun,
and the sweep runner's summary keeps the record."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from kldino import errors
from kldino.core import guard
from kldino.config.checks import validate_config
from kldino.errors import ConfigError
from launch import sweep
from tests.helpers import REPO, config_module

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


def _main(workdir, *overrides):
  return subprocess.run([
      sys.executable, '-m', 'kldino.main', '--config=configs/smoke.py', f'--workdir={workdir}',
      '--config.guard.min_clusters=1000', '--config.guard.patience_epochs=1', *overrides
  ],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=600,
                        check=False,
                        env={
                            **os.environ, 'JAX_PLATFORMS': 'cpu'
                        })


def test_stop_saves_exits_6_and_a_rerun_does_not_train_on(tmp_path):
  """min_clusters above K makes every step 'one cluster': with the smoke config's 42 steps an
  epoch and a log every 10, the run of collapsed steps starts at step 10 and has lasted an epoch
  at step 60."""
  from kldino.run import Run  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / 'run'
  result = _main(workdir, '--config.guard.collapse=stop')
  assert result.returncode == errors.CollapseStopped.exit_code, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('kldino: one-cluster collapse at step 60, every logged step since '
                         'step 10') and 'checkpoint of step 60 saved' in line, line
  assert 'Traceback' not in result.stderr
  record = json.loads((workdir / 'eval.json').read_text())
  assert record['collapse']['kind'] == 'one_cluster' and record['step'] == 60
  assert Run(config_module('smoke').get_config(), str(workdir)).checkpointer.latest_step() == 60
  again = _main(workdir, '--config.guard.collapse=stop')
  assert again.returncode == errors.CollapseStopped.exit_code
  assert 'stopped collapsed at step 60' in again.stderr.strip().splitlines()[-1]
  # warn trains on to the end, evaluates, and keeps the record of the collapse.
  resumed = _main(workdir, '--config.guard.collapse=warn')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  final = json.loads((workdir / 'eval.json').read_text())
  assert final['step'] == 2 * 42 and 'knn_top1' in final
  assert final['collapse'] == record['collapse']


def test_the_sweep_summary_keeps_a_stopped_jobs_collapse(tmp_path):
  jobs = [sweep.Job(name, str(tmp_path / name), ()) for name in ('collapsed', 'broken')]
  collapse = {'kind': 'uniform', 'step': 7}
  write_and_exit = ('import json, os, sys; os.makedirs(sys.argv[1], exist_ok=True); '
                    'json.dump({"collapse": %r, "step": 7}, open(sys.argv[1] + "/eval.json", '
                    '"w")); sys.exit(%d)' % (collapse, errors.CollapseStopped.exit_code))
  commands = [[sys.executable, '-c', write_and_exit, jobs[0].workdir],
              [sys.executable, '-c', 'import sys; sys.exit(3)']]
  assert sweep.run_local(jobs, commands, str(tmp_path)) == 1
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['collapsed']['collapse'] == collapse
  assert summary['collapsed']['returncode'] == errors.CollapseStopped.exit_code
  assert summary['broken'] == {'overrides': [], 'returncode': 3}
