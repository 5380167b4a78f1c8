"""kldino's entry point.

    python -m kldino.main --config=configs/digits.py --workdir=DIR [--config.KEY=VALUE ...]

trains (resuming from DIR's latest checkpoint if there is one), then evaluates the teacher
backbone; the last stdout line is the evaluation JSON (also written to DIR/eval.json). Log lines
go to stderr. The other modes (kldino/commands.py) read a checkpoint of DIR:

    --mode=eval     [--step=N] [--output=FILE.json] [--config.data.name=... ...]
    --mode=linear_eval [--step=N] [--output=FILE.json]   (DINO's linear evaluation)
    --mode=features [--step=N] [--split=test | --inputs=X.npy] [--output=F.npy]
    --mode=export   [--step=N] [--output=FILE.npz]
    --mode=import   --import_from=FILE.pth --config=CONFIG   (writes DIR's step-0 checkpoint)
    --mode=preview  --output=OUT [--split=S] [--num_images=N]  (the input as the model sees it)

and print one JSON line saying what they wrote. Without --config they use DIR/config.json.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kldino import cli
from kldino import host_memory
from kldino import xla_env

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (get_config()).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for logs, checkpoints and eval.json.')
_MODE = flags.DEFINE_enum('mode', 'train', [
    'train', 'eval', 'linear_eval', 'features', 'export', 'import', 'preview', 'attention', 'plan'
], 'What to do.')
_STEP = flags.DEFINE_integer(
    'step', None, 'eval/features/export: the checkpoint step '
    '(default: the latest readable one).')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'eval: JSON path (default DIR/eval.json); '
    'linear_eval: JSON path (default DIR/linear_eval.json); '
    'features: .npy path; export: .npz path.')
_SPLIT = flags.DEFINE_string(
    'split', None, 'features, preview, attention: the split (default '
    'data.eval_split).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'preview, attention: how many images of the '
                                   'split.')
_INPUTS = flags.DEFINE_string(
    'inputs', None, 'features, attention: a .npy of float32 NHWC '
    'images, already '
    'preprocessed (no augmentation, no resizing).')
_IMPORT_FROM = flags.DEFINE_string('import_from', None, 'import: an official DINO .pth file.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process: HOST:PORT of '
    'process 0 (default: auto-detect TPU VMs and SLURM).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: how many.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this one, 0-based.')
flags.DEFINE_bool('verbose', False, 'On failure, print the stack trace before the one-line '
                  'message.')

# Modes that write into the workdir hold its lock (kldino/cli.py) while they run.
_WRITING_MODES = ('train', 'linear_eval', 'import')
# Modes that read a checkpoint take the run's own config when no --config is given.
_WORKDIR_CONFIG_MODES = ('eval', 'linear_eval', 'features', 'export', 'attention')
_WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'workdir_config.py')


def _flag_value(argv, name):
  for index, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _with_workdir_config(argv):
  """argv with `--config=<kldino>/workdir_config.py:DIR` when a checkpoint mode has no --config
  (config overrides need a config flag that comes before them)."""
  has_config = any(arg == '--config' or arg.startswith('--config=') for arg in argv)
  workdir = _flag_value(argv, 'workdir')
  if has_config or _flag_value(argv, 'mode') not in _WORKDIR_CONFIG_MODES or not workdir:
    return argv
  return [argv[0], f'--config={_WORKDIR_CONFIG}:{workdir}', *argv[1:]]


def _mode_kwargs(mode):
  if mode == 'import':
    if not _IMPORT_FROM.value:
      cli.fail('--mode=import needs --import_from=FILE.pth')
    return {'import_from': _IMPORT_FROM.value}
  if mode == 'preview':
    if not _OUTPUT.value:
      cli.fail('--mode=preview needs --output=DIR (where the PNGs and index.json go)')
    if _NUM_IMAGES.value < 1:
      cli.fail(f'--num_images={_NUM_IMAGES.value} must be >= 1')
    return {'output': _OUTPUT.value, 'split': _SPLIT.value, 'num_images': _NUM_IMAGES.value}
  if mode == 'attention':
    if not _OUTPUT.value:
      cli.fail('--mode=attention needs --output=DIR (where attention.npy and the PNGs go)')
    if _NUM_IMAGES.value < 1:
      cli.fail(f'--num_images={_NUM_IMAGES.value} must be >= 1')
    if _INPUTS.value and _SPLIT.value:
      cli.fail('--mode=attention takes --inputs=X.npy or --split=S, not both')
    return {
        'step': _STEP.value,
        'output': _OUTPUT.value,
        'split': _SPLIT.value,
        'num_images': _NUM_IMAGES.value,
        'inputs': _INPUTS.value
    }
  kwargs = {'step': _STEP.value, 'output': _OUTPUT.value}
  if mode == 'features':
    kwargs.update(split=_SPLIT.value, inputs=_INPUTS.value)
  return kwargs


def _plan(config):
  """--mode=plan (kldino/plan.py): the table and the JSON line on stdout; a plan that does not
  fit ends with the line naming the fix, exit 2."""
  devices = config.hardware.devices
  assert 'jax' not in sys.modules, 'jax was imported before --mode=plan could set its flags'
  xla_env.set_plan_flags(devices)
  if devices:  # the config's devices, simulated on this CPU
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  from kldino import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from kldino.config_checks import ConfigError, validate_config  # pylint: disable=g-import-not-at-top
  try:
    validate_config(config,
                    num_devices=devices or jax.device_count(),
                    num_processes=config.hardware.hosts if devices else jax.process_count())
    plan = plan_lib.make_plan(config)
  except (ConfigError, ValueError) as error:
    cli.fail(str(error))
  print(plan_lib.table(plan))
  print(json.dumps(plan, sort_keys=True), flush=True)
  fix = plan_lib.fix(plan, config)
  if fix:
    cli.fail(f'does not fit: {fix}')


def main(argv):
  cli.quiet_tracebacks()
  cli.quiet_libraries(logging.get_verbosity())
  xla_env.set_xla_flags()  # before JAX's backend starts
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}: flags are --name=value')
  if _MODE.value == 'plan':
    if _CONFIG.value is None:
      cli.fail('--mode=plan needs --config=FILE (and no --workdir)')
    return _plan(_CONFIG.value)
  if _CONFIG.value is None or not _WORKDIR.value:
    cli.fail('--config=FILE and --workdir=DIR are required')
  try:
    cli.check_workdir(_WORKDIR.value)
    if _OUTPUT.value:
      cli.check_output(_OUTPUT.value, directory=_MODE.value in ('preview', 'attention'))
  except cli.UsageError as error:
    cli.fail(str(error))
  host_memory.reexec_with_huge_pages()  # before JAX allocates anything (kldino/host_memory.py)
  logging.info('GLIBC_TUNABLES=%s', os.environ.get('GLIBC_TUNABLES', ''))
  # Imported here so that --help and flag errors answer before TensorFlow and JAX load.
  from kldino import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as error:
    cli.fail(str(error))
  import jax  # pylint: disable=g-import-not-at-top
  from kldino import train  # pylint: disable=g-import-not-at-top
  from kldino.config_checks import ConfigError, DataError  # pylint: disable=g-import-not-at-top
  from kldino.checkpoint import Preempted, WriteFailed  # pylint: disable=g-import-not-at-top
  from kldino.guard import CollapseStopped  # pylint: disable=g-import-not-at-top
  from kldino.data.unreadable import TooManyUnreadable  # pylint: disable=g-import-not-at-top
  logging.vlog(1, 'config:\n%s', _CONFIG.value)  # all of it is in WORKDIR/config.json too
  mode = _MODE.value
  try:
    lock = (cli.lock_workdir(_WORKDIR.value)
            if mode in _WRITING_MODES and jax.process_index() == 0 else None)
  except cli.UsageError as error:
    cli.fail(str(error))
  try:
    if mode == 'train':
      results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      from kldino import commands  # pylint: disable=g-import-not-at-top
      results = commands.MODES.get(mode)(_CONFIG.value, _WORKDIR.value, **_mode_kwargs(mode))
  except (DataError, TooManyUnreadable) as error:
    cli.fail(str(error), cli.EXIT_DATA)
  except ConfigError as error:
    cli.fail(str(error))
  except train.Collapsed as error:
    cli.fail(str(error), cli.EXIT_NUMERICS)
  except CollapseStopped as error:
    cli.fail(str(error), cli.EXIT_COLLAPSE)
  except Preempted as error:
    print(f'kldino: {error}', file=sys.stderr, flush=True)
    return
  except WriteFailed as error:
    cli.fail(str(error), cli.EXIT_WRITE)
  except Exception as error:  # pylint: disable=broad-except
    if not cli.disk_full(error):
      raise
    cli.fail(
        f'no space left on the device of --workdir={_WORKDIR.value} ({type(error).__name__})'
        ': free space and rerun the same command; committed checkpoints are intact', cli.EXIT_WRITE)
  finally:
    if lock is not None:
      lock.close()
  if jax.process_index() == 0:  # one JSON line per run, not one per process
    print(json.dumps(results, sort_keys=True), flush=True)


def run():
  """The `kldino` console script."""
  sys.argv = _with_workdir_config(sys.argv)
  try:
    cli.check_command_line(sys.argv)
  except cli.UsageError as error:
    cli.fail(str(error))
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
