"""The command line's failures: one `kldino:` line, the exit code of its kind, no stack trace; the
workdir lock; --help built from the modes' registry, which loads no heavy library."""
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from kldino import cli
from kldino import errors
from kldino import modes
from tests.helpers import REPO, config_module, run_kldino


def _main(*args, timeout=300):
  return run_kldino(*args, env={'JAX_PLATFORMS': 'cpu'}, timeout=timeout)


def _one_line(result) -> str:
  lines = result.stderr.strip().splitlines()
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert lines and lines[-1].startswith('kldino: '), result.stderr[-2000:]
  return lines[-1]


@pytest.mark.parametrize('args, fragment', [
    (['--config.foo=1'], 'unknown config key foo'),
    (['--config.optim.lrr=1'], 'did you mean optim.lr'),
    (['--config.optim.lr=abc'], "--config.optim.lr=abc: could not convert string to float"),
    (['--mode=evl'], 'flag --mode=evl: value should be one of'),
    (['stray'], 'unexpected arguments: stray'),
])
def test_bad_flags_and_keys_end_in_one_line(tmp_path, args, fragment):
  result = _main('--config=configs/smoke.py', f'--workdir={tmp_path}', *args)
  assert result.returncode == errors.UsageError.exit_code
  assert fragment in _one_line(result)


def test_bad_config_files_name_the_file_and_line(tmp_path):
  broken = tmp_path / 'broken.py'
  broken.write_text('from kldino.config.defaults import base_config\n\ndef get_config(:\n')
  empty = tmp_path / 'empty.py'
  empty.write_text('x = 1\n')
  cases = [(str(tmp_path / 'missing.py'), 'missing.py: no such file'),
           (str(broken), 'broken.py does not parse: line 3'), (str(empty), 'has no get_config()')]
  for config, fragment in cases:
    result = _main(f'--config={config}', f'--workdir={tmp_path / "run"}')
    assert result.returncode == errors.UsageError.exit_code
    assert fragment in _one_line(result)


def test_workdirs_that_cannot_be_one(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('')
  for workdir, fragment in ((a_file, 'is a file, not a directory'), (a_file / 'below',
                                                                     'cannot be created')):
    result = _main('--config=configs/smoke.py', f'--workdir={workdir}')
    assert result.returncode == errors.UsageError.exit_code
    assert fragment in _one_line(result)
  result = _main('--mode=eval', f'--workdir={tmp_path / "no_run"}')
  assert result.returncode == errors.UsageError.exit_code
  assert 'config.json does not exist' in _one_line(result)


def test_a_second_run_on_a_workdir_is_refused_until_the_first_ends(tmp_path):
  """The lock is the kernel's (flock): held while the holder lives, gone when it is killed."""
  holder = subprocess.Popen([
      sys.executable, '-c', 'import sys, time; from kldino import cli; '
      f'lock = cli.lock_workdir({str(tmp_path)!r}); print("locked", flush=True); time.sleep(600)'
  ],
                            cwd=REPO,
                            stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(errors.UsageError, match='is in use by another kldino run'):
      cli.lock_workdir(str(tmp_path))
    result = _main('--config=configs/smoke.py', f'--workdir={tmp_path}')
    assert result.returncode == errors.UsageError.exit_code
    assert 'is in use by another kldino run' in _one_line(result)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  lock = cli.lock_workdir(str(tmp_path))  # the killed holder left no stale lock
  lock.close()


def test_a_non_finite_loss_stops_with_exit_4_and_only_finite_checkpoints(tmp_path):
  """lr 1e38: the parameters overflow at once. The step that goes non-finite keeps the state
  before it, the run stops at the next log step with one line, no background thread prints, and
  every checkpoint written holds finite values."""
  from kldino.train import Trainer  # pylint: disable=import-outside-toplevel
  overrides = [
      '--config.optim.lr=1e38', '--config.optim.warmup_epochs=0',
      '--config.checkpoint_every_steps=1', '--config.log_every_steps=5'
  ]
  result = _main('--config=configs/smoke.py', f'--workdir={tmp_path}', *overrides)
  assert result.returncode == errors.NonFiniteLoss.exit_code
  line = _one_line(result)
  assert 'non-finite loss or gradient at step' in line and 'lower optim.lr' in line
  assert 'Exception in thread' not in result.stderr
  # A compact console: kldino's own lines, not orbax's forty per checkpoint nor the config dump.
  assert 'checkpoint_manager.py' not in result.stderr and 'config:' not in result.stderr
  assert len(result.stderr.splitlines()) < 30, result.stderr
  config = config_module('smoke').get_config()
  config.update_from_flattened_dict({'optim.lr': 1e38, 'optim.warmup_epochs': 0})
  trainer = Trainer(config, str(tmp_path))
  steps = trainer.checkpointer.manager.all_steps()
  assert steps and max(steps) < int(line.split('at step ')[1].split(';')[0])
  for step in steps:
    state = jax.device_get(trainer.restore_or_init(step=step))
    assert all(
        np.isfinite(leaf).all()
        for leaf in jax.tree.leaves(state)
        if np.issubdtype(np.asarray(leaf).dtype, np.floating))


def test_checkpoint_modes_refuse_bad_inputs_in_one_line(tmp_path):
  """Each fails before a checkpoint is read: the files given are checked first."""
  np.save(tmp_path / 'odd_size.npy', np.zeros((2, 5, 5, 1), np.float32))
  (tmp_path / 'text.npy').write_text('not numpy')
  (tmp_path / 'garbage.pth').write_bytes(b'\x00 not a pickle' * 10)
  (tmp_path / 'bad_run').mkdir()
  (tmp_path / 'bad_run' / 'config.json').write_text('{"model": ')
  smoke = ['--config=configs/smoke.py', f'--workdir={tmp_path / "run"}']
  cases = [
      (['--mode=features', f'--inputs={tmp_path / "odd_size.npy"}',
        *smoke], 'holds 5x5 images: the backbone takes square images of a whole number of patches'),
      (['--mode=features', f'--inputs={tmp_path / "text.npy"}',
        *smoke], 'is not a .npy file of numbers'),
      (['--mode=import', f'--import_from={tmp_path / "garbage.pth"}',
        *smoke], 'is not a PyTorch checkpoint'),
      (['--mode=eval', f'--workdir={tmp_path / "bad_run"}'], 'config.json does not parse (line 1'),
      (['--mode=export', f'--output={tmp_path / "text.npy" / "x.npz"}',
        *smoke], 'its folder cannot be created'),
      (['--mode=eval', f'--output={tmp_path}', *smoke], 'is a folder: pass a file path'),
  ]
  for args, fragment in cases:
    result = _main(*args)
    assert result.returncode == errors.UsageError.exit_code, (args, result.stderr[-2000:])
    assert fragment in _one_line(result), args


def test_help_lists_every_mode_and_the_modes_of_each_flag():
  result = run_kldino('--help', timeout=120)
  text = ' '.join(result.stdout.split())  # absl's --help exits 1
  for name in modes.MODES:
    assert f'{name}: {modes.MODES.get(name).summary}' in text
  assert '--import_from: import:' in text


def test_the_command_line_and_the_registry_load_neither_jax_nor_tensorflow():
  """--help and flag errors answer before the heavy libraries load."""
  code = ('import sys; import kldino.main; '
          "print(sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules))")
  result = subprocess.run([sys.executable, '-c', code],
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=120)
  assert result.stdout.strip() == '[]', result.stderr[-2000:]
