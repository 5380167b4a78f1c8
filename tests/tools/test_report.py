"""kldino/tools/report.py on made-up runs: settings and their seeds, the claims' verdicts, the
tables and curves. (The report of a study of three tiny runs: tests/e2e/test_report.py.)"""
import numpy as np
import pytest

from kldino.tools import report


def _run(name,
         seed,
         knn,
         linear,
         *,
         normalization='prior',
         knn_curve=(),
         sinkhorn_iters=3,
         head_norm='batch'):
  config = {
      'seed': seed,
      'batch_size': 64,
      'num_epochs': 10,
      'guard': {
          'min_clusters': 1.5,
          'uniform_entropy': 0.95,
          'uniform_mi': 0.05
      },
      'objective': {
          'normalization': normalization,
          'prior_source': 'sweep',
          'prior_every_epochs': 1,
          'teacher_temp': 0.04,
          'sinkhorn_iters': sinkhorn_iters
      },
      'model': {
          'prototypes': 'learned',
          'head_norm': head_norm,
          'num_prototypes': 256
      }
  }
  results = {
      'knn_top1': knn,
      'linear_top1': linear,
      'cluster_mi': 1.5,
      'effective_clusters': 50.0,
      'step': 100
  }
  scalars = {
      'prior_pass/jensen_gap': [(1, 0.02 * (seed + 1))],
      report.KNN_CURVE: [(10 * (i + 1), value) for i, value in enumerate(knn_curve)]
  }
  return report.Run(name, config, results, scalars, (0.0, 100.0))


def test_seeds_form_one_setting_with_mean_range_and_separation():
  runs = [
      _run('prior_0', 0, 0.90, 0.95, knn_curve=(0.5, 0.7)),
      _run('prior_1', 1, 0.94, 0.93, knn_curve=(0.6, 0.8)),
      _run('center_0', 0, 0.80, 0.94, normalization='center'),
      _run('center_1', 1, 0.85, 0.96, normalization='center'),
  ]
  groups = report.settings(runs)
  assert {
      label: [run.name for run in members] for label, members in groups.items()
  } == {
      'prior/sweep T=1': ['prior_0', 'prior_1'],
      'center': ['center_0', 'center_1']
  }
  assert report._spread(groups['center'], report._result('knn_top1')) == \
      '0.8250 (0.8000-0.8500, 2 seeds)'
  verdicts = {claim: (verdict, numbers) for claim, verdict, numbers in report.claims(runs)}
  verdict, numbers = verdicts["centering's accuracy is below the prior's"]
  # k-NN: center 0.80-0.85 below prior 0.90-0.94 (separated); linear: 0.94-0.96 against 0.93-0.95
  # (the means are 0.95 and 0.94: center is not below, and the seeds overlap).
  assert verdict == 'not supported'
  assert 'knn_top1: center 0.8250 (0.8000-0.8500, 2 seeds), prior 0.9200 (0.9000-0.9400, 2 ' \
         'seeds), separated by the seeds' in numbers
  assert 'linear_top1' in numbers and 'not separated by the seeds' in numbers
  one_seed_verdict, one_seed = report._accuracy_comparison(runs[2:3], runs[:1], ('center', 'prior'))
  assert 'one seed: not tested against seed noise' in one_seed and 'separated' not in one_seed
  assert one_seed_verdict == 'supported by one seed'  # center_0 0.80/0.94 below prior_0 0.90/0.95
  gap_verdict, gap_numbers = verdicts[
      'centering approximates the prior closely at tau_t=0.04 (gap < 0.1 nats)']
  assert gap_verdict == 'supported' and gap_numbers.startswith(
      'mean Jensen gap over prior passes 0.0300 (0.0200-0.0400, 2 seeds)')


@pytest.mark.parametrize(
    'center_linear, verdict',
    [
        ((0.90, 0.91), 'supported'),  # below prior's 0.93-0.95 on both, apart on both
        ((0.90, 0.935), 'not separated by the seeds'),  # mean 0.9175 below 0.94, ranges overlap
        ((0.95, 0.96), 'not supported'),  # above on linear
    ])
def test_an_accuracy_claim_is_supported_only_where_the_seeds_separate(center_linear, verdict):
  runs = [
      _run('prior_0', 0, 0.90, 0.95),
      _run('prior_1', 1, 0.94, 0.93),
      _run('center_0', 0, 0.80, center_linear[0], normalization='center'),
      _run('center_1', 1, 0.85, center_linear[1], normalization='center'),
  ]
  verdicts = {claim: verdict for claim, verdict, _ in report.claims(runs)}
  assert verdicts["centering's accuracy is below the prior's"] == verdict


def test_a_setting_is_named_by_what_differs_from_the_default():
  runs = [
      _run('sinkhorn', 0, 0.5, 0.5, normalization='sinkhorn'),
      _run('sinkhorn_10', 0, 0.5, 0.5, normalization='sinkhorn', sinkhorn_iters=10)
  ]
  runs[1].config['batch_size'] = 256
  assert list(report.settings(runs)) == ['sinkhorn', 'sinkhorn (10 Sinkhorn iterations, batch 256)']


