"""kldino's entry point.

    python -m kldino.main --config=configs/digits.py --workdir=DIR [--config.KEY=VALUE ...]

Trains, then evaluates the teacher backbone; the last stdout line is the evaluation JSON (also
written to DIR/eval.json). Log lines go to stderr.
"""
from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (get_config()).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for logs, checkpoints and eval.json.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train'], 'What to do.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None or not _WORKDIR.value:
    sys.exit('kldino: --config=FILE and --workdir=DIR are required')
  # Imported here so that --help and flag errors answer before TensorFlow and JAX load.
  from kldino import train  # pylint: disable=g-import-not-at-top
  from kldino.config_checks import ConfigError  # pylint: disable=g-import-not-at-top
  logging.info('config:\n%s', _CONFIG.value)
  try:
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, train.Collapsed) as error:
    sys.exit(f'kldino: {error}')
  print(json.dumps(results, sort_keys=True), flush=True)


def run():
  """The `kldino` console script."""
  app.run(main)


if __name__ == '__main__':
  run()
