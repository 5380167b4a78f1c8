"""The normalisation study's report: Markdown and PNG plots made from the runs' own logs.

    python -m kldino.report --study_dir=DIR      (or `launch.sweep ... --report`)

DIR holds one workdir per run (as launch.sweep makes them): its config.json, eval.json and
TensorBoard events. What the report reads of each finished run is also kept in DIR/runs.json,
which is small enough to commit without the workdirs: the report is then regenerated from it
and from whichever workdirs are present (a workdir wins over its record), and launch.sweep skips
the jobs recorded there. Runs that differ only in their seed form one setting. The report
tabulates each setting's final k-NN, linear probe and cluster_mi (mean and range over seeds),
plots the k-NN during training and the prior-pass diagnostics (effective clusters, empty-cluster
fraction, Jensen gap, ||w_bar||), and the Jensen gap against the teacher temperature, and states
for each of the paper's claims whether the runs support it, with the numbers behind the verdict
and whether the seeds separate the settings compared.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys

import numpy as np

COLLAPSE_MI = 0.35  # below: collapsed (MI is a collapse alarm, not a quality score)
HEALTHY_MI = 0.7  # above: healthy
CLOSE_GAP = 0.1  # nats: a Jensen gap this small means centering approximates the prior well
RECORD = 'runs.json'
# What a run's label names when the run differs from it: (config key, how, the default).
LABEL_EXTRAS = (
    ('model.prototypes', '{} prototypes', 'learned'),
    ('model.num_prototypes', 'K={}', 256),
    ('model.head_norm', '{} head', 'batch'),
    ('objective.teacher_temp', 'tau_t={}', 0.04),
    ('objective.sinkhorn_iters', '{} Sinkhorn iterations', 3),
    ('batch_size', 'batch {}', 64),
)
KNN_CURVE = 'eval/knn_top1'
PRIOR_PASS_SECONDS = 'prior_pass/seconds'
# The train step's teacher-side metrics (kldino/core/objective.py target_diagnostics), to see how a
# run collapses or does not in its first epochs.
TRAIN_CURVES = (('teacher_entropy', "teacher's per-image entropy (nats)"),
                ('target_entropy', "targets' per-image entropy (nats)"),
                ('batch_effective_clusters', "effective clusters of the batch's targets"),
                ('teacher_mi', "teacher's cluster mutual information (nats)"))
CURVES = (('prior_pass/effective_clusters', 'effective clusters (dataset)'),
          ('prior_pass/empty_cluster_fraction', 'fraction of empty clusters'),
          ('prior_pass/jensen_gap', 'Jensen gap KL(prior || centered), nats'),
          ('prior_pass/prototype_mean_norm', '||w_bar|| (mean unit prototype)'))
# The epochs at which the report tabulates the targets, the empty clusters and the prototypes'
# spread, and what: whether a run ends uniform or collapsed is decided in its first epochs.
EARLY_EPOCHS = (1, 2, 5, 10, 20)
EARLY_TAGS = TRAIN_CURVES + CURVES[1:2] + CURVES[3:]
# Where a run starts: the prior pass before step 0 (the initial teacher on the whole dataset) and
# the train step's first log. A head without batch statistics starts with nearly the same
# posterior for every image (docs/results.md, the LayerNorm head).
START_TAGS = CURVES[:2] + TRAIN_CURVES[3:] + TRAIN_CURVES[:1]
END_FRACTION = 0.1  # how the runs end: their last tenth
NEAR_UNIFORM = 0.9  # a teacher's per-image entropy above this fraction of ln K: (near) uniform


@dataclasses.dataclass
class Run:
  name: str
  config: dict
  results: dict
  scalars: dict  # tag -> [(step, value)], the tags the report reads
  wall_span: tuple[float, float]  # wall times of the run's first and last logged event

  def value(self, key: str):
    node = self.config
    for part in key.split('.'):
      node = node[part]
    return node

  def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `tag`, one value a step: the last logged (a run evaluated again at a
    step it had logged, its final one, logs it twice)."""
    by_step = dict(self.scalars.get(tag, []))
    steps = sorted(by_step)
    return np.array(steps), np.array([by_step[step] for step in steps])

  @property
  def seed(self) -> int:
    return self.config['seed']

  @property
  def label(self) -> str:
    """The run's setting: what it changes from the default, its seed aside."""
    objective = self.config['objective']
    label = objective['normalization']
    if label == 'prior':
      label += f"/{objective['prior_source']}"
      if objective['prior_source'] == 'sweep':
        label += f" T={objective['prior_every_epochs']}"
    extras = [
        template.format(self.value(key))
        for key, template, default in LABEL_EXTRAS
        if self.value(key) != default
    ]
    return label + (f" ({', '.join(extras)})" if extras else '')


