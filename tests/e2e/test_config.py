"""Bad config values on the command line fail fast with one clear line and the exit code of their
kind (the checks themselves: tests/config/test_checks.py)."""
import pytest

from tests.helpers import run_kldino


def run_main(tmp_path, *overrides):
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  return run_kldino('--config=configs/digits.py',
                    f'--workdir={tmp_path}',
                    *overrides,
                    env=env,
                    timeout=300)


@pytest.mark.parametrize('overrides, fragment, code', [
    (('--config.data.name=no_such_dataset',), "unknown dataset 'no_such_dataset'", 3),
    (('--config.data.name=folder', '--config.data.path=/no/such/folder'), '/no/such/folder', 3),
    (('--config.batch_size=12',), 'batch_size=12 must be a positive multiple of the 8 devices', 2),
    (('--config.sweep_batch_size=64',), 'sweep_batch_size is now prior_pass_batch_size: set '
     '--config.prior_pass_batch_size', 2),
])
def test_command_line_fails_fast_with_one_line(tmp_path, overrides, fragment, code):
  """Exit code 3 for the dataset, 2 for a config value (README, exit codes)."""
  result = run_main(tmp_path, *overrides)
  assert result.returncode == code
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('kldino: ') and fragment in last_line, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