def test_knn_curves_average_the_seeds(tmp_path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  runs = [
      _run('a', 0, 0.9, 0.9, knn_curve=(0.5, 0.7)),
      _run('b', 1, 0.9, 0.9, knn_curve=(0.6, 0.8))
  ]
  plotted = report._plot_seed_means(report.settings(runs),
                                    str(tmp_path / 'knn.png'), ((report.KNN_CURVE, 'k-NN'),),
                                    columns=1)
  np.testing.assert_allclose(plotted[report.KNN_CURVE]['prior/sweep T=1'], [0.55, 0.75])


def test_an_empty_study_is_refused(tmp_path):
  with pytest.raises(ValueError, match='no finished runs'):
    report.write_report(str(tmp_path))


def test_first_epochs_table_takes_each_seeds_value_logged_nearest_the_epoch():
  runs = [
      _run('prior_0', 0, 0.9, 0.9),
      _run('prior_1', 1, 0.9, 0.9),
      _run('center', 0, 0.8, 0.8, normalization='center')
  ]
  for run in runs:
    run.results['step'], run.config['num_epochs'] = 100, 10  # 10 steps an epoch
  for offset, run in enumerate(runs[:2]):  # logged at steps 9, 19, ..., 99: value step / 10 + seed
    run.scalars['target_entropy'] = [(step, step / 10 + offset) for step in range(9, 100, 10)]
  rows = report._early_rows(report.settings(runs), 'target_entropy', 'targets')
  assert rows[2] == '| setting | epoch 1 | epoch 2 | epoch 5 | epoch 10 | epoch 20 | end |'
  # Epoch e ends at step 10 e: the nearest logged step is 10 e - 1; the 10-epoch runs have no
  # epoch 20 (its nearest step, 99, is 10 epochs away).
  expected = [
      f'{np.mean([(10 * epoch - 1) / 10 + seed for seed in (0, 1)]):.3g}' for epoch in (1, 2, 5, 10)
  ] + ['-', f'{np.mean([9.9, 10.9]):.3g}']
  assert rows[4] == '| prior/sweep T=1 | ' + ' | '.join(expected) + ' |'
  assert rows[5] == '| center |' + ' - |' * 6  # never logged: no number
  # 2 steps an epoch, logged every 10 steps: only epochs 5, 10 and 20 have a value within an epoch.
  runs[0].results['step'], runs[0].config['num_epochs'] = 40, 20
  runs[0].scalars['target_entropy'] = [(step, step / 10) for step in range(10, 41, 10)]
  rows = report._early_rows(report.settings(runs[:1]), 'target_entropy', 'targets')
  assert rows[4] == '| prior/sweep T=1 | - | - | 1 | 2 | 4 | 4 |'


def test_the_start_table_is_each_seeds_first_logged_value():
  runs = [_run('prior_0', 0, 0.9, 0.9), _run('prior_1', 1, 0.9, 0.9)]
  for seed, run in enumerate(runs):
    run.scalars['prior_pass/effective_clusters'] = [(0, 100.0 + seed), (10, 50.0)]
    run.scalars['teacher_mi'] = [(20, 2.0 + seed), (40, 1.0)]
  runs[1].scalars['prior_pass/empty_cluster_fraction'] = [(0, 0.5), (10, 0.9)]
  rows = report._start_rows(report.settings(runs))
  assert rows[0] == ('| setting | effective clusters (dataset) | fraction of empty clusters | '
                     "teacher's cluster mutual information (nats) | teacher's per-image entropy "
                     '(nats) |')
  # The mean of the seeds that logged it; no seed logged the teacher's entropy.
  assert rows[2] == '| prior/sweep T=1 | 100 | 0.5 | 2.5 | - |'


def test_a_step_logged_twice_counts_once_with_its_last_value():
  run = _run('prior', 0, 0.9, 0.9, knn_curve=(0.5, 0.7))
  run.scalars[report.KNN_CURVE].append((20, 0.8))  # the final evaluation, logged again
  steps, values = run.series(report.KNN_CURVE)
  np.testing.assert_array_equal(steps, [10, 20])
  np.testing.assert_array_equal(values, [0.5, 0.8])


def _teacher(run, entropy_fraction, mutual_information, collapse=None):
  """Logs the teacher's entropy (a fraction of ln 256) and MI at steps 10, 20, ..., 100, and what
  the collapse guard saw ({'kind', 'since_step'} or None)."""
  run.scalars['teacher_entropy'] = [
      (10 * (i + 1), fraction * np.log(256)) for i, fraction in enumerate(entropy_fraction)
  ]
  run.scalars['teacher_mi'] = [(10 * (i + 1), mi) for i, mi in enumerate(mutual_information)]
  run.results['collapse'] = collapse
  return run


UNIFORM = ([0.99] * 10, [0.01] * 10, {'kind': 'uniform', 'since_step': 30})
HEALTHY = ([0.6] * 10, [1.0] * 10)


def test_collapse_is_what_the_guard_saw_and_the_end_is_the_last_tenth():
  # 10 steps an epoch; the guard saw a uniform collapse from step 30; the run recovered partly.
  fractions = [0.5, 0.9, 0.97, 0.98, 0.99, 0.99, 0.99, 0.99, 0.9, 0.96]
  mutual_information = [1.0, 0.5, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.2, 0.1]
  run = _teacher(_run('sinkhorn', 0, 0.2, 0.2, normalization='sinkhorn'), fractions,
                 mutual_information, UNIFORM[2])
  assert report._collapse_state(run) == 'uniform from epoch 3'
  assert report._collapsed(run, 'uniform') and not report._collapsed(run, 'one_cluster')
  # The last tenth of 100 steps: steps 90 and 100.
  assert report._end_entropy_fraction(run) == pytest.approx(np.mean([0.9, 0.96]))
  assert report._end_mean(run, 'teacher_mi') == pytest.approx(0.15)
  rows = report._end_rows(report.settings([run]))
  assert rows[2] == '| sinkhorn | uniform from epoch 3 | 0.9300 | 0.1500 | 1.5000 |'
  assert report._collapse_state(_teacher(_run('prior', 0, 0.9, 0.9), *HEALTHY)) == 'no collapse'


def test_each_sinkhorn_probe_is_judged_by_whether_it_collapses():
  default = _teacher(_run('sinkhorn', 0, 0.2, 0.2, normalization='sinkhorn'), *UNIFORM)
  batch = _teacher(_run('sinkhorn_256', 0, 0.9, 0.9, normalization='sinkhorn'), *HEALTHY)
  batch.config['batch_size'] = 256
  no_norm = _teacher(_run('sinkhorn_none', 0, 0.2, 0.2, normalization='sinkhorn', head_norm='none'),
                     *UNIFORM)
  prior = _teacher(_run('prior', 0, 0.9, 0.9), *HEALTHY)  # not a Sinkhorn run: not a probe
  verdicts = {
      claim: (verdict, numbers)
      for claim, verdict, numbers in report.claims([default, batch, no_norm, prior])
  }
  verdict, numbers = verdicts['sinkhorn (batch 256) avoids the (near) uniform end of sinkhorn']
  assert verdict == 'supported'
  assert numbers == ('sinkhorn: uniform from epoch 3, teacher entropy at the end 0.9900 ln K '
                     '(cluster_mi 1.5000, k-NN 0.2000); sinkhorn (batch 256): no collapse, teacher '
                     'entropy at the end 0.6000 ln K (cluster_mi 1.5000, k-NN 0.9000)')
  verdict, _ = verdicts['sinkhorn (none head) avoids the (near) uniform end of sinkhorn']
  assert verdict == 'not supported'
  assert not any('iterations' in claim for claim in verdicts)  # no probe: no row
  # The guard saw no collapse, but the teacher ends at 0.93 ln K: near uniform all the same.
  near_uniform = ([0.93] * 10, [0.1] * 10)
  iterations = [
      _teacher(_run(f'sinkhorn_{n}', 0, 0.5, 0.5, normalization='sinkhorn', sinkhorn_iters=n),
               *state) for n, state in ((1, near_uniform), (10, HEALTHY))
  ]
  verdicts = {claim: verdict for claim, verdict, _ in report.claims([default] + iterations)}
  claim = 'sinkhorn ({} Sinkhorn iterations) avoids the (near) uniform end of sinkhorn'
  assert verdicts[claim.format(1)] == 'not supported'
  assert verdicts[claim.format(10)] == 'supported'
  _teacher(default, *HEALTHY)
  verdict, _ = report._sinkhorn_claims([default, batch])[0][1:]
  assert verdict.startswith('not tested')


def test_layer_norm_head_claim_needs_one_cluster_for_none_and_no_image_dependence_for_the_prior():
  none = _teacher(_run('none', 0, 0.5, 0.5, normalization='none', head_norm='layer'), [0.0] * 10,
                  [0.0] * 10, {
                      'kind': 'one_cluster',
                      'since_step': 20
                  })
  # The same posterior over 50 prototypes for every image: 0.71 ln K, MI 0.
  prior = _teacher(_run('prior', 0, 0.3, 0.3, head_norm='layer'), [np.log(50) / np.log(256)] * 10,
                   [0.0] * 10, {
                       'kind': 'constant',
                       'since_step': 30
                   })
  prior.results['cluster_mi'] = 1e-6
  (claim, verdict, numbers), = report._layer_norm_head_claims([none, prior])
  assert claim.startswith('with a LayerNorm head the prior stops')
  assert verdict == 'supported'
  assert 'none (layer head): one cluster from epoch 2' in numbers
  assert 'prior/sweep T=1 (layer head): constant from epoch 3' in numbers
  assert 'teacher entropy at the end 0.7055 ln K (cluster_mi 0.0000' in numbers
  prior.results['cluster_mi'] = 1.5  # its images differ at the end
  assert report._layer_norm_head_claims([none, prior])[0][1] == 'not supported'
  prior.results['collapse'] = {'kind': 'one_cluster', 'since_step': 30}
  assert report._layer_norm_head_claims(
      [none, prior])[0][1].startswith('not supported: the prior collapsed to one cluster')
