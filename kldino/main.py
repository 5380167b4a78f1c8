"""kldino's entry point.

    python -m kldino.main --config=configs/digits.py --workdir=DIR [--config.KEY=VALUE ...]

trains (resuming from DIR's latest checkpoint if there is one), then evaluates the teacher
backbone; the last stdout line is the evaluation JSON (also written to DIR/eval.json). Log lines
go to stderr. `--mode=NAME` does something else with the same config and workdir: the modes are
registered in kldino/modes/__init__.py and listed by `--help`; each prints one JSON line saying
what it wrote. The modes that read a checkpoint use DIR/config.json when no --config is given.
A failure ends in one line and the exit code of its kind (kldino/errors.py).
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
from kldino import errors
from kldino import modes
from kldino.runtime import host_memory
from kldino.runtime import xla_env

# What each flag of the modes is; which modes take it comes from their registrations.
_MODE_FLAGS = {
    'step': 'the checkpoint step (default: the latest readable one)',
    'split': 'the split (default: data.eval_split)',
    'num_images': 'how many images of the split',
    'inputs': 'a .npy of float32 NHWC images, already preprocessed (no augmentation, no resizing)',
    'import_from': 'an official DINO or DINOv2 .pth file',
    'format': "'npz' (kldino's) or 'pth' (a PyTorch state dict in the official DINO or DINOv2 "
              'layout)',
}


def _takers(flag: str) -> str:
  return ', '.join(name for name in modes.MODES if flag in modes.MODES.get(name).flags)


def _flag_help(flag: str) -> str:
  return f'{_takers(flag)}: {_MODE_FLAGS[flag]}.'


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (get_config()).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for logs, checkpoints and eval.json.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', modes.MODES.names(), 'What to do. ' +
    '; '.join(f'{name}: {modes.MODES.get(name).summary}' for name in modes.MODES) + '.')
_OUTPUT = flags.DEFINE_string(
    'output', None, '; '.join(f'{name}: {modes.MODES.get(name).output}' for name in modes.MODES
                              if modes.MODES.get(name).output) + '.')
_MODE_VALUES = {
    'step': flags.DEFINE_integer('step', None, _flag_help('step')),
    'split': flags.DEFINE_string('split', None, _flag_help('split')),
    'num_images': flags.DEFINE_integer('num_images', 8, _flag_help('num_images'), lower_bound=1),
    'inputs': flags.DEFINE_string('inputs', None, _flag_help('inputs')),
    'import_from': flags.DEFINE_string('import_from', None, _flag_help('import_from')),
    'format': flags.DEFINE_string('format', 'npz', _flag_help('format')),
    'output': _OUTPUT,
}
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process: HOST:PORT of '
    'process 0 (default: auto-detect TPU VMs and SLURM).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process: how many.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process: this one, 0-based.')
flags.DEFINE_bool('verbose', False, 'On failure, print the stack trace before the one-line '
                  'message.')


def _check_command(mode: modes.Mode):
  """What the mode needs from the command line, before anything loads."""
  if _CONFIG.value is None:
    cli.fail(f'--mode={mode.name} needs --config=FILE' +
             (' (or the --workdir of a training run)' if mode.reads_workdir_config else ''))
  if mode.needs_workdir and not _WORKDIR.value:
    cli.fail(f'--mode={mode.name} needs --workdir=DIR')
  for flag in mode.required:
    if _MODE_VALUES[flag].value is None:
      if flag == 'output':
        value, what = 'DIR' if mode.output_is_folder else 'FILE', mode.output
      else:
        value, what = 'FILE', _MODE_FLAGS[flag]
      cli.fail(f'--mode={mode.name} needs --{flag}={value} ({what})')
  try:
    if mode.needs_workdir:
      cli.check_workdir(_WORKDIR.value)
    if _OUTPUT.value and mode.output:
      cli.check_output(_OUTPUT.value, directory=mode.output_is_folder)
  except errors.UsageError as error:
    cli.fail(str(error))


def _run_mode(mode: modes.Mode) -> dict:
  """The mode's result; its failures end the command in one line with their exit code."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    lock = (cli.lock_workdir(_WORKDIR.value)
            if mode.writes_workdir and jax.process_index() == 0 else None)
  except errors.UsageError as error:
    cli.fail(str(error))
  try:
    run = mode.load()
    return run(_CONFIG.value, _WORKDIR.value,
               **{flag: _MODE_VALUES[flag].value for flag in mode.flags})
  except errors.Preempted as error:  # saved: one line, and 0 (SIGTERM) or 130 (Ctrl-C)
    print(f'kldino: {error}', file=sys.stderr, flush=True)
    sys.exit(error.exit_code)
  except errors.KldinoError as error:
    cli.fail(str(error), error.exit_code)
  except KeyboardInterrupt:
    cli.fail(
        'interrupted (Ctrl-C); the committed checkpoints are intact: rerun the same command '
        'to go on', errors.Interrupted.exit_code)
  except Exception as error:  # pylint: disable=broad-except
    if not cli.disk_full(error):
      raise
    cli.fail(
        f'no space left on the device of --workdir={_WORKDIR.value} ({type(error).__name__})'
        ': free space and rerun the same command; committed checkpoints are intact',
        errors.WriteFailed.exit_code)
  finally:
    if lock is not None:
      lock.close()


def main(argv):
  cli.quiet_tracebacks()
  cli.quiet_libraries(logging.get_verbosity())
  xla_env.set_xla_flags()  # before JAX's backend starts
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}: flags are --name=value')
  mode = modes.MODES.get(_MODE.value)
  _check_command(mode)
  if mode.before_jax:
    if 'jax' in sys.modules:
      cli.fail(f'--mode={mode.name} sets JAX\'s flags before JAX loads, but the config file '
               'imported it: import jax inside functions of the config, not at its top')
    mode.before_jax(_CONFIG.value)
  if not mode.single_process:
    host_memory.reexec_with_huge_pages()  # before JAX allocates (kldino/runtime/host_memory.py)
    logging.info('GLIBC_TUNABLES=%s', os.environ.get('GLIBC_TUNABLES', ''))
    # Imported here so that --help and flag errors answer before TensorFlow and JAX load.
    from kldino.runtime import distributed  # pylint: disable=g-import-not-at-top
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as error:
      cli.fail(str(error))
  logging.vlog(1, 'config:\n%s', _CONFIG.value)  # all of it is in WORKDIR/config.json too
  results = _run_mode(mode)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:  # one JSON line per run, not one per process
    print(json.dumps(results, sort_keys=True), flush=True)


def run():
  """The `kldino` console script."""
  sys.argv = cli.with_workdir_config(sys.argv)
  try:
    cli.check_command_line(sys.argv)
  except errors.UsageError as error:
    cli.fail(str(error))
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