def _read_scalars(workdir: str) -> tuple[dict, tuple[float, float]]:
  """The report's tags from a workdir's TensorBoard events, and the span of their wall times."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = {tag for tag, _ in CURVES + TRAIN_CURVES} | {KNN_CURVE, PRIOR_PASS_SECONDS}
  scalars, walls = {}, []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      walls.append(event.wall_time)
      for value in event.summary.value:
        if value.tag in tags:
          scalars.setdefault(value.tag, []).append(
              (event.step, float(tf.make_ndarray(value.tensor))))
  return scalars, (min(walls), max(walls)) if walls else (float('nan'),) * 2


def _workdir_run(workdir: str) -> Run | None:
  config_path, eval_path = (os.path.join(workdir, name) for name in ('config.json', 'eval.json'))
  if not (os.path.isfile(config_path) and os.path.isfile(eval_path)):
    return None  # not a finished run
  with open(config_path) as f, open(eval_path) as g:
    config, results = json.load(f), json.load(g)
  return Run(os.path.basename(os.path.normpath(workdir)), config, results, *_read_scalars(workdir))


def recorded_runs(study_dir: str) -> dict[str, Run]:
  """The runs kept in study_dir/runs.json, by name ({} without one)."""
  path = os.path.join(study_dir, RECORD)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    record = json.load(f)
  return {
      name:
          Run(name, entry['config'], entry['results'], {
              tag: [tuple(point) for point in points] for tag, points in entry['scalars'].items()
          }, tuple(entry['wall_span'])) for name, entry in record.items()
  }


def save_record(study_dir: str, runs: list[Run]):
  record = {
      run.name: {
          'config': run.config,
          'results': run.results,
          'scalars': run.scalars,
          'wall_span': list(run.wall_span)
      } for run in runs
  }
  with open(os.path.join(study_dir, RECORD), 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)


def load_runs(study_dir: str) -> list[Run]:
  """Every finished run: the workdirs under study_dir, and the recorded runs without one."""
  runs = recorded_runs(study_dir)
  for workdir in glob.glob(os.path.join(study_dir, '*', '')):
    if run := _workdir_run(workdir):
      runs[run.name] = run
  if not runs:
    raise ValueError(f'no finished runs (config.json + eval.json, or {RECORD}) under '
                     f'{study_dir}: run the study first')
  return [runs[name] for name in sorted(runs)]


def settings(runs: list[Run]) -> dict[str, list[Run]]:
  """label -> its runs (its seeds), in the order of the runs' names."""
  groups = {}
  for run in runs:
    groups.setdefault(run.label, []).append(run)
  return groups


def _find(runs, **criteria) -> list[Run]:
  """Runs whose config has these values ('objective__normalization': 'center', ...)."""
  return [
      run for run in runs if all(
          run.value(key.replace('__', '.')) == value for key, value in criteria.items())
  ]


def _default_prior(runs) -> list[Run]:
  return _find(runs,
               objective__normalization='prior',
               objective__prior_source='sweep',
               objective__prior_every_epochs=1,
               model__prototypes='learned',
               model__head_norm='batch',
               objective__teacher_temp=0.04)


def _mean_gap(run) -> float:
  _, gaps = run.series('prior_pass/jensen_gap')
  return float(np.mean(gaps)) if gaps.size else float('nan')


