"""A run stops cleanly where it cannot go on: Ctrl-C saves and says how to resume, and a run that
cannot fit the host's memory is refused before anything is written."""
import os
import signal

from kldino import errors
from tests.helpers import run_kldino, signal_at_log_line


def test_ctrl_c_saves_the_step_and_one_line_says_how_to_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  args = ['--config=configs/smoke.py', f'--workdir={workdir}']
  returncode, _, stderr = signal_at_log_line(args, 'step 10/', signal.SIGINT)
  assert returncode == errors.Interrupted.exit_code, stderr[-3000:]
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('kldino: stopped at step ') and 'rerun the same command' in last
  stopped_at = int(last.split('stopped at step ')[1].split()[0])
  assert str(stopped_at) in os.listdir(os.path.join(workdir, 'checkpoints'))


def test_a_run_too_large_for_the_host_is_refused_before_it_starts(tmp_path):
  workdir = tmp_path / 'run'
  result = run_kldino('--config=configs/imagenet_vit_s16.py', f'--workdir={workdir}',
                      '--config.data.name=digits', '--config.data.eval_split=test',
                      '--config.data.mean=(0.5,)', '--config.data.std=(0.5,)',
                      '--config.aug.global_size=2048', '--config.batch_size=64')
  assert result.returncode == errors.ConfigError.exit_code, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert 'GiB of host memory (input batches' in last and 'lower batch_size' in last, last
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(workdir / 'config.json')
  assert not os.path.exists(workdir / 'checkpoints') or not os.listdir(workdir / 'checkpoints')
