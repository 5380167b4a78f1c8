"""The normalisation study's report: Markdown and PNG plots made from the runs' own logs.

    python -m kldino.report --study_dir=DIR      (or `launch.sweep ... --report`)

DIR holds one workdir per run (as launch.sweep makes them): its config.json, eval.json and
TensorBoard events. The report tabulates each run's final k-NN, linear probe and cluster_mi,
plots the prior-pass diagnostics over training (effective clusters, empty-cluster fraction,
Jensen gap, ||w_bar||) and the Jensen gap against the teacher temperature, and states for each
of the paper's claims whether the runs support it, with the numbers behind the verdict.
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
CURVES = (('prior_pass/effective_clusters', 'effective clusters (dataset)'),
          ('prior_pass/empty_cluster_fraction', 'fraction of empty clusters'),
          ('prior_pass/jensen_gap', 'Jensen gap KL(prior || centered), nats'),
          ('prior_pass/prototype_mean_norm', '||w_bar|| (mean unit prototype)'))


@dataclasses.dataclass
class Run:
  name: str
  config: dict
  results: dict
  scalars: dict  # tag -> [(step, value, wall_time)]

  def value(self, key: str):
    node = self.config
    for part in key.split('.'):
      node = node[part]
    return node

  def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted(self.scalars.get(tag, []))
    return (np.array([p[0] for p in points]), np.array([p[1] for p in points]))

  @property
  def label(self) -> str:
    objective, model = self.config['objective'], self.config['model']
    label = objective['normalization']
    if label == 'prior':
      label += f"/{objective['prior_source']}"
      if objective['prior_source'] == 'sweep':
        label += f" T={objective['prior_every_epochs']}"
    extras = []
    if model['prototypes'] != 'learned':
      extras.append(f"{model['prototypes']} prototypes")
    if model['head_norm'] != 'batch':
      extras.append(f"{model['head_norm']} head")
    if objective['teacher_temp'] != 0.04:
      extras.append(f"tau_t={objective['teacher_temp']}")
    return label + (f" ({', '.join(extras)})" if extras else '')


def _read_scalars(workdir: str) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tensor = tf.make_ndarray(value.tensor)
        if tensor.ndim:  # the images and histograms beside the scalars
          continue
        scalars.setdefault(value.tag, []).append((event.step, float(tensor), event.wall_time))
  return scalars


def load_runs(study_dir: str) -> list[Run]:
  runs = []
  for workdir in sorted(glob.glob(os.path.join(study_dir, '*', ''))):
    config_path, eval_path = (os.path.join(workdir, name) for name in ('config.json', 'eval.json'))
    if not (os.path.isfile(config_path) and os.path.isfile(eval_path)):
      continue  # not a finished run
    with open(config_path) as f, open(eval_path) as g:
      runs.append(
          Run(os.path.basename(os.path.normpath(workdir)), json.load(f), json.load(g),
              _read_scalars(workdir)))
  if not runs:
    raise ValueError(f'no finished runs (config.json + eval.json) under {study_dir}: run the '
                     'study first')
  return runs


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
  walls = [wall for points in run.scalars.values() for _, _, wall in points]
  _, seconds = run.series('prior_pass/seconds')
  return float(np.sum(seconds) / (max(walls) - min(walls))) if len(walls) > 1 else float('nan')


# --------------------------------------------------------------------------- plots


def _plot_accuracy(runs, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = [run.label for run in runs]
  data = {
      key: [run.results[key] for run in runs] for key in ('knn_top1', 'linear_top1', 'cluster_mi')
  }
  figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
  positions = np.arange(len(runs))
  top.bar(positions - 0.2, data['knn_top1'], 0.4, label='k-NN top-1')
  top.bar(positions + 0.2, data['linear_top1'], 0.4, label='linear top-1')
  low = min(data['knn_top1'] + data['linear_top1'])
  top.set_ylim(max(0.0, low - 0.05), 1.0)
  top.set_ylabel('accuracy')
  top.legend(loc='lower right')
  bottom.bar(positions, data['cluster_mi'], 0.6, color='tab:gray')
  bottom.axhline(COLLAPSE_MI, color='tab:red', linestyle='--', label='collapse alarm')
  bottom.set_ylabel('cluster_mi (nats)')
  bottom.set_xticks(positions, labels, rotation=45, ha='right')
  bottom.legend(loc='upper right')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return data


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
                  label=run.label,
                  color=colours[index % 20],
                  linestyle=('-', '--', ':', '-.')[index // 20 % 4])
        plotted.setdefault(tag, {})[run.name] = values.tolist()
    axis.set_title(title)
    axis.set_xlabel('step')
  handles, labels = axes.flat[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc='center right', fontsize=7)
  figure.tight_layout(rect=(0, 0, 0.8, 1))
  figure.savefig(path, dpi=100)
  plt.close(figure)
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
  chosen = _temperature_runs(runs)
  temps = [run.value('objective.teacher_temp') for run in chosen]
  gaps = [_mean_gap(run) for run in chosen]
  figure, axis = plt.subplots(figsize=(6, 4))
  axis.plot(temps, gaps, marker='o')
  axis.set_xlabel('teacher temperature tau_t')
  axis.set_ylabel('mean Jensen gap over prior passes (nats)')
  axis.set_title('prior-normalised vs centered targets')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return {'teacher_temp': temps, 'jensen_gap': gaps}


# --------------------------------------------------------------------------- claims


def _fmt(value) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def claims(runs) -> list[tuple[str, str, str]]:
  """(claim, verdict, the numbers behind it) for each claim the runs can speak to."""
  found = []
  none_runs = _find(runs, objective__normalization='none')
  if none_runs:
    collapsed = [run for run in none_runs if run.results['cluster_mi'] < COLLAPSE_MI]
    verdict = ('supported' if len(collapsed) == len(none_runs) else
               'partly supported' if collapsed else 'not supported')
    found.append(('`none` collapses', verdict, '; '.join(
        f"{run.label}: cluster_mi {_fmt(run.results['cluster_mi'])}" for run in none_runs)))
  prior_runs = _find(runs, objective__normalization='prior')
  if prior_runs:
    healthy = [run for run in prior_runs if run.results['cluster_mi'] > HEALTHY_MI]
    verdict = ('supported' if len(healthy) == len(prior_runs) else
               'partly supported' if healthy else 'not supported')
    found.append(('inverse-prior normalisation prevents collapse', verdict, '; '.join(
        f"{run.label}: cluster_mi {_fmt(run.results['cluster_mi'])}" for run in prior_runs)))
  default = _default_prior(runs)
  if default:
    gap = _mean_gap(default[0])
    found.append((
        f'centering approximates the prior closely at tau_t=0.04 (gap < {CLOSE_GAP} '
        'nats)', 'supported' if gap < CLOSE_GAP else 'not supported',
        f'mean Jensen gap over prior passes {_fmt(gap)} nats; norm of w_bar at the last prior pass '
        f"{_fmt(float(default[0].series('prior_pass/prototype_mean_norm')[1][-1]))}"))
  centered = _find(runs,
                   objective__normalization='prior',
                   objective__prior_source='sweep',
                   model__prototypes='centered',
                   model__head_norm='batch',
                   objective__teacher_temp=0.04)
  if centered and default:
    gaps = _mean_gap(centered[0]), _mean_gap(default[0])
    found.append(
        ('w_bar = 0 (centered prototypes) brings centering closer to the prior',
         'supported' if gaps[0] < 0.5 * gaps[1] else 'not supported',
         f'mean Jensen gap {_fmt(gaps[0])} nats with centered prototypes (norm of '
         f"w_bar {_fmt(float(centered[0].series('prior_pass/prototype_mean_norm')[1][-1]))})"
         f', {_fmt(gaps[1])} with learned ones'))
  temperature_runs = _temperature_runs(runs)
  if len(temperature_runs) >= 3:
    temps = np.array([run.value('objective.teacher_temp') for run in temperature_runs])
    gaps = np.array([_mean_gap(run) for run in temperature_runs])
    grows = bool(np.all(np.diff(gaps) < 0))  # temperatures ascending: gaps must fall
    found.append(
        ('the gap grows as the temperature falls (larger logits / tau)',
         'supported' if grows else 'not supported',
         ', '.join(f'tau_t={_fmt(float(t))}: {_fmt(float(g))}' for t, g in zip(temps, gaps))))
  center = _find(runs, objective__normalization='center', model__head_norm='batch')
  if center and default:
    below = all(
        center[0].results[key] < default[0].results[key] for key in ('knn_top1', 'linear_top1'))
    found.append(
        ("centering's accuracy is below the prior's", 'supported' if below else 'not supported',
         '; '.join(f"{key}: center {_fmt(center[0].results[key])}, prior "
                   f"{_fmt(default[0].results[key])}" for key in ('knn_top1', 'linear_top1'))))
  periods = sorted(_find(runs,
                         objective__normalization='prior',
                         objective__prior_source='sweep',
                         model__prototypes='learned',
                         model__head_norm='batch',
                         objective__teacher_temp=0.04),
                   key=lambda run: run.value('objective.prior_every_epochs'))
  if len(periods) >= 2:
    found.append((
        'accuracy against the prior period T, and the cost of the prior passes', 'measured',
        '; '.join(
            f"T={run.value('objective.prior_every_epochs')}: k-NN {_fmt(run.results['knn_top1'])}, "
            f"linear {_fmt(run.results['linear_top1'])}, "
            f'prior passes {100 * _prior_pass_cost(run):.1f}% of the run time' for run in periods)))
  return found


# --------------------------------------------------------------------------- the report


def write_report(study_dir: str) -> dict:
  """Writes study_dir/report.md and its plots; returns what was plotted (for checks)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  runs = load_runs(study_dir)
  plotted = {
      'accuracy.png':
          _plot_accuracy(runs, os.path.join(study_dir, 'accuracy.png')),
      'prior_pass_curves.png':
          _plot_curves(runs, os.path.join(study_dir, 'prior_pass_curves.png')),
      'gap_vs_temperature.png':
          _plot_gap_vs_temperature(runs, os.path.join(study_dir, 'gap_vs_temperature.png')),
  }
  lines = [
      '# Normalisation study', '',
      f'{len(runs)} runs under `{os.path.abspath(study_dir)}`, generated by '
      '`python -m kldino.report` from each run\'s eval.json and TensorBoard logs.', '',
      '| run | k-NN | linear | cluster_mi | effective clusters | mean Jensen gap |',
      '| --- | --- | --- | --- | --- | --- |'
  ]
  for run in runs:
    lines.append(f"| {run.label} | {run.results['knn_top1']:.4f} | "
                 f"{run.results['linear_top1']:.4f} | {run.results['cluster_mi']:.3f} | "
                 f"{run.results['effective_clusters']:.1f} | {_mean_gap(run):.4f} |")
  lines += [
      '', '## What the runs say about the paper\'s claims', '', '| claim | verdict | measured |',
      '| --- | --- | --- |'
  ]
  lines += [f'| {claim} | **{verdict}** | {numbers} |' for claim, verdict, numbers in claims(runs)]
  lines += [
      '', f'Thresholds: collapsed below cluster_mi {COLLAPSE_MI}, healthy above '
      f'{HEALTHY_MI} nats; "close" below a {CLOSE_GAP}-nat Jensen gap.', '',
      '## Accuracy and collapse', '', '![accuracy](accuracy.png)', '',
      '## Prior-pass diagnostics over training', '', '![prior-pass curves](prior_pass_curves.png)',
      '', '## Jensen gap against the teacher temperature', '',
      '![gap vs temperature](gap_vs_temperature.png)', ''
  ]
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


if __name__ == '__main__':
  sys.exit(main())
