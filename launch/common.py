"""What the launchers share: the kldino command line and running or printing commands."""
from __future__ import annotations

import shlex
import subprocess
import sys


def kldino_command(python: str, config: str, workdir: str, overrides=()) -> list[str]:
  """argv of one training run; overrides are 'KEY=VALUE' config overrides."""
  return [
      python, '-m', 'kldino.main', f'--config={config}', f'--workdir={workdir}',
      *[f'--config.{override}' for override in overrides]
  ]


def execute(commands: list[list[str]], *, dry_run: bool, out=sys.stdout) -> int:
  """Run commands in order, stopping at the first failure; with dry_run only print them."""
  for command in commands:
    print(('' if dry_run else '+ ') + shlex.join(command), file=out, flush=True)
    if not dry_run:
      returncode = subprocess.run(command, check=False).returncode
      if returncode:
        return returncode
  return 0