def _prior_pass_cost(run) -> float:
  """Seconds of prior passes over the seconds of the whole run (first to last logged event)."""
  _, seconds = run.series(PRIOR_PASS_SECONDS)
  first, last = run.wall_span
  return float(np.sum(seconds) / (last - first)) if last > first else float('nan')


def _mean(runs, value) -> float:
  return float(np.mean([value(run) for run in runs]))


def _result(key):
  return lambda run: run.results[key]


def _spread(runs, value) -> str:
  """'mean' for one run, 'mean (min-max, n seeds)' for several."""
  values = [value(run) for run in runs]
  if len(values) == 1:
    return f'{values[0]:.4f}'
  return f'{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f}, {len(values)} seeds)'


def _separated(first, second, value) -> bool | None:
  """Whether the seeds separate two settings (their ranges of `value` do not overlap); None when
  a setting has one seed: one seed has no range and cannot tell."""
  a, b = [value(run) for run in first], [value(run) for run in second]
  if min(len(a), len(b)) < 2:
    return None
  return max(a) < min(b) or max(b) < min(a)


_SEPARATION = {
    None: 'one seed: not tested against seed noise',
    True: 'separated by the seeds',
    False: 'not separated by the seeds'
}

# --------------------------------------------------------------------------- plots


def _plot_accuracy(groups, path):
  """Each setting's mean k-NN, linear and cluster_mi, with bars from the lowest to the highest
  seed."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = ('knn_top1', 'linear_top1', 'cluster_mi')
  data = {key: [_mean(members, _result(key)) for members in groups.values()] for key in keys}
  ranges = {
      key:
          np.array([[
              mean - min(r.results[key] for r in members),
              max(r.results[key] for r in members) - mean
          ] for mean, members in zip(data[key], groups.values())]).T for key in keys
  }
  figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
  positions = np.arange(len(groups))
  top.bar(positions - 0.2, data['knn_top1'], 0.4, yerr=ranges['knn_top1'], label='k-NN top-1')
  top.bar(positions + 0.2,
          data['linear_top1'],
          0.4,
          yerr=ranges['linear_top1'],
          label='linear top-1')
  low = min(data['knn_top1'] + data['linear_top1'])
  top.set_ylim(max(0.0, low - 0.05), 1.0)
  top.set_ylabel('accuracy (mean, range over seeds)')
  top.legend(loc='lower right')
  bottom.bar(positions, data['cluster_mi'], 0.6, yerr=ranges['cluster_mi'], color='tab:gray')
  bottom.axhline(COLLAPSE_MI, color='tab:red', linestyle='--', label='collapse alarm')
  bottom.set_ylabel('cluster_mi (nats)')
  bottom.set_xticks(positions, list(groups), rotation=45, ha='right')
  bottom.legend(loc='upper right')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return data


def _seed_mean(members, tag):
  """(steps, mean over the seeds that logged `tag`, up to the shortest of them), or None."""
  curves = [run.series(tag) for run in members if run.series(tag)[0].size]
  if not curves:
    return None
  length = min(steps.size for steps, _ in curves)
  return curves[0][0][:length], np.mean([values[:length] for _, values in curves], axis=0)


def _save_with_legend(figure, axes, path, *, width: float):
  """The first panel's legend to the right of the panels (which keep `width` of the figure)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  handles, labels = axes.flat[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc='center right', fontsize=7)
  figure.tight_layout(rect=(0, 0, width, 1))
  figure.savefig(path, dpi=100)
  plt.close(figure)


