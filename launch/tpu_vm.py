"""Run kldino on a Cloud TPU VM (one host or a pod slice): create or reuse the VM, copy the code,
install, run on every worker with the logs streamed back, and optionally delete the VM.

    python -m launch.tpu_vm --name=kldino-v5p --zone=us-east5-a --accelerator=v5p-128 \
        --config=configs/imagenet_scale.py:vit_b16,v5p-128 --workdir=gs://BUCKET/kldino/vit_b16 \
        [--reuse] [--delete] [--spot] [--project=P] [--dry_run] [-- KEY=VALUE ...]

Every worker runs the same command; kldino finds the other workers by itself
(jax.distributed.initialize on a TPU VM slice) and checkpoints to the gs:// workdir, so rerunning
the same command after a preemption resumes.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from launch.common import execute, kldino_command

REMOTE_DIR = '~/kldino'
REMOTE_TARBALL = '~/kldino.tar.gz'
LOCAL_TARBALL = '/tmp/kldino_code.tar.gz'
LIBTPU_URL = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
JAX_VERSION = '0.10.2'

# Cloud TPU's software versions (the VM image) per TPU generation, from the accelerator type's
# prefix: v4 and older boot the Ubuntu base image, v5e, v5p and v6e their own runtime images.
SOFTWARE_VERSIONS = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5e': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e'
}


def software_version(accelerator: str) -> str:
  """The TPU VM software version for an accelerator type such as v5p-128; ValueError naming
  --version when the generation is not one kldino knows."""
  generation = accelerator.rsplit('-', 1)[0]
  if generation not in SOFTWARE_VERSIONS:
    raise ValueError(f'no known TPU software version for --accelerator={accelerator} (known: '
                     f'{", ".join(SOFTWARE_VERSIONS)}): pass --version=...')
  return SOFTWARE_VERSIONS[generation]


def _gcloud(verb: list[str], args) -> list[str]:
  command = ['gcloud', 'compute', 'tpus', 'tpu-vm', *verb, f'--zone={args.zone}']
  return command + ([f'--project={args.project}'] if args.project else [])


def _on_all_workers(args, remote: str) -> list[str]:
  return _gcloud(['ssh', args.name], args) + ['--worker=all', f'--command={remote}']


def commands(args) -> list[list[str]]:
  """Every command of one launch, in order."""
  steps = []
  if not args.reuse:
    steps.append(
        _gcloud(['create', args.name], args) + [
            f'--accelerator-type={args.accelerator}',
            f'--version={args.version or software_version(args.accelerator)}', *(
                ['--spot'] if args.spot else [])
        ])
  steps.append(['git', 'archive', '--format=tar.gz', f'--output={LOCAL_TARBALL}', 'HEAD'])
  steps.append(
      _gcloud(['scp', LOCAL_TARBALL, f'{args.name}:{REMOTE_TARBALL}'], args) + ['--worker=all'])
  install = (f'mkdir -p {REMOTE_DIR} && tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR} && '
             f'cd {REMOTE_DIR} && python3 -m venv .venv && '
             f'.venv/bin/pip install -q -c requirements.lock -e . '
             f'"jax[tpu]=={JAX_VERSION}" -f {LIBTPU_URL}')
  steps.append(_on_all_workers(args, install))
  run = kldino_command('.venv/bin/python', args.config, args.workdir, args.overrides)
  steps.append(_on_all_workers(args, f'cd {REMOTE_DIR} && {shlex.join(run)}'))
  if args.delete:
    steps.append(_gcloud(['delete', args.name], args) + ['--quiet'])
  return steps


def parser() -> argparse.ArgumentParser:
  flags = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  flags.add_argument('--name', required=True, help='TPU VM name')
  flags.add_argument('--zone', required=True)
  flags.add_argument('--accelerator', required=True, help='e.g. v4-32, v5litepod-64, v5p-128')
  flags.add_argument('--version',
                     default=None,
                     help='TPU VM software version (default: the '
                     "one for the accelerator's generation, SOFTWARE_VERSIONS)")
  flags.add_argument('--project', default=None)
  flags.add_argument('--config', required=True)
  flags.add_argument('--workdir', required=True, help='a gs:// path shared by all workers')
  flags.add_argument('--reuse', action='store_true', help='the VM exists: do not create it')
  flags.add_argument('--delete', action='store_true', help='delete the VM after the run')
  flags.add_argument('--spot', action='store_true', help='a preemptible (spot) VM')
  flags.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  flags.add_argument('overrides', nargs='*', help='config overrides KEY=VALUE (after --)')
  return flags


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  if not args.workdir.startswith('gs://'):
    print(
        f'launch.tpu_vm: --workdir={args.workdir} must be a gs:// path that every worker '
        'can write (checkpoints are written collectively)',
        file=sys.stderr)
    return 2
  try:
    steps = commands(args)
  except ValueError as error:
    print(f'launch.tpu_vm: {error}', file=sys.stderr)
    return 2
  return execute(steps, dry_run=args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
