"""Images that cannot be decoded, on the command line: too many stop the run with exit 3 and one
line that names one. (Skipping, counting and naming them: tests/data/test_unreadable.py.)"""
from kldino import errors
from tests.data.test_unreadable import folder
from tests.helpers import run_kldino


def test_the_command_line_stops_with_exit_3_and_one_line(tmp_path):
  bad = folder(tmp_path / 'data', train_bad=(4,))
  result = run_kldino('--config=configs/smoke.py',
                      f'--workdir={tmp_path / "run"}',
                      '--config.data.name=folder',
                      f'--config.data.path={tmp_path / "data"}',
                      '--config.data.mean=(0.5,0.5,0.5)',
                      '--config.data.std=(0.5,0.5,0.5)',
                      '--config.batch_size=8',
                      '--config.data.max_corrupt_fraction=0',
                      timeout=300,
                      env={'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == errors.DataError.exit_code, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr and 'Exception in thread' not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('kldino: 1 of the 16 images of split') and bad['train'].pop() in line