def _plot_seed_means(groups, path, curves, *, columns: int):
  """One panel per (tag, title) of `curves`: each setting's mean over its seeds."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = -(-len(curves) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4 * rows), squeeze=False)
  plotted = {}
  colours = plt.get_cmap('tab20').colors
  for axis, (tag, title) in zip(axes.flat, curves):
    for index, (label, members) in enumerate(groups.items()):
      if (curve := _seed_mean(members, tag)) is not None:
        axis.plot(*curve,
                  label=label,
                  color=colours[index % 20],
                  linestyle=('-', '--')[index // 20 % 2])
        plotted.setdefault(tag, {})[label] = curve[1].tolist()
    axis.set_title(title)
    axis.set_xlabel('step')
  _save_with_legend(figure, axes, path, width=0.78)
  return plotted


def _plot_curves(runs, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(2, 2, figsize=(14, 8))
  plotted = {}
  colours = plt.get_cmap('tab20').colors  # 20 distinct colours, 4 line styles: 80 runs apart
  for axis, (tag, title) in zip(axes.flat, CURVES):
    for index, run in enumerate(runs):
      steps, values = run.series(tag)
      if steps.size:
        axis.plot(steps,
                  values,
                  marker='o',
                  markersize=3,
                  label=f'{run.label} seed {run.seed}',
                  color=colours[index % 20],
                  linestyle=('-', '--', ':', '-.')[index // 20 % 4])
        plotted.setdefault(tag, {})[run.name] = values.tolist()
    axis.set_title(title)
    axis.set_xlabel('step')
  _save_with_legend(figure, axes, path, width=0.8)
  return plotted


def _temperature_runs(runs):
  return sorted(_find(runs,
                      objective__normalization='prior',
                      objective__prior_source='sweep',
                      model__prototypes='learned',
                      model__head_norm='batch',
                      objective__prior_every_epochs=1),
                key=lambda run: run.value('objective.teacher_temp'))


def _plot_gap_vs_temperature(runs, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  temperatures = _by_value(_temperature_runs(runs), 'objective.teacher_temp')
  temps = list(temperatures)
  gaps = [_mean(members, _mean_gap) for members in temperatures.values()]
  figure, axis = plt.subplots(figsize=(6, 4))
  axis.plot(temps, gaps, marker='o')
  axis.set_xlabel('teacher temperature tau_t')
  axis.set_ylabel('mean Jensen gap over prior passes (nats), mean over seeds')
  axis.set_title('prior-normalised vs centered targets')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return {'teacher_temp': temps, 'jensen_gap': gaps}


# --------------------------------------------------------------------------- claims


def _fmt(value) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def _cluster_mis(runs) -> str:
  return '; '.join(f"{label}: cluster_mi {_spread(members, _result('cluster_mi'))}"
                   for label, members in settings(runs).items())


def _share_verdict(selected, runs) -> str:
  return (
      'supported' if len(selected) == len(runs) else
      f'partly supported ({len(selected)} of {len(runs)} runs)' if selected else 'not supported')


def _accuracy_comparison(first, second, names) -> tuple[str, str]:
  """(the verdict on "first is below second in k-NN and linear", the numbers behind it). Means in
  the claimed order are not enough: where the seeds' ranges overlap the verdict is 'not separated
  by the seeds', and a setting with one seed is only 'supported by one seed'."""
  below, separated, numbers = True, True, []
  for key in ('knn_top1', 'linear_top1'):
    value = _result(key)
    below &= _mean(first, value) < _mean(second, value)
    key_separated = _separated(first, second, value)
    separated &= key_separated is not False
    numbers.append(f'{key}: {names[0]} {_spread(first, value)}, {names[1]} '
                   f'{_spread(second, value)}, {_SEPARATION[key_separated]}')
  if not below:
    verdict = 'not supported'
  elif not separated:
    verdict = 'not separated by the seeds'
  elif min(len(first), len(second)) < 2:
    verdict = 'supported by one seed'
  else:
    verdict = 'supported'
  return verdict, '; '.join(numbers)


