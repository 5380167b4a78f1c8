"""The command line's checks that need no process: unknown config keys suggest the closest, and
remote workdirs keep their scheme. (Its failures as a command: tests/e2e/test_cli.py.)"""
import os

import pytest

from kldino import cli
from kldino import errors
from tests.helpers import REPO


def test_unknown_keys_suggest_the_closest():
  config = cli.load_config_file(os.path.join(REPO, 'configs', 'smoke.py'))
  assert 'optim.lr' in cli.config_keys(config) and 'aug.xla_min_size' in cli.config_keys(config)
  cli.check_overrides(config, ['--config.optim.lr=1', '--workdir=x'])
  with pytest.raises(errors.UsageError, match='did you mean data.eval_resize'):
    cli.check_overrides(config, ['--config.data.eval_resise=3'])


def test_remote_workdirs_keep_their_scheme():
  from kldino import checkpoint
  from kldino.runtime import files  # pylint: disable=import-outside-toplevel
  assert checkpoint.directory('gs://bucket/runs/a/') == 'gs://bucket/runs/a/checkpoints'
  assert files.absolute('relative/run') == os.path.join(os.getcwd(), 'relative/run')
  cli.check_workdir('gs://bucket/runs/a')  # checked by the checkpointer, not on the local disk
  cli.check_output('gs://bucket/runs/a/eval.json')
  assert not os.path.exists('gs:')
