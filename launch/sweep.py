"""Config sweeps: a sweep file becomes one job per point, each in its own workdir, run here one
after the other (runner `local`) or handed to the TPU VM or SLURM launcher.

    python -m launch.sweep --sweep=sweeps/normalisations.py --config=configs/digits.py \
        --workdir_root=/tmp/sweep [--runner=local|tpu_vm|slurm] [--dry_run] [--report] \
        [-- LAUNCHER FLAGS]

A sweep file defines `get_sweep()` returning a dict with one of
    'grid': {KEY: [values, ...], ...}     every combination, the last key varying fastest
    'list': [{KEY: value, ...}, ...]      exactly these points
and optionally 'fixed': {KEY: value, ...}, applied to every job. KEYs are config keys
(`objective.normalization`); each job runs with `--config.KEY=VALUE` for its point.

The local runner runs the jobs one after the other (a failed job does not stop the others) and
writes WORKDIR_ROOT/summary.json with every job's evaluation; rerunning the sweep resumes each job
from its checkpoints (a finished job is only evaluated again), and skips a job recorded in
WORKDIR_ROOT/runs.json (the study's record, kldino/tools/report.py) that has no workdir here: a
study committed part-way continues on another machine. The TPU VM runner gives job i the VM
`--name`-i; the SLURM runner gives it the job name `--job_name`-NAME.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import sys
from typing import NamedTuple

from kldino import errors
from kldino.tools import report
from launch.common import execute, kldino_command

RUNNERS = ('local', 'tpu_vm', 'slurm')


class Job(NamedTuple):
  name: str
  workdir: str
  overrides: tuple[str, ...]  # 'KEY=VALUE'


def load_sweep(path: str) -> dict:
  if not os.path.isfile(path):
    raise ValueError(f'sweep file {path} does not exist')
  spec = importlib.util.spec_from_file_location('kldino_sweep', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path} defines no get_sweep(): it must return {{"grid": ...}} or '
                     '{"list": ...}')
  return module.get_sweep()


def expand(sweep: dict) -> list[dict]:
  """The points of a sweep, in order, each with the fixed values."""
  kinds = [kind for kind in ('grid', 'list') if kind in sweep]
  unknown = sorted(set(sweep) - {'grid', 'list', 'fixed'})
  if len(kinds) != 1 or unknown:
    raise ValueError(f"a sweep needs exactly one of 'grid' or 'list' (and optionally "
                     f"'fixed'); got keys {sorted(sweep)}")
  if kinds == ['grid']:
    keys = list(sweep['grid'])
    points = [
        dict(zip(keys, values))
        for values in itertools.product(*(sweep['grid'][key] for key in keys))
    ]
  else:
    points = [dict(point) for point in sweep['list']]
  return [{**sweep.get('fixed', {}), **point} for point in points]


def _slug(value) -> str:
  return re.sub(r'[^A-Za-z0-9.]+', '', str(value)) or 'empty'


def job_name(point: dict, fixed: dict) -> str:
  """'normalization-center_prior_source-sweep': the last part of each swept key and its value."""
  varied = [(key, value) for key, value in point.items() if key not in fixed]
  return '_'.join(f'{key.rsplit(".", 1)[-1]}-{_slug(value)}' for key, value in varied) or 'run'


def _override_value(value) -> str:
  return str(value) if not isinstance(value, (tuple, list)) else '(' + ','.join(
      str(item) for item in value) + (',)' if len(value) == 1 else ')')


def jobs(sweep: dict, workdir_root: str) -> list[Job]:
  fixed = sweep.get('fixed', {})
  result, seen = [], set()
  for point in expand(sweep):
    name = job_name(point, fixed)
    if name in seen:
      raise ValueError(f'two points of the sweep are both named {name}: make them differ in a '
                       'swept key')
    seen.add(name)
    result.append(
        Job(name, os.path.join(workdir_root, name),
            tuple(f'{key}={_override_value(value)}' for key, value in point.items())))
  return result


def _with_flag(flags: list[str], name: str, value: str) -> list[str]:
  return [flag for flag in flags if not flag.startswith(f'--{name}=')] + [f'--{name}={value}']


def _flag(flags: list[str], name: str) -> str | None:
  values = [flag.split('=', 1)[1] for flag in flags if flag.startswith(f'--{name}=')]
  return values[-1] if values else None


def commands(sweep_jobs: list[Job],
             *,
             runner: str,
             config: str,
             launcher_flags: list[str],
             python: str = sys.executable) -> list[list[str]]:
  """One command per job for the runner."""
  result = []
  for index, job in enumerate(sweep_jobs):
    if runner == 'local':
      result.append(kldino_command(python, config, job.workdir, job.overrides))
      continue
    flags = _with_flag(_with_flag(launcher_flags, 'config', config), 'workdir', job.workdir)
    if runner == 'tpu_vm':
      flags = _with_flag(flags, 'name', f'{_flag(launcher_flags, "name") or "kldino"}-{index}')
    else:
      flags = _with_flag(flags, 'job_name',
                         f'{_flag(launcher_flags, "job_name") or "kldino"}-{job.name}')
    result.append([python, '-m', f'launch.{runner}', *flags, '--', *job.overrides])
  return result


def run_local(sweep_jobs: list[Job], job_commands: list[list[str]], workdir_root: str) -> int:
  """Each job in turn (a failed job does not stop the others), then summary.json."""
  summary, failures = {}, 0
  recorded = report.recorded_runs(workdir_root)
  for job, command in zip(sweep_jobs, job_commands):
    if job.name in recorded and not os.path.isdir(job.workdir):
      print(f'== {job.name}: recorded in {report.RECORD}', flush=True)
      summary[job.name] = {'overrides': list(job.overrides), **recorded[job.name].results}
      continue
    print(f'== {job.name}', flush=True)
    returncode = execute([command], dry_run=False)
    eval_path = os.path.join(job.workdir, 'eval.json')
    # A job stopped by the collapse guard has an eval.json too: its "collapse" and step.
    if returncode in (0, errors.CollapseStopped.exit_code) and os.path.isfile(eval_path):
      with open(eval_path) as f:
        summary[job.name] = {'overrides': list(job.overrides), **json.load(f)}
    else:
      summary[job.name] = {'overrides': list(job.overrides)}
    if returncode:
      failures += 1
      summary[job.name]['returncode'] = returncode
  os.makedirs(workdir_root, exist_ok=True)
  with open(os.path.join(workdir_root, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  for name, result in summary.items():
    collapse = result.get('collapse')
    print(f"{name:50s} knn {result.get('knn_top1', float('nan')):.4f} "
          f"linear {result.get('linear_top1', float('nan')):.4f} "
          f"cluster_mi {result.get('cluster_mi', float('nan')):.3f}" +
          (f" {collapse['kind']} collapse at step {collapse['step']}" if collapse else ''))
  return 1 if failures else 0


def parser() -> argparse.ArgumentParser:
  flags = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  flags.add_argument('--sweep', required=True, help='a sweep file with get_sweep()')
  flags.add_argument('--config', required=True, help='the config every job starts from')
  flags.add_argument('--workdir_root', required=True, help='job NAME runs in ROOT/NAME')
  flags.add_argument('--runner', choices=RUNNERS, default='local')
  flags.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  flags.add_argument('--report',
                     action='store_true',
                     help='local runner: then write the '
                     'study report (kldino.report) under --workdir_root')
  flags.add_argument('launcher_flags',
                     nargs='*',
                     help='flags for the tpu_vm / slurm launcher '
                     '(after --), e.g. --zone=... --accelerator=... --name=...')
  return flags


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    sweep_jobs = jobs(load_sweep(args.sweep), args.workdir_root)
  except ValueError as error:
    print(f'launch.sweep: {error}', file=sys.stderr)
    return 2
  job_commands = commands(sweep_jobs,
                          runner=args.runner,
                          config=args.config,
                          launcher_flags=args.launcher_flags)
  if args.dry_run or args.runner != 'local':
    return execute(job_commands, dry_run=args.dry_run)
  returncode = run_local(sweep_jobs, job_commands, args.workdir_root)
  if args.report:
    report.write_report(args.workdir_root)
    print(os.path.join(args.workdir_root, 'report.md'))
  return returncode


if __name__ == '__main__':
  sys.exit(main())