def claims(runs) -> list[tuple[str, str, str]]:
  """(claim, verdict, the numbers behind it) for each claim the runs can speak to; a setting's
  numbers are its mean and range over seeds."""
  found = []
  none_runs = _find(runs, objective__normalization='none')
  if none_runs:
    collapsed = [run for run in none_runs if run.results['cluster_mi'] < COLLAPSE_MI]
    found.append(('`none` collapses', _share_verdict(collapsed,
                                                     none_runs), _cluster_mis(none_runs)))
  prior_runs = _find(runs, objective__normalization='prior')
  if prior_runs:
    healthy = [run for run in prior_runs if run.results['cluster_mi'] > HEALTHY_MI]
    found.append(('inverse-prior normalisation prevents collapse',
                  _share_verdict(healthy, prior_runs), _cluster_mis(prior_runs)))
  default = _default_prior(runs)
  if default:
    gap = _mean(default, _mean_gap)
    found.append(
        (f'centering approximates the prior closely at tau_t=0.04 (gap < {CLOSE_GAP} '
         'nats)', 'supported' if gap < CLOSE_GAP else 'not supported',
         f'mean Jensen gap over prior passes {_spread(default, _mean_gap)} nats; norm of w_bar at '
         f'the last prior pass {_spread(default, _last_w_bar)}'))
  centered = _find(runs,
                   objective__normalization='prior',
                   objective__prior_source='sweep',
                   model__prototypes='centered',
                   model__head_norm='batch',
                   objective__teacher_temp=0.04)
  if centered and default:
    gaps = _mean(centered, _mean_gap), _mean(default, _mean_gap)
    found.append(
        ('w_bar = 0 (centered prototypes) brings centering closer to the prior',
         'supported' if gaps[0] < 0.5 * gaps[1] else 'not supported',
         f'mean Jensen gap {_spread(centered, _mean_gap)} nats with centered prototypes (norm of '
         f'w_bar {_spread(centered, _last_w_bar)}), {_spread(default, _mean_gap)} with learned '
         'ones'))
  temperatures = _by_value(_temperature_runs(runs), 'objective.teacher_temp')
  if len(temperatures) >= 3:
    gaps = np.array([_mean(members, _mean_gap) for members in temperatures.values()])
    grows = bool(np.all(np.diff(gaps) < 0))  # temperatures ascending: gaps must fall
    found.append(('the gap grows as the temperature falls (larger logits / tau)',
                  'supported' if grows else 'not supported',
                  ', '.join(f'tau_t={_fmt(float(temp))}: {_spread(members, _mean_gap)}'
                            for temp, members in temperatures.items())))
  center = _find(runs, objective__normalization='center', model__head_norm='batch')
  if center and default:
    found.append(("centering's accuracy is below the prior's",
                  *_accuracy_comparison(center, default, ('center', 'prior'))))
  for source in ('batch', 'ema'):
    estimated = _find(runs,
                      objective__normalization='prior',
                      objective__prior_source=source,
                      model__head_norm='batch',
                      objective__teacher_temp=0.04)
    if estimated and default:
      found.append((f"the dataset's prior (a prior pass) beats the prior estimated from the "
                    f"{source} statistics", *_accuracy_comparison(estimated, default,
                                                                  (source, 'sweep'))))
  periods = _by_value(
      _find(runs,
            objective__normalization='prior',
            objective__prior_source='sweep',
            model__prototypes='learned',
            model__head_norm='batch',
            objective__teacher_temp=0.04), 'objective.prior_every_epochs')
  if len(periods) >= 2:
    found.append(
        ('accuracy against the prior period T, and the cost of the prior passes', 'measured',
         '; '.join(f"T={period}: k-NN {_spread(members, _result('knn_top1'))}, linear "
                   f"{_spread(members, _result('linear_top1'))}, prior passes "
                   f'{100 * _mean(members, _prior_pass_cost):.1f}% of the run time'
                   for period, members in periods.items())))
  found += _sinkhorn_claims(runs) + _layer_norm_head_claims(runs)
  return found


def _only_differs_in(run, key: str | None) -> bool:
  """Whether `run` has every LABEL_EXTRAS default but `key`'s (None: every default)."""
  return all((run.value(extra) != default) == (extra == key) for extra, _, default in LABEL_EXTRAS)


def _sinkhorn_claims(runs) -> list[tuple[str, str, str]]:
  """Whether each probe of Sinkhorn's uniform end (a Sinkhorn setting that changes one
  LABEL_EXTRAS key from the default; sweeps/study_vit.py) avoids it."""
  sinkhorn = _find(runs, objective__normalization='sinkhorn')
  default = [run for run in sinkhorn if _only_differs_in(run, None)]
  if not default:
    return []
  default_uniform = all(_uniform(run) for run in default)
  found = []
  for key, _, _ in LABEL_EXTRAS:
    for label, probe in settings([run for run in sinkhorn if _only_differs_in(run, key)]).items():
      verdict = (_share_verdict([run for run in probe if not _uniform(run)], probe)
                 if default_uniform else
                 'not tested: Sinkhorn at the default did not end (near) uniform')
      found.append((f'{label} avoids the (near) uniform end of {default[0].label}', verdict,
                    _collapse_states(default + probe)))
  return found


