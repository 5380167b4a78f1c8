"""Run kldino under SLURM on multi-GPU hosts: writes a batch script and submits it with sbatch.

    python -m launch.slurm --job_name=vit_b16 --nodes=4 --gpus_per_node=8 \
        --config=configs/imagenet_scale.py:vit_b16,h100x32 --workdir=/shared/kldino/vit_b16 \
        [--per=gpu|host] [--partition=P] [--time=72:00:00] [--dry_run] [-- KEY=VALUE ...]

`--per=gpu` starts one process per GPU (each sees only its own GPU), `--per=host` one process per
node driving all its GPUs. kldino detects the SLURM job and calls jax.distributed.initialize();
the workdir must be on a file system every node sees. `sbatch --requeue` reruns the same command
after a preemption or node failure, which resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from launch.common import execute, kldino_command


def batch_script(args) -> str:
  tasks_per_node = args.gpus_per_node if args.per == 'gpu' else 1
  lines = [
      '#!/bin/bash',
      f'#SBATCH --job-name={args.job_name}',
      f'#SBATCH --nodes={args.nodes}',
      f'#SBATCH --ntasks-per-node={tasks_per_node}',
      f'#SBATCH --gpus-per-node={args.gpus_per_node}',
      f'#SBATCH --cpus-per-task={args.cpus_per_task}',
      f'#SBATCH --time={args.time}',
      f'#SBATCH --output={args.workdir}/slurm-%j.out',
      '#SBATCH --requeue',
  ]
  if args.partition:
    lines.append(f'#SBATCH --partition={args.partition}')
  run = shlex.join(kldino_command(args.python, args.config, args.workdir, args.overrides))
  if args.per == 'gpu':  # each task sees one GPU: its rank on the node
    run = f"bash -c {shlex.quote('CUDA_VISIBLE_DEVICES=$SLURM_LOCALID exec ' + run)}"
  lines += [
      'set -euo pipefail', f'cd {shlex.quote(args.repo)}', f'mkdir -p {args.workdir}', f'srun {run}'
  ]
  return '\n'.join(lines) + '\n'


def script_path(args) -> str:
  return os.path.join(args.workdir, f'{args.job_name}.sbatch')


def commands(args) -> list[list[str]]:
  return [['mkdir', '-p', args.workdir], ['sbatch', script_path(args)]]


def parser() -> argparse.ArgumentParser:
  flags = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  flags.add_argument('--job_name', required=True)
  flags.add_argument('--nodes', type=int, default=1)
  flags.add_argument('--gpus_per_node', type=int, default=8)
  flags.add_argument('--per',
                     choices=('gpu', 'host'),
                     default='gpu',
                     help='one process per GPU or per host')
  flags.add_argument('--cpus_per_task', type=int, default=12)
  flags.add_argument('--time', default='72:00:00')
  flags.add_argument('--partition', default=None)
  flags.add_argument('--config', required=True)
  flags.add_argument('--workdir', required=True, help='on a file system shared by all nodes')
  flags.add_argument('--repo', default=os.getcwd(), help='the kldino checkout on the cluster')
  flags.add_argument('--python', default='.venv/bin/python')
  flags.add_argument('--dry_run', action='store_true', help='print the script and commands')
  flags.add_argument('overrides', nargs='*', help='config overrides KEY=VALUE (after --)')
  return flags


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  script = batch_script(args)
  if args.dry_run:
    print(f'# {script_path(args)}\n{script}', end='')
  else:
    os.makedirs(args.workdir, exist_ok=True)
    with open(script_path(args), 'w') as f:
      f.write(script)
  return execute(commands(args), dry_run=args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
