"""Launchers and sweeps as commands: the exact commands of a dry run, and the local runner end to
end (its summary keeps a stopped job's collapse)."""
import json
import os
import shutil
import sys

import pytest

from kldino import errors
from launch import sweep
from launch import tpu_vm
from tests.helpers import REPO, run_kldino

INSTALL = ('mkdir -p ~/kldino && tar -xzf ~/kldino.tar.gz -C ~/kldino && cd ~/kldino && '
           'python3 -m venv .venv && .venv/bin/pip install -q -c requirements.lock -e . '
           '"jax[tpu]==0.10.2" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html')


def _dry_run(module, *argv):
  result = run_kldino('--dry_run', *argv, module=module, timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def test_tpu_vm_dry_run_prints_every_command():
  lines = _dry_run('launch.tpu_vm', '--name=pod', '--zone=us-east5-a', '--accelerator=v5p-128',
                   '--config=configs/imagenet_scale.py:vit_b16,v5p-128', '--workdir=gs://b/run',
                   '--spot', '--delete', '--', 'num_epochs=300', 'seed=1')
  zone = '--zone=us-east5-a'
  assert lines == [
      f'gcloud compute tpus tpu-vm create pod {zone} --accelerator-type=v5p-128 '
      '--version=v2-alpha-tpuv5 --spot',
      'git archive --format=tar.gz --output=/tmp/kldino_code.tar.gz HEAD',
      f"gcloud compute tpus tpu-vm scp /tmp/kldino_code.tar.gz 'pod:~/kldino.tar.gz' {zone} "
      '--worker=all',
      f"gcloud compute tpus tpu-vm ssh pod {zone} --worker=all '--command={INSTALL}'",
      f"gcloud compute tpus tpu-vm ssh pod {zone} --worker=all '--command=cd ~/kldino && "
      ".venv/bin/python -m kldino.main --config=configs/imagenet_scale.py:vit_b16,v5p-128 "
      "--workdir=gs://b/run --config.num_epochs=300 --config.seed=1'",
      f'gcloud compute tpus tpu-vm delete pod {zone} --quiet',
  ]


def test_tpu_vm_reuse_skips_create_and_a_local_workdir_is_refused():
  args = tpu_vm.parser().parse_args([
      '--name=v', '--zone=z', '--accelerator=v4-32', '--config=c.py', '--workdir=gs://b/w',
      '--reuse', '--project=p'
  ])
  steps = tpu_vm.commands(args)
  assert [step[4] for step in steps if step[0] == 'gcloud'] == ['scp', 'ssh', 'ssh']
  assert all('--project=p' in step for step in steps if step[0] == 'gcloud')
  result = run_kldino('--name=v',
                      '--zone=z',
                      '--accelerator=v4-32',
                      '--config=c.py',
                      '--workdir=/local/dir',
                      '--dry_run',
                      module='launch.tpu_vm',
                      timeout=60)
  assert result.returncode == 2 and 'must be a gs:// path' in result.stderr


def test_tpu_vm_unknown_generation_asks_for_a_version():
  result = run_kldino('--name=v',
                      '--zone=z',
                      '--accelerator=v9x-8',
                      '--config=c.py',
                      '--workdir=gs://b/w',
                      '--dry_run',
                      module='launch.tpu_vm',
                      timeout=60)
  assert result.returncode == 2 and 'pass --version=' in result.stderr


@pytest.mark.parametrize('per, tasks, srun', [
    ('gpu', 8, "srun bash -c 'CUDA_VISIBLE_DEVICES=$SLURM_LOCALID exec .venv/bin/python -m "
     "kldino.main --config=configs/x.py --workdir=/shared/w --config.seed=2'"),
    ('host', 1, 'srun .venv/bin/python -m kldino.main --config=configs/x.py --workdir=/shared/w '
     '--config.seed=2'),
])
def test_slurm_dry_run_prints_the_script_and_sbatch(per, tasks, srun):
  lines = _dry_run('launch.slurm', '--job_name=b16', '--nodes=4', '--gpus_per_node=8',
                   f'--per={per}', '--partition=gpu', '--config=configs/x.py',
                   '--workdir=/shared/w', '--repo=/home/me/kldino', '--', 'seed=2')
  assert lines == [
      '# /shared/w/b16.sbatch',
      '#!/bin/bash',
      '#SBATCH --job-name=b16',
      '#SBATCH --nodes=4',
      f'#SBATCH --ntasks-per-node={tasks}',
      '#SBATCH --gpus-per-node=8',
      '#SBATCH --cpus-per-task=12',
      '#SBATCH --time=72:00:00',
      '#SBATCH --output=/shared/w/slurm-%j.out',
      '#SBATCH --requeue',
      '#SBATCH --partition=gpu',
      'set -euo pipefail',
      'cd /home/me/kldino',
      'mkdir -p /shared/w',
      srun,
      'mkdir -p /shared/w',
      'sbatch /shared/w/b16.sbatch',
  ]


def test_sweep_dry_run_commands_for_each_runner():
  lines = _dry_run('launch.sweep', '--sweep=sweeps/prior_period.py', '--config=configs/digits.py',
                   '--workdir_root=/r', '--runner=local')
  assert len(lines) == 6
  assert lines[0].endswith(
      ' -m kldino.main --config=configs/digits.py --workdir=/r/prior_every_epochs-1_seed-0 '
      '--config.objective.normalization=prior --config.objective.prior_source=sweep '
      '--config.objective.prior_every_epochs=1 --config.seed=0')
  jobs = sweep.jobs(sweep.load_sweep(os.path.join(REPO, 'sweeps', 'normalisations.py')), 'gs://b/s')
  tpu = sweep.commands(jobs,
                       runner='tpu_vm',
                       config='configs/digits.py',
                       python='python',
                       launcher_flags=['--zone=z', '--accelerator=v4-32', '--name=sw'])
  assert tpu[3] == [
      'python', '-m', 'launch.tpu_vm', '--zone=z', '--accelerator=v4-32',
      '--config=configs/digits.py', '--workdir=gs://b/s/normalization-center', '--name=sw-3', '--',
      'objective.normalization=center'
  ]
  batch = sweep.commands(jobs[:1],
                         runner='slurm',
                         config='c.py',
                         python='python',
                         launcher_flags=['--nodes=2'])
  assert batch == [[
      'python', '-m', 'launch.slurm', '--nodes=2', '--config=c.py',
      '--workdir=gs://b/s/normalization-prior_prior_source-sweep',
      '--job_name=kldino-normalization-prior_prior_source-sweep', '--',
      'objective.normalization=prior', 'objective.prior_source=sweep'
  ]]


def test_local_runner_runs_a_sweep_and_summarises(tmp_path):
  sweep_file = tmp_path / 'two_seeds.py'
  sweep_file.write_text("def get_sweep():\n  return {'grid': {'seed': [0, 1]}, 'fixed': "
                        "{'num_epochs': 1, 'checkpoint_every_steps': 100}}\n")
  root = str(tmp_path / 'runs')
  args = [f'--sweep={sweep_file}', '--config=configs/smoke.py', f'--workdir_root={root}']
  result = run_kldino(*args, module='launch.sweep', timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(root, 'summary.json')) as f:
    summary = json.load(f)
  assert sorted(summary) == ['seed-0', 'seed-1']
  for name, seed in (('seed-0', 0), ('seed-1', 1)):
    assert summary[name]['overrides'] == [
        'num_epochs=1', 'checkpoint_every_steps=100', f'seed={seed}'
    ]
    assert summary[name]['step'] == 1347 // 32
    with open(os.path.join(root, name, 'config.json')) as f:
      assert json.load(f)['seed'] == seed
  assert summary['seed-0']['knn_top1'] != summary['seed-1']['knn_top1'] or (
      summary['seed-0']['cluster_mi'] != summary['seed-1']['cluster_mi'])
  # The study's record (kldino/tools/report.py) stands in for the workdirs on another machine: the
  # report is regenerated from it alone, and a rerun of the sweep skips the recorded jobs.
  from kldino.tools import report  # pylint: disable=g-import-not-at-top
  report.write_report(root)
  with open(os.path.join(root, 'report.md')) as f:
    first_report = f.read()
  for name in ('seed-0', 'seed-1'):
    shutil.rmtree(os.path.join(root, name))
  os.remove(os.path.join(root, 'summary.json'))
  rerun = run_kldino(*args, module='launch.sweep', timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.count(f'recorded in {report.RECORD}') == 2
  assert not os.path.exists(os.path.join(root, 'seed-0'))
  with open(os.path.join(root, 'summary.json')) as f:
    assert json.load(f) == summary
  report.write_report(root)
  with open(os.path.join(root, 'report.md')) as f:
    assert f.read() == first_report
  # One setting (the seeds are one row): the mean and range of its two seeds.
  assert '2 runs in 1 settings' in first_report
  knns = [summary[name]['knn_top1'] for name in ('seed-0', 'seed-1')]
  setting = f'| 0, 1 | {sum(knns) / 2:.4f} ({min(knns):.4f}-{max(knns):.4f}, 2 seeds) |'
  assert setting in first_report


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