def _layer_norm_head_claims(runs) -> list[tuple[str, str, str]]:
  """The LayerNorm head: `none` collapses to one cluster; the prior stops that, but its teacher
  still ends independent of the image (cluster_mi below COLLAPSE_MI)."""
  layer = _find(runs, model__head_norm='layer', objective__teacher_temp=0.04)
  none = _find(layer, objective__normalization='none')
  prior = _find(layer, objective__normalization='prior')
  if not (none and prior):
    return []
  verdict = ('not supported: `none` did not collapse to one cluster'
             if not all(_collapsed(run, 'one_cluster') for run in none) else
             'not supported: the prior collapsed to one cluster' if any(
                 _collapsed(run, 'one_cluster') for run in prior) else _share_verdict(
                     [run for run in prior if run.results['cluster_mi'] < COLLAPSE_MI], prior))
  return [('with a LayerNorm head the prior stops the one-cluster collapse of `none`, but its '
           f'teacher still ends independent of the image (cluster_mi < {COLLAPSE_MI})', verdict,
           _collapse_states(none + prior))]


def _last_w_bar(run) -> float:
  _, norms = run.series('prior_pass/prototype_mean_norm')
  return float(norms[-1]) if norms.size else float('nan')


def _steps_per_epoch(run) -> float:
  return run.results['step'] / run.config['num_epochs']


def _collapsed(run, kind: str) -> bool:
  """Whether the run's collapse guard (kldino/core/guard.py) saw this kind of collapse."""
  return (run.results.get('collapse') or {}).get('kind') == kind


def _collapse_state(run) -> str:
  """What the collapse guard saw first, and at which epoch: it records the first collapse that
  lasted guard.patience_epochs, whether or not the run recovered from it."""
  collapse = run.results.get('collapse')
  if not collapse:
    return 'no collapse'
  epoch = collapse['since_step'] / _steps_per_epoch(run)
  return f"{collapse['kind'].replace('_', ' ')} from epoch {epoch:.0f}"


def _uniform(run) -> bool:
  """A uniform collapse as the guard saw it, or a teacher near uniform at the end (above
  NEAR_UNIFORM * ln K: a run can sit just under the guard's threshold with its features lost)."""
  return _collapsed(run, 'uniform') or _end_entropy_fraction(run) > NEAR_UNIFORM


def _collapse_states(runs) -> str:
  return '; '.join(
      f"{label}: {', '.join(_collapse_state(run) for run in members)}, teacher entropy at the "
      f'end {_spread(members, _end_entropy_fraction)} ln K (cluster_mi '
      f"{_spread(members, _result('cluster_mi'))}, k-NN {_spread(members, _result('knn_top1'))})"
      for label, members in settings(runs).items())


def _end_mean(run, tag) -> float:
  """`tag`'s mean over the last END_FRACTION of the run's steps (one logged step is noisy)."""
  steps, values = run.series(tag)
  if not steps.size:
    return float('nan')
  return float(np.mean(values[steps >= (1 - END_FRACTION) * run.results['step']]))


def _end_entropy_fraction(run) -> float:
  """The teacher's per-image entropy at the end, as a fraction of its maximum ln K."""
  return _end_mean(run, 'teacher_entropy') / np.log(run.value('model.num_prototypes'))


def _near_epoch(run, tag, epoch: int | None) -> float:
  """`tag`'s value logged nearest to the end of `epoch` (None: its last); nan where unlogged or
  where the nearest logged step is more than an epoch away (a large batch has few steps an
  epoch, fewer than the steps between two logs)."""
  steps, values = run.series(tag)
  if not steps.size:
    return float('nan')
  if epoch is None:
    return float(values[-1])
  steps_per_epoch = _steps_per_epoch(run)
  distances = np.abs(steps - epoch * steps_per_epoch)
  nearest = np.argmin(distances)
  return float(values[nearest]) if distances[nearest] <= steps_per_epoch else float('nan')


def _by_value(runs, key) -> dict:
  """value of `key` -> its runs, values ascending."""
  groups = {}
  for run in sorted(runs, key=lambda run: run.value(key)):
    groups.setdefault(run.value(key), []).append(run)
  return groups


# --------------------------------------------------------------------------- the report


def _setting_rows(groups) -> list[str]:
  rows = [
      '| setting | seeds | k-NN | linear | cluster_mi | effective clusters | mean Jensen gap |',
      '| --- | --- | --- | --- | --- | --- | --- |'
  ]
  for label, members in groups.items():
    rows.append(f"| {label} | {', '.join(str(run.seed) for run in members)} | "
                f"{_spread(members, _result('knn_top1'))} | "
                f"{_spread(members, _result('linear_top1'))} | "
                f"{_spread(members, _result('cluster_mi'))} | "
                f"{_mean(members, _result('effective_clusters')):.1f} | "
                f'{_mean(members, _mean_gap):.4f} |')
  return rows


def _cell(values) -> str:
  """The mean of the seeds' values that were logged; '-' where none was."""
  logged = [value for value in values if not np.isnan(value)]
  return f'{np.mean(logged):.3g}' if logged else '-'


def _early_rows(groups, tag: str, title: str) -> list[str]:
  epochs = EARLY_EPOCHS + (None,)
  rows = [
      f'{title}, mean over seeds:', '',
      '| setting | ' + ' | '.join(f'epoch {epoch}' for epoch in EARLY_EPOCHS) + ' | end |',
      '| --- |' + ' --- |' * len(epochs)
  ]
  for label, members in groups.items():
    cells = [_cell([_near_epoch(run, tag, epoch) for run in members]) for epoch in epochs]
    rows.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return rows + ['']


def _first_logged(run, tag) -> float:
  _, values = run.series(tag)
  return float(values[0]) if values.size else float('nan')


def _start_rows(groups) -> list[str]:
  """Each setting's first logged value of START_TAGS, mean over seeds."""
  rows = [
      '| setting | ' + ' | '.join(title for _, title in START_TAGS) + ' |',
      '| --- |' + ' --- |' * len(START_TAGS)
  ]
  for label, members in groups.items():
    cells = [_cell([_first_logged(run, tag) for run in members]) for tag, _ in START_TAGS]
    rows.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return rows + ['']


def _end_rows(groups) -> list[str]:
  rows = [
      '| setting | the collapse guard, each seed | teacher entropy / ln K | teacher MI (nats) | '
      'cluster_mi |', '| --- | --- | --- | --- | --- |'
  ]
  for label, members in groups.items():
    rows.append(f"| {label} | {', '.join(_collapse_state(run) for run in members)} | "
                f'{_spread(members, _end_entropy_fraction)} | '
                f"{_spread(members, lambda run: _end_mean(run, 'teacher_mi'))} | "
                f"{_spread(members, _result('cluster_mi'))} |")
  return rows + ['']


def _run_rows(runs) -> list[str]:
  rows = [
      '| run | seed | k-NN | linear | cluster_mi | effective clusters | mean Jensen gap |',
      '| --- | --- | --- | --- | --- | --- | --- |'
  ]
  rows += [
      f"| {run.label} | {run.seed} | {run.results['knn_top1']:.4f} | "
      f"{run.results['linear_top1']:.4f} | {run.results['cluster_mi']:.3f} | "
      f"{run.results['effective_clusters']:.1f} | {_mean_gap(run):.4f} |" for run in runs
  ]
  return rows


def write_report(study_dir: str) -> dict:
  """Writes study_dir/report.md, its plots and runs.json; returns what was plotted (for
  checks)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  runs = load_runs(study_dir)
  save_record(study_dir, runs)
  groups = settings(runs)
  plotted = {
      'accuracy.png':
          _plot_accuracy(groups, os.path.join(study_dir, 'accuracy.png')),
      'knn_curves.png':
          _plot_seed_means(groups,
                           os.path.join(study_dir, 'knn_curves.png'),
                           ((KNN_CURVE, 'k-NN top-1 during training (mean over seeds)'),),
                           columns=1),
      'training_curves.png':
          _plot_seed_means(groups,
                           os.path.join(study_dir, 'training_curves.png'),
                           TRAIN_CURVES,
                           columns=2),
      'prior_pass_curves.png':
          _plot_curves(runs, os.path.join(study_dir, 'prior_pass_curves.png')),
      'gap_vs_temperature.png':
          _plot_gap_vs_temperature(runs, os.path.join(study_dir, 'gap_vs_temperature.png')),
  }
  lines = [
      '# Normalisation study', '',
      f'{len(runs)} runs in {len(groups)} settings, generated by `python -m kldino.report '
      f'--study_dir={os.path.relpath(study_dir)}` from each run\'s eval.json and TensorBoard '
      f'logs, kept in {RECORD}. A setting\'s figures are the mean over its seeds, with the lowest '
      'and highest seed in brackets.', ''
  ]
  lines += _setting_rows(groups)
  lines += [
      '', '## What the runs say about the paper\'s claims', '', '| claim | verdict | measured |',
      '| --- | --- | --- |'
  ]
  lines += [f'| {claim} | **{verdict}** | {numbers} |' for claim, verdict, numbers in claims(runs)]
  lines += [
      '', f'Thresholds: collapsed below cluster_mi {COLLAPSE_MI}, healthy above '
      f'{HEALTHY_MI} nats; "close" below a {CLOSE_GAP}-nat Jensen gap. Two settings are '
      'separated by the seeds when the ranges of their seeds do not overlap; a claim that one '
      'setting is more accurate is supported only where the seeds separate them, and reads "not '
      'separated by the seeds" where the means agree with it but the seeds overlap.', '',
      '## Accuracy and collapse', '', '![accuracy](accuracy.png)', '', '## k-NN during training',
      '', '![k-NN curves](knn_curves.png)', '',
      "## The teacher's targets during training (mean over seeds)", '',
      '![training curves](training_curves.png)', '', '## The start', '',
      'The first logged value, mean over seeds: for the prior pass\'s figures, the pass before '
      'step 0 (the initial teacher over the whole dataset); for the train step\'s, its first log '
      'step.', ''
  ]
  lines += _start_rows(groups)
  lines += ['## The first epochs', '']
  for tag, title in EARLY_TAGS:
    lines += _early_rows(groups, tag, title)
  lines += [
      '## Collapse', '',
      'What the collapse guard (kldino/core/guard.py, the run\'s own thresholds) saw first, at the '
      'epoch it began: one cluster (fewer than guard.min_clusters effective clusters per batch), '
      'uniform (per-image entropy above guard.uniform_entropy * ln K and the teacher\'s cluster '
      'MI below guard.uniform_mi) or constant (the same posterior for every image: MI below '
      'guard.constant_mi, neither of the others), lasting guard.patience_epochs; a run may recover '
      f'after it. Then the teacher\'s train-step entropy and MI over the last {END_FRACTION:.0%} '
      'of the run, and the final cluster_mi.', ''
  ]
  lines += _end_rows(groups)
  lines += [
      '## Prior-pass diagnostics over training', '', '![prior-pass curves](prior_pass_curves.png)',
      '', '## Jensen gap against the teacher temperature', '',
      '![gap vs temperature](gap_vs_temperature.png)', '', '## Every run', ''
  ]
  lines += _run_rows(runs) + ['']
  with open(os.path.join(study_dir, 'report.md'), 'w') as f:
    f.write('\n'.join(lines))
  return plotted


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  flags = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  flags.add_argument('--study_dir', required=True)
  args = flags.parse_args(argv)
  try:
    write_report(args.study_dir)
  except ValueError as error:
    print(f'kldino.report: {error}', file=sys.stderr)
    return 2
  print(os.path.join(args.study_dir, 'report.md'))
  return 0
